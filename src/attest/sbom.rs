//! The SBOM: packages found in an image's root filesystem, as an SPDX 2.3 JSON document.
//!
//! The scanner reads the layers' tar streams, never an unpacked tree, and keeps of each
//! layer only what it found (packages by the file that declared them, and its whiteouts), so
//! a layer is scanned once whatever image it is in. Layers then merge as an unpack would:
//! a whiteout or a later entry at the same path hides what lower layers declared.
//!
//! What it finds:
//! - dpkg packages (`var/lib/dpkg/status`, `var/lib/dpkg/status.d/*`);
//! - apk packages (`lib/apk/db/installed`);
//! - Python distributions (`*.dist-info/METADATA`, `*.egg-info/PKG-INFO`, `*.egg-info`);
//! - npm packages (`node_modules/[@scope/]name/package.json`);
//! - Go modules of Go binaries (the `.go.buildinfo` section, Go 1.18 and later);
//! - crates of Rust binaries built with cargo-auditable (the `.dep-v0` section).
//!
//! The document is a function of what was found: packages are sorted, their SPDX ids and the
//! document namespace are derived from their content, and the only time is the epoch.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::oci::digest::Digest;
use crate::oci::image::{canonical_json, rfc3339, LayerRef};

pub const PREDICATE_TYPE: &str = "https://spdx.dev/Document";
/// Bump when what a layer scan finds changes, so cached scans are redone.
const SCANNER_VERSION: u32 = 1;
/// Binaries up to this size are read whole (their section table says where build info is);
/// larger ones are streamed, looking for Go's build info only, so memory stays bounded.
const MAX_BUFFERED_BINARY: u64 = 64 << 20;
/// A metadata file (METADATA, package.json, a status file) larger than this is skipped.
const MAX_METADATA: u64 = 64 << 20;

/// One package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Package {
    /// `deb`, `apk`, `pypi`, `npm`, `golang` or `cargo` (the purl type).
    pub kind: String,
    pub name: String,
    pub version: String,
    /// The file that declared it, in the image.
    pub location: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// What one layer holds for the SBOM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LayerScan {
    version: u32,
    /// Declaring files (paths without a leading `/`) and the packages each declares.
    files: BTreeMap<String, Vec<Package>>,
    /// `/etc/os-release` fields that name the distribution (`ID`), when the layer has one.
    os_id: Option<String>,
    /// Paths this layer removes (whiteouts) or replaces, at a declaring file's place, with
    /// something that declares nothing; and directories it makes opaque.
    removed: Vec<String>,
    opaque: Vec<String>,
}

fn normalize(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

/// What kind of declaring file `path` is, by name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declares {
    Dpkg,
    Apk,
    Python,
    Npm,
    OsRelease,
    /// Any executable: an ELF binary may carry Go or Rust build info.
    Binary,
}

fn classify(path: &str, mode: u32) -> Option<Declares> {
    if path == "var/lib/dpkg/status"
        || path
            .strip_prefix("var/lib/dpkg/status.d/")
            .is_some_and(|n| !n.contains('/') && !n.ends_with(".md5sums"))
    {
        return Some(Declares::Dpkg);
    }
    if path == "lib/apk/db/installed" {
        return Some(Declares::Apk);
    }
    if path == "etc/os-release" || path == "usr/lib/os-release" {
        return Some(Declares::OsRelease);
    }
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if (name == "METADATA" && dir.ends_with(".dist-info"))
        || (name == "PKG-INFO" && dir.ends_with(".egg-info"))
        || name.ends_with(".egg-info")
    {
        return Some(Declares::Python);
    }
    if name == "package.json" {
        // node_modules/NAME/package.json or node_modules/@SCOPE/NAME/package.json.
        let parts: Vec<&str> = dir.split('/').collect();
        let n = parts.len();
        let direct = (n >= 2 && parts[n - 2] == "node_modules" && !parts[n - 1].starts_with('@'))
            || (n >= 3 && parts[n - 3] == "node_modules" && parts[n - 2].starts_with('@'));
        if direct {
            return Some(Declares::Npm);
        }
    }
    if mode & 0o111 != 0 {
        return Some(Declares::Binary);
    }
    None
}

