//! The tar format's own parts, below layers: reading a header's numbers and checksum, and
//! writing entries with PAX records where a ustar header cannot hold the truth (long names
//! and links, large ids, xattrs). Knows nothing of layers or compression.

use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A numeric field of a tar header: octal, or base-256 (high bit set) as tar writes sizes of
/// 8 GiB and more; `None` when it is neither.
pub fn tar_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        return Some(
            field[1..]
                .iter()
                .fold(0u64, |v, b| v.saturating_mul(256).saturating_add(*b as u64)),
        );
    }
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Whether a 512-byte tar header's checksum field matches its bytes.
pub fn tar_checksum_ok(header: &[u8]) -> bool {
    if header.len() != 512 {
        return false;
    }
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                *b as u64
            }
        })
        .sum();
    tar_number(&header[148..156]) == Some(sum)
}

const USTAR_ID_MAX: u64 = 0o7777777;

/// Append one entry, with PAX records where the ustar header cannot hold the truth.
pub fn append<W: Write, R: io::Read>(
    b: &mut tar::Builder<W>,
    h: tar::Header,
    name: &[u8],
    link: Option<&[u8]>,
    xattrs: &[(String, Vec<u8>)],
    data: R,
) -> io::Result<()> {
    let h = entry_header(b, h, name, link, xattrs)?;
    b.append(&h, data)
}

/// How much of a big file is read at a time (the tar crate copies 8 KiB at a time).
pub const COPY_BUFFER: usize = 1 << 20;

/// A file's entry, like [`append`], its bytes copied `buf.len()` at a time: a 100 MB file
/// costs a hundred reads and writes, not thirteen thousand.
pub fn append_file<W: Write>(
    b: &mut tar::Builder<W>,
    h: tar::Header,
    name: &[u8],
    xattrs: &[(String, Vec<u8>)],
    data: &mut impl io::Read,
    buf: &mut [u8],
) -> io::Result<()> {
    let h = entry_header(b, h, name, None, xattrs)?;
    let w = b.get_mut();
    w.write_all(h.as_bytes())?;
    let len = copy_in_pieces(data, w, buf)?;
    // Padded to a whole block, as the tar crate pads.
    let rest = (512 - len % 512) % 512;
    w.write_all(&[0u8; 512][..rest as usize])
}

/// Copy all of `r` into `w`, `buf.len()` bytes at a time; returns how many.
pub fn copy_in_pieces(
    r: &mut impl io::Read,
    w: &mut impl Write,
    buf: &mut [u8],
) -> io::Result<u64> {
    let mut len = 0u64;
    loop {
        let n = match r.read(buf) {
            Ok(0) => return Ok(len),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        len += n as u64;
    }
}

/// The header of an entry, with a PAX record first for whatever ustar cannot hold.
pub fn entry_header<W: Write>(
    b: &mut tar::Builder<W>,
    mut h: tar::Header,
    name: &[u8],
    link: Option<&[u8]>,
    xattrs: &[(String, Vec<u8>)],
) -> io::Result<tar::Header> {
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    if h.set_path(Path::new(std::ffi::OsStr::from_bytes(name)))
        .is_err()
        || name.len() > 100
    {
        pax.push(("path".into(), name.to_vec()));
        set_raw_name(&mut h, name);
    }
    if let Some(l) = link {
        if l.len() > 100 || h.set_link_name_literal(l).is_err() {
            pax.push(("linkpath".into(), l.to_vec()));
            let cut = &l[..l.len().min(100)];
            let _ = h.set_link_name_literal(cut);
        }
    }
    let (uid, gid) = (h.uid()?, h.gid()?);
    if uid > USTAR_ID_MAX {
        pax.push(("uid".into(), uid.to_string().into_bytes()));
        h.set_uid(0);
    }
    if gid > USTAR_ID_MAX {
        pax.push(("gid".into(), gid.to_string().into_bytes()));
        h.set_gid(0);
    }
    for (k, v) in xattrs {
        pax.push((format!("SCHILY.xattr.{}", k), v.clone()));
    }
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    h.set_cksum();
    Ok(h)
}

/// Put a (truncated) name straight into the header bytes; the PAX `path` record holds the truth.
fn set_raw_name(h: &mut tar::Header, name: &[u8]) {
    let old = h.as_old_mut();
    old.name = [0; 100];
    let n = name.len().min(100);
    old.name[..n].copy_from_slice(&name[..n]);
}