/// What to do with an entry, by its path and type: whiteouts and links are recorded in
/// `scan` here; a declaring file's kind is returned for its content to be read.
fn judge(
    scan: &mut LayerScan,
    path: &str,
    is_file: bool,
    is_dir: bool,
    mode: u32,
) -> Option<Declares> {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if name == ".wh..wh..opq" {
        scan.opaque.push(dir.to_string());
        return None;
    }
    if let Some(hidden) = name.strip_prefix(".wh.") {
        scan.removed.push(if dir.is_empty() {
            hidden.to_string()
        } else {
            format!("{}/{}", dir, hidden)
        });
        return None;
    }
    if is_dir {
        // A directory hides nothing below it.
        return None;
    }
    if !is_file {
        // A link where a lower layer had a declaring file hides it.
        if classify(path, 0).is_some() {
            scan.removed.push(path.to_string());
        }
        return None;
    }
    classify(path, mode)
}

/// Record what the declaring file `path` (of `kind`) with content `bytes` declares.
fn record(scan: &mut LayerScan, path: String, kind: Declares, bytes: &[u8]) {
    let found = match kind {
        Declares::Binary => binary_packages(bytes, &path),
        Declares::Npm => npm_package(bytes, &path).into_iter().collect(),
        _ => {
            let text = String::from_utf8_lossy(bytes);
            match kind {
                Declares::Dpkg => dpkg_packages(&text, &path),
                Declares::Apk => apk_packages(&text, &path),
                Declares::Python => python_package(&text, &path).into_iter().collect(),
                Declares::OsRelease => {
                    scan.os_id = os_release_id(&text);
                    Vec::new()
                }
                Declares::Binary | Declares::Npm => Vec::new(),
            }
        }
    };
    if found.is_empty() {
        scan.removed.push(path);
    } else {
        scan.files.insert(path, found);
    }
}

/// Scan one layer blob (any compression builder reads).
pub fn scan_layer(path: &Path) -> io::Result<LayerScan> {
    let stream = crate::oci::unpack::open_layer(path)?;
    let mut archive = tar::Archive::new(stream);
    let mut scan = LayerScan {
        version: SCANNER_VERSION,
        ..LayerScan::default()
    };
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path()?.to_string_lossy().into_owned();
        let path = normalize(&raw);
        let header = entry.header();
        let mode = header.mode().unwrap_or(0);
        let size = header.size().unwrap_or(0);
        let t = header.entry_type();
        let Some(kind) = judge(&mut scan, &path, t.is_file(), t.is_dir(), mode) else {
            continue;
        };
        if kind != Declares::Binary && size > MAX_METADATA {
            scan.removed.push(path);
            continue;
        }
        if kind == Declares::Binary {
            let mut magic = [0u8; 4];
            let n = crate::oci::unpack::read_fill(&mut entry, &mut magic)?;
            if n < 4 || magic != *b"\x7fELF" {
                scan.removed.push(path);
                continue;
            }
            if size > MAX_BUFFERED_BINARY {
                let found = streamed_go_packages(&mut entry, &format!("/{}", path))?;
                if found.is_empty() {
                    scan.removed.push(path);
                } else {
                    scan.files.insert(path, found);
                }
                continue;
            }
            let mut bytes = magic.to_vec();
            entry.read_to_end(&mut bytes)?;
            record(&mut scan, path, kind, &bytes);
            continue;
        }
        let mut bytes = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut bytes)?;
        record(&mut scan, path, kind, &bytes);
    }
    Ok(scan)
}

/// What the stream scanner does with the data of the entry it is in.
enum Capture {
    /// Nothing: the bytes pass.
    Skip,
    /// A PAX extended header (its `path` names the next entry).
    Pax(Vec<u8>),
    /// A GNU long name.
    LongName(Vec<u8>),
    /// A declaring file's content.
    Entry {
        path: String,
        kind: Declares,
        bytes: Vec<u8>,
    },
}

/// Scans a layer's tar as it is written (it sees the uncompressed stream), so that a layer
/// builder writes never has to be decompressed again for the SBOM. Its result is
/// [`scan_layer`]'s; when the stream holds what it does not take on (a binary too big to
/// hold, a tar it cannot follow), it gives none and the blob is scanned instead.
pub struct StreamScanner {
    scan: LayerScan,
    header: Vec<u8>,
    /// Data bytes left in the current entry, then padding bytes to skip.
    left: u64,
    pad: u64,
    capture: Capture,
    next_path: Option<String>,
    failed: bool,
}

impl Default for StreamScanner {
    fn default() -> Self {
        StreamScanner {
            scan: LayerScan {
                version: SCANNER_VERSION,
                ..LayerScan::default()
            },
            header: Vec::with_capacity(512),
            left: 0,
            pad: 0,
            capture: Capture::Skip,
            next_path: None,
            failed: false,
        }
    }
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl StreamScanner {
    /// The scan, unless the stream held something it could not follow.
    pub fn finish(self) -> Option<LayerScan> {
        (!self.failed).then_some(self.scan)
    }

    fn on_header(&mut self) {
        let h = std::mem::take(&mut self.header);
        if h.iter().all(|&b| b == 0) {
            return;
        }
        use crate::oci::tar::{tar_checksum_ok, tar_number};
        let (Some(size), Some(mode)) = (tar_number(&h[124..136]), tar_number(&h[100..108])) else {
            self.failed = true;
            return;
        };
        if !tar_checksum_ok(&h) {
            self.failed = true;
            return;
        }
        self.left = size;
        self.pad = (512 - size % 512) % 512;
        let typeflag = h[156];
        let path = match self.next_path.take() {
            Some(p) => p,
            None => {
                let name = cstr(&h[0..100]);
                let prefix = if &h[257..262] == b"ustar" {
                    cstr(&h[345..500])
                } else {
                    String::new()
                };
                if prefix.is_empty() {
                    name
                } else {
                    format!("{}/{}", prefix, name)
                }
            }
        };
        self.capture = match typeflag {
            b'x' if size <= MAX_METADATA => Capture::Pax(Vec::new()),
            b'L' if size <= MAX_METADATA => Capture::LongName(Vec::new()),
            b'x' | b'L' => {
                self.failed = true;
                Capture::Skip
            }
            b'g' => Capture::Skip,
            _ => {
                let path = normalize(&path);
                let is_file = typeflag == b'0' || typeflag == 0 || typeflag == b'7';
                match judge(
                    &mut self.scan,
                    &path,
                    is_file,
                    typeflag == b'5',
                    mode as u32,
                ) {
                    None => Capture::Skip,
                    Some(Declares::Binary) if size > MAX_BUFFERED_BINARY => {
                        // Streaming search for Go build info is the blob scan's to do.
                        self.failed = true;
                        Capture::Skip
                    }
                    Some(kind) if kind != Declares::Binary && size > MAX_METADATA => {
                        self.scan.removed.push(path);
                        Capture::Skip
                    }
                    Some(kind) => Capture::Entry {
                        path,
                        kind,
                        bytes: Vec::with_capacity(size.min(1 << 20) as usize),
                    },
                }
            }
        };
        if size == 0 {
            self.end_entry();
        }
    }

    fn end_entry(&mut self) {
        match std::mem::replace(&mut self.capture, Capture::Skip) {
            Capture::Skip => {}
            Capture::Pax(b) => {
                let text = String::from_utf8_lossy(&b).into_owned();
                // Records are "LEN key=value\n".
                for rec in text.split('\n') {
                    if let Some((_, kv)) = rec.split_once(' ') {
                        if let Some(p) = kv.strip_prefix("path=") {
                            self.next_path = Some(p.to_string());
                        }
                    }
                }
            }
            Capture::LongName(b) => self.next_path = Some(cstr(&b)),
            Capture::Entry { path, kind, bytes } => {
                if kind == Declares::Binary && !bytes.starts_with(b"\x7fELF") {
                    self.scan.removed.push(path);
                } else {
                    record(&mut self.scan, path, kind, &bytes);
                }
            }
        }
    }
}

impl Write for StreamScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() && !self.failed {
            if self.left > 0 {
                let n = (self.left.min(rest.len() as u64)) as usize;
                match &mut self.capture {
                    Capture::Pax(b) | Capture::LongName(b) => b.extend_from_slice(&rest[..n]),
                    Capture::Entry { bytes, .. } => bytes.extend_from_slice(&rest[..n]),
                    Capture::Skip => {}
                }
                self.left -= n as u64;
                rest = &rest[n..];
                if self.left == 0 {
                    self.end_entry();
                }
            } else if self.pad > 0 {
                let n = (self.pad.min(rest.len() as u64)) as usize;
                self.pad -= n as u64;
                rest = &rest[n..];
            } else {
                let n = (512 - self.header.len()).min(rest.len());
                self.header.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if self.header.len() == 512 {
                    self.on_header();
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Keep a layer's scan (made while it was written) for [`scan_cached`].
/// Where the scan of the layer `diff_id` is kept in `cache_dir`.
pub fn scan_path(cache_dir: &Path, diff_id: &Digest) -> std::path::PathBuf {
    cache_dir.join(format!("{}.json", diff_id.hex()))
}

pub fn store_scan(cache_dir: &Path, diff_id: &Digest, scan: &LayerScan) {
    if std::fs::create_dir_all(cache_dir).is_ok() {
        if let Ok(bytes) = serde_json::to_vec(scan) {
            // A lost write only costs a rescan.
            let _ = crate::oci::blobs::write_atomic(&scan_path(cache_dir, diff_id), &bytes);
        }
    }
}

/// The scan of the layer `diff_id` an earlier build kept in `cache_dir`, if this scanner's.
pub fn cached_scan(cache_dir: &Path, diff_id: &Digest) -> Option<LayerScan> {
    std::fs::read(scan_path(cache_dir, diff_id))
        .ok()
        .and_then(|b| serde_json::from_slice::<LayerScan>(&b).ok())
        .filter(LayerScan::is_current)
}

impl LayerScan {
    /// Whether this scanner version made it (an older one's is scanned again).
    pub fn is_current(&self) -> bool {
        self.version == SCANNER_VERSION
    }
}

/// The scan of `layer`, from `cache_dir` when an earlier build scanned it.
pub fn scan_cached(
    blobs: &crate::oci::blobs::BlobStore,
    layer: &LayerRef,
    cache_dir: &Path,
) -> io::Result<LayerScan> {
    if let Some(scan) = cached_scan(cache_dir, &layer.diff_id) {
        return Ok(scan);
    }
    let path = blobs
        .ensure(&layer.digest)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let scan = scan_layer(&path)?;
    store_scan(cache_dir, &layer.diff_id, &scan);
    Ok(scan)
}

/// Whether `path` is `root` or lies below it.
fn under(path: &str, root: &str) -> bool {
    root.is_empty()
        || path == root
        || (path.len() > root.len()
            && path.starts_with(root)
            && path.as_bytes()[root.len()] == b'/')
}

/// The packages of the root filesystem the layers (bottom first) make, sorted, and the
/// distribution id.
pub fn merge(scans: &[LayerScan]) -> (Vec<Package>, Option<String>) {
    let mut files: BTreeMap<String, Vec<Package>> = BTreeMap::new();
    let mut os_id = None;
    for s in scans {
        for dir in &s.opaque {
            files.retain(|p, _| !(under(p, dir) && p != dir));
        }
        for gone in &s.removed {
            files.retain(|p, _| !under(p, gone));
        }
        for (p, pkgs) in &s.files {
            files.insert(p.clone(), pkgs.clone());
        }
        if s.os_id.is_some() {
            os_id = s.os_id.clone();
        }
    }
    let mut all: Vec<Package> = files.into_values().flatten().collect();
    all.sort();
    all.dedup();
    (all, os_id)
}

/// RFC 822-style paragraphs (dpkg status, Python metadata): field -> value, continuation
/// lines joined.
fn paragraphs(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut cur: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            last = None;
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = last.as_ref().and_then(|k| cur.get_mut(k)) {
                v.push('\n');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_string();
            cur.entry(k.clone()).or_insert_with(|| v.trim().to_string());
            last = Some(k);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn dpkg_packages(text: &str, location: &str) -> Vec<Package> {
    paragraphs(text)
        .into_iter()
        .filter(|p| {
            // A status file also lists removed packages ("deinstall ok config-files").
            p.get("Status")
                .map(|s| s.split_whitespace().last() == Some("installed"))
                .unwrap_or(true)
        })
        .filter_map(|p| {
            Some(Package {
                kind: "deb".into(),
                name: p.get("Package")?.clone(),
                version: p.get("Version")?.clone(),
                location: format!("/{}", location),
                arch: p.get("Architecture").cloned(),
            })
        })
        .collect()
}

fn apk_packages(text: &str, location: &str) -> Vec<Package> {
    let mut out = Vec::new();
    let mut fields: BTreeMap<char, String> = BTreeMap::new();
    let mut flush = |fields: &mut BTreeMap<char, String>| {
        if let (Some(n), Some(v)) = (fields.get(&'P'), fields.get(&'V')) {
            out.push(Package {
                kind: "apk".into(),
                name: n.clone(),
                version: v.clone(),
                location: format!("/{}", location),
                arch: fields.get(&'A').cloned(),
            });
        }
        fields.clear();
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut fields);
            continue;
        }
        let mut chars = line.chars();
        if let (Some(k), Some(':')) = (chars.next(), chars.next()) {
            fields
                .entry(k)
                .or_insert_with(|| chars.as_str().to_string());
        }
    }
    flush(&mut fields);
    out
}

fn python_package(text: &str, location: &str) -> Option<Package> {
    let head = paragraphs(text).into_iter().next()?;
    Some(Package {
        kind: "pypi".into(),
        name: head.get("Name")?.clone(),
        version: head.get("Version")?.clone(),
        location: format!("/{}", location),
        arch: None,
    })
}

fn npm_package(bytes: &[u8], location: &str) -> Option<Package> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    Some(Package {
        kind: "npm".into(),
        name: v["name"].as_str()?.to_string(),
        version: v["version"].as_str()?.to_string(),
        location: format!("/{}", location),
        arch: None,
    })
}

fn os_release_id(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix("ID=")?;
        Some(v.trim().trim_matches('"').to_string())
    })
}

/// An ELF file's sections by name: (offset, size) of each, bounds-checked.
fn elf_section<'a>(bytes: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return None;
    }
    let is64 = bytes[4] == 2;
    let le = bytes[5] == 1;
    let rd = |off: usize, n: usize| -> Option<u64> {
        let b = bytes.get(off..off.checked_add(n)?)?;
        let mut v: u64 = 0;
        for i in 0..n {
            let byte = if le { b[n - 1 - i] } else { b[i] };
            v = (v << 8) | byte as u64;
        }
        Some(v)
    };
    let (shoff, shentsize, shnum, shstrndx) = if is64 {
        (rd(0x28, 8)?, rd(0x3a, 2)?, rd(0x3c, 2)?, rd(0x3e, 2)?)
    } else {
        (rd(0x20, 4)?, rd(0x2e, 2)?, rd(0x30, 2)?, rd(0x32, 2)?)
    };
    let header = |i: u64| -> Option<(u64, u64, u64)> {
        let base = usize::try_from(shoff.checked_add(i.checked_mul(shentsize)?)?).ok()?;
        if is64 {
            Some((rd(base, 4)?, rd(base + 0x18, 8)?, rd(base + 0x20, 8)?))
        } else {
            Some((rd(base, 4)?, rd(base + 0x10, 4)?, rd(base + 0x14, 4)?))
        }
    };
    let slice = |off: u64, size: u64| -> Option<&'a [u8]> {
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        bytes.get(start..end)
    };
    let (_, stroff, strsize) = header(shstrndx)?;
    let names = slice(stroff, strsize)?;
    for i in 0..shnum.min(4096) {
        let (name_off, off, size) = header(i)?;
        let name = names.get(usize::try_from(name_off).ok()?..)?;
        let end = name.iter().position(|&b| b == 0)?;
        if &name[..end] == wanted.as_bytes() {
            return slice(off, size);
        }
    }
    None
}

/// Packages a binary declares: Go modules, or cargo-auditable crates.
fn binary_packages(bytes: &[u8], path: &str) -> Vec<Package> {
    let location = format!("/{}", path);
    let mut out = Vec::new();
    if let Some(info) = elf_section(bytes, ".go.buildinfo") {
        out.extend(go_packages(info, &location));
    }
    if let Some(dep) = elf_section(bytes, ".dep-v0") {
        out.extend(cargo_packages(dep, &location));
    }
    out
}

/// Go's build info in a binary too large to hold: the stream is searched for its magic, and
/// what follows a match is parsed (a match that does not parse, such as the string in Go's
/// own debug/buildinfo code, is passed over).
fn streamed_go_packages(r: &mut impl Read, location: &str) -> io::Result<Vec<Package>> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    /// What a match may need after it: the header and two length-prefixed strings.
    const TAIL: usize = 4 << 20;
    let mut window: Vec<u8> = Vec::with_capacity(2 * TAIL);
    let mut chunk = vec![0u8; 1 << 20];
    let mut eof = false;
    loop {
        while !eof && window.len() < 2 * TAIL {
            let n = r.read(&mut chunk)?;
            if n == 0 {
                eof = true;
            }
            window.extend_from_slice(&chunk[..n]);
        }
        let searchable = if eof {
            window.len()
        } else {
            window.len() - TAIL
        };
        // A match may start anywhere before `searchable`; it may end past it.
        let end = (searchable + MAGIC.len() - 1).min(window.len());
        let mut at = 0;
        while let Some(p) = window[at..end]
            .windows(MAGIC.len())
            .position(|w| w == MAGIC)
        {
            let found = go_packages(&window[at + p..], location);
            if !found.is_empty() {
                // The rest of the binary is drained so the archive can go on.
                io::copy(r, &mut io::sink())?;
                return Ok(found);
            }
            at += p + 1;
            if at >= searchable {
                break;
            }
        }
        if eof {
            return Ok(Vec::new());
        }
        window.drain(..searchable);
    }
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Go's build info (Go 1.18+, strings inline): the toolchain, the main module and every
/// dependency module.
fn go_packages(info: &[u8], location: &str) -> Vec<Package> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if info.len() < 32 || !info.starts_with(MAGIC) || info[15] & 2 == 0 {
        return Vec::new();
    }
    let mut rest = &info[32..];
    let mut strings = Vec::new();
    for _ in 0..2 {
        let Some((n, k)) = uvarint(rest) else {
            return Vec::new();
        };
        let Some(s) = usize::try_from(n)
            .ok()
            .and_then(|n| rest.get(k..k.checked_add(n)?))
        else {
            return Vec::new();
        };
        strings.push(String::from_utf8_lossy(s).into_owned());
        rest = &rest[k + s.len()..];
    }
    let (go_version, modinfo) = (&strings[0], &strings[1]);
    let mut out = vec![Package {
        kind: "golang".into(),
        name: "stdlib".into(),
        version: go_version.clone(),
        location: location.to_string(),
        arch: None,
    }];
    // The module lines sit between two 16-byte sentinels.
    let body = if modinfo.len() >= 33 {
        modinfo.get(16..modinfo.len() - 16).unwrap_or(modinfo)
    } else {
        modinfo.as_str()
    };
    for line in body.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if (f.first() == Some(&"mod") || f.first() == Some(&"dep")) && f.len() >= 3 {
            out.push(Package {
                kind: "golang".into(),
                name: f[1].to_string(),
                version: f[2].to_string(),
                location: location.to_string(),
                arch: None,
            });
        }
    }
    out
}

/// cargo-auditable's dependency list: zlib-compressed JSON.
fn cargo_packages(section: &[u8], location: &str) -> Vec<Package> {
    let mut json = Vec::new();
    let decoder = flate2::read::ZlibDecoder::new(section);
    if decoder.take(8 << 20).read_to_end(&mut json).is_err() {
        return Vec::new();
    }
    let Ok(v) = serde_json::from_slice::<Value>(&json) else {
        return Vec::new();
    };
    v["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"].as_str() != Some("build"))
        .filter_map(|p| {
            Some(Package {
                kind: "cargo".into(),
                name: p["name"].as_str()?.to_string(),
                version: p["version"].as_str()?.to_string(),
                location: location.to_string(),
                arch: None,
            })
        })
        .collect()
}

/// Percent-encode a purl component.
fn purl_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{:02X}", b));
        }
    }
    out
}

/// The package URL of `p`.
pub fn purl(p: &Package, os_id: Option<&str>) -> String {
    let version = purl_escape(&p.version);
    let arch = p
        .arch
        .as_ref()
        .map(|a| format!("?arch={}", purl_escape(a)))
        .unwrap_or_default();
    match p.kind.as_str() {
        "deb" => format!(
            "pkg:deb/{}/{}@{}{}",
            purl_escape(os_id.unwrap_or("debian")),
            purl_escape(&p.name),
            version,
            arch
        ),
        "apk" => format!(
            "pkg:apk/{}/{}@{}{}",
            purl_escape(os_id.unwrap_or("alpine")),
            purl_escape(&p.name),
            version,
            arch
        ),
        "npm" => match p.name.split_once('/') {
            Some((scope, name)) if scope.starts_with('@') => format!(
                "pkg:npm/{}/{}@{}",
                purl_escape(scope),
                purl_escape(name),
                version
            ),
            _ => format!("pkg:npm/{}@{}", purl_escape(&p.name), version),
        },
        "golang" => {
            let path: Vec<String> = p.name.split('/').map(purl_escape).collect();
            format!("pkg:golang/{}@{}", path.join("/"), version)
        }
        "pypi" => format!(
            "pkg:pypi/{}@{}",
            purl_escape(&p.name.to_lowercase().replace('_', "-")),
            version
        ),
        other => format!("pkg:{}/{}@{}", other, purl_escape(&p.name), version),
    }
}

/// An SPDX id character set: letters, digits, `.` and `-`.
fn spdx_id(prefix: &str, material: &str) -> String {
    let h = Digest::of(material.as_bytes());
    format!("SPDXRef-{}-{}", prefix, &h.hex()[..16])
}

/// The SPDX 2.3 document for the packages of an image of `platform`.
pub fn document(packages: &[Package], os_id: Option<&str>, platform: &str, epoch: i64) -> Value {
    let mut listed = vec![json!({
        "name": format!("image ({})", platform),
        "SPDXID": "SPDXRef-Image",
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    })];
    let mut seen = std::collections::BTreeSet::new();
    for p in packages {
        let material = format!("{}\0{}\0{}\0{}", p.kind, p.name, p.version, p.location);
        let id = spdx_id(&format!("Package-{}", p.kind), &material);
        if !seen.insert(id.clone()) {
            continue;
        }
        let mut pkg = json!({
            "name": p.name,
            "SPDXID": id,
            "versionInfo": p.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "sourceInfo": format!("found in {}", p.location),
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl(p, os_id),
            }],
        });
        if p.kind == "deb" || p.kind == "apk" {
            pkg["primaryPackagePurpose"] = json!("OPERATING-SYSTEM");
        } else {
            pkg["primaryPackagePurpose"] = json!("LIBRARY");
        }
        listed.push(pkg);
        relationships.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    let content = Digest::of(&canonical_json(&json!([listed, relationships, platform])));
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("sbom-{}", platform.replace('/', "-")),
        "documentNamespace": format!("https://spdx.org/spdxdocs/builder-{}", content.hex()),
        "creationInfo": {
            "created": rfc3339(epoch),
            "creators": [format!("Tool: builder-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": listed,
        "relationships": relationships,
    })
}

/// The SBOM statement about `manifest`.
pub fn statement(document: Value, platform: &str, manifest: &Digest) -> Value {
    json!({
        "_type": super::provenance::STATEMENT_TYPE,
        "subject": [{"name": platform, "digest": {"sha256": manifest.hex()}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": document,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dpkg_apk_python_npm() {
        let status = "Package: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2-1\nDescription: x\n more\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\n";
        let d = dpkg_packages(status, "var/lib/dpkg/status");
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].name.as_str(), d[0].version.as_str()),
            ("bash", "5.2-1")
        );
        let apk = "C:Q1x\nP:musl\nV:1.2.4-r2\nA:x86_64\n\nP:busybox\nV:1.36.1-r5\n";
        let a = apk_packages(apk, "lib/apk/db/installed");
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].name, "busybox");
        let meta = "Metadata-Version: 2.1\nName: requests\nVersion: 2.31.0\n\nbody";
        assert_eq!(python_package(meta, "x").unwrap().version, "2.31.0");
        let n = npm_package(br#"{"name":"@s/left-pad","version":"1.3.0"}"#, "x").unwrap();
        assert_eq!(purl(&n, None), "pkg:npm/%40s/left-pad@1.3.0");
        assert_eq!(
            classify("app/node_modules/@s/left-pad/package.json", 0o644),
            Some(Declares::Npm)
        );
        assert_eq!(classify("app/node_modules/x/lib/package.json", 0o644), None);
        assert_eq!(classify("app/package.json", 0o644), None);
    }

    /// A minimal ELF64 with one named section.
    fn elf_with(section: &str, data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        let data_off = b.len();
        b.extend_from_slice(data);
        let names_off = b.len();
        let names = format!("\0{}\0.shstrtab\0", section);
        b.extend_from_slice(names.as_bytes());
        let shoff = b.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            b.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, data_off, data.len());
        sh(section.len() as u32 + 2, names_off, names.len());
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        b[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        b
    }

    #[test]
    fn reads_go_build_info() {
        let sentinel = "0123456789abcdef";
        let modinfo = format!(
            "{}path\texample.com/app\nmod\texample.com/app\t(devel)\t\ndep\tgolang.org/x/text\tv0.14.0\th1:x\n{}",
            sentinel, sentinel
        );
        let mut info = b"\xff Go buildinf:".to_vec();
        info.push(8);
        info.push(2);
        info.resize(32, 0);
        for s in ["go1.21.5", modinfo.as_str()] {
            info.push(s.len() as u8 | 0x80);
            info.push((s.len() >> 7) as u8);
            info.extend_from_slice(s.as_bytes());
        }
        let elf = elf_with(".go.buildinfo", &info);
        let found = binary_packages(&elf, "usr/bin/app");
        let names: Vec<(&str, &str)> = found
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("stdlib", "go1.21.5"),
                ("example.com/app", "(devel)"),
                ("golang.org/x/text", "v0.14.0")
            ]
        );
    }

    #[test]
    fn streams_go_build_info_of_large_binaries() {
        let modinfo = "0123456789abcdefmod\tx.io/big\t(devel)\t\n0123456789abcdef";
        let mut info = b"\xff Go buildinf:".to_vec();
        info.push(8);
        info.push(2);
        info.resize(32, 0);
        for s in ["go1.22.0", modinfo] {
            info.push(s.len() as u8);
            info.extend_from_slice(s.as_bytes());
        }
        // A decoy first (the magic without valid info), then the info across a window edge.
        for offset in [(4 << 20) - 5, 1000, (9 << 20) + 3] {
            let mut big = vec![0u8; offset];
            big[10..24].copy_from_slice(b"\xff Go buildinf:");
            big.extend_from_slice(&info);
            big.resize(big.len() + (3 << 20), 0);
            let found = streamed_go_packages(&mut big.as_slice(), "/big").unwrap();
            let names: Vec<&str> = found.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, vec!["stdlib", "x.io/big"], "offset {}", offset);
        }
    }

    #[test]
    fn reads_cargo_auditable() {
        let json = br#"{"packages":[{"name":"app","version":"0.1.0","source":"local","root":true},{"name":"serde","version":"1.0.190","source":"crates.io","dependencies":[]},{"name":"cc","version":"1.0.0","source":"crates.io","kind":"build"}]}"#;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut z, json).unwrap();
        let elf = elf_with(".dep-v0", &z.finish().unwrap());
        let found = binary_packages(&elf, "usr/bin/app");
        let names: Vec<&str> = found.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["app", "serde"]);
        // Truncated or hostile section tables are ignored, never a panic.
        for cut in [10, 63, 64, 100, elf.len() - 1] {
            let _ = binary_packages(&elf[..cut], "x");
        }
    }

    #[test]
    fn the_stream_scanner_finds_what_the_blob_scan_finds() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, mode: u32, body: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_mode(mode);
            h.set_entry_type(tar::EntryType::Regular);
            // Long names go through PAX or GNU records, as layer writers make them.
            b.append_data(&mut h, path, body).unwrap();
        };
        add(
            "var/lib/dpkg/status",
            0o644,
            b"Package: a\nVersion: 1\n\nPackage: b\nVersion: 2\n",
        );
        add("lib/apk/db/installed", 0o644, b"P:musl\nV:1.2\n");
        let deep = format!("app/{}/node_modules/x/package.json", "d/".repeat(60));
        add(&deep, 0o644, br#"{"name":"x","version":"3"}"#);
        add("usr/bin/tool", 0o755, b"#!/bin/sh\necho not elf\n");
        add("srv/.wh.old", 0o644, b"");
        add("opt/.wh..wh..opq", 0o644, b"");
        let tar = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("layer.tar");
        std::fs::write(&p, &tar).unwrap();
        let from_blob = scan_layer(&p).unwrap();
        for piece in [1usize, 511, 512, 4096] {
            let mut s = StreamScanner::default();
            for c in tar.chunks(piece) {
                s.write_all(c).unwrap();
            }
            let streamed = s.finish().expect("the stream is followed");
            assert_eq!(
                serde_json::to_string(&streamed).unwrap(),
                serde_json::to_string(&from_blob).unwrap(),
                "written in pieces of {}",
                piece
            );
        }
        assert_eq!(from_blob.files.len(), 3, "{:?}", from_blob.files);
    }

    #[test]
    fn later_layers_hide_lower_packages() {
        let pkg = |n: &str| Package {
            kind: "npm".into(),
            name: n.into(),
            version: "1".into(),
            location: format!("/app/node_modules/{}/package.json", n),
            arch: None,
        };
        let mut lower = LayerScan::default();
        lower
            .files
            .insert("app/node_modules/a/package.json".into(), vec![pkg("a")]);
        lower
            .files
            .insert("app/node_modules/b/package.json".into(), vec![pkg("b")]);
        lower
            .files
            .insert("srv/node_modules/c/package.json".into(), vec![pkg("c")]);
        let upper = LayerScan {
            removed: vec!["app/node_modules/a".into()],
            opaque: vec!["srv".into()],
            ..LayerScan::default()
        };
        let (found, _) = merge(&[lower, upper]);
        let names: Vec<&str> = found.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["b"]);
    }
}
