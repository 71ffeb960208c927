//! `--squash`: several layers, applied in order, as one layer's tar stream.
//!
//! Two passes over the layers. The first learns, for every path, which entry the stack ends
//! with (the last one written, unless a later whiteout or a non-directory above it took it
//! away) and what the stack deletes from below it. The second copies those entries, in the
//! layers' order, after the whiteouts: `.wh.NAME` for what was deleted, and
//! `DIR/.wh..wh..opq` for a directory whose lower content was hidden and that exists again.
//! The whiteouts come first so that any applier, whatever it remembers of what it unpacked,
//! removes the lower content before the new content arrives. Same layers, same bytes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::tar::{append, append_file, COPY_BUFFER};
use super::unpack::{clean_entry, open_layer};

const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// Where an entry is: (layer, index in that layer).
type At = (usize, usize);

/// The entry a path ends with.
#[derive(Clone, Copy)]
struct Kept {
    at: At,
    is_dir: bool,
}

/// What the first pass learns.
#[derive(Default)]
struct Plan {
    kept: BTreeMap<Vec<u8>, Kept>,
    /// Paths the stack deletes from the layers below it.
    whiteouts: BTreeSet<Vec<u8>>,
    /// Directories whose lower content the stack hides (an opaque marker, or a whiteout
    /// followed by a new directory of that name).
    hidden_below: BTreeSet<Vec<u8>>,
    /// Hard links: (their place, their path, the path they name).
    links: Vec<(At, Vec<u8>, Vec<u8>)>,
}

/// The keys of `map` strictly below the directory `dir`.
fn below<V>(map: &BTreeMap<Vec<u8>, V>, dir: &[u8]) -> Vec<Vec<u8>> {
    map.range(bounds(dir)).map(|(k, _)| k.clone()).collect()
}

fn below_set(set: &BTreeSet<Vec<u8>>, dir: &[u8]) -> Vec<Vec<u8>> {
    set.range(bounds(dir)).cloned().collect()
}

/// `dir/` up to (not including) `dir0`: every path below `dir`, since `0` follows `/`.
fn bounds(dir: &[u8]) -> std::ops::Range<Vec<u8>> {
    let mut start = dir.to_vec();
    let mut end = dir.to_vec();
    if !dir.is_empty() {
        start.push(b'/');
        end.push(b'0');
    } else {
        // The root: everything.
        end = vec![0xff; 1];
    }
    start..end
}

impl Plan {
    /// Forget what layers before `layer` put at or below `path` (`at_too`: `path` itself).
    fn drop_lower(&mut self, path: &[u8], at_too: bool, layer: usize) {
        for k in below(&self.kept, path) {
            if self.kept.get(&k).is_some_and(|e| e.at.0 < layer) {
                self.kept.remove(&k);
            }
        }
        if at_too && self.kept.get(path).is_some_and(|e| e.at.0 < layer) {
            self.kept.remove(path);
        }
        // What was deleted or hidden below is moot now.
        for k in below_set(&self.whiteouts, path) {
            self.whiteouts.remove(&k);
        }
        for k in below_set(&self.hidden_below, path) {
            self.hidden_below.remove(&k);
        }
    }

    fn entry(&mut self, path: Vec<u8>, at: At, is_dir: bool) {
        let replaced_dir = self.kept.get(&path).is_some_and(|e| e.is_dir);
        if replaced_dir && !is_dir {
            // A file where a directory was: nothing below it stays.
            self.drop_lower(&path, false, at.0);
        }
        if self.whiteouts.remove(&path) && is_dir {
            // Deleted, then made again as a directory: the lower one's content stays hidden.
            self.hidden_below.insert(path.clone());
        }
        if !is_dir {
            // A non-directory replaces whatever is below it by itself.
            self.hidden_below.remove(&path);
        }
        self.kept.insert(path, Kept { at, is_dir });
    }
}

fn path_of(name: &[u8]) -> io::Result<Vec<u8>> {
    clean_entry(name)
        .map(|p| p.as_os_str().as_bytes().to_vec())
        .map_err(io::Error::other)
}

/// Write the tar stream of `layers` (blob paths, lowest first) squashed into one.
pub fn write_squashed<W: Write>(layers: &[&Path], w: W) -> io::Result<W> {
    let mut plan = Plan::default();
    for (li, layer) in layers.iter().enumerate() {
        let mut archive = tar::Archive::new(open_layer(layer)?);
        for (n, e) in archive.entries()?.enumerate() {
            let e = e?;
            let path = path_of(&e.path_bytes())?;
            if path.is_empty() {
                continue;
            }
            let (parent, base) = match path.iter().rposition(|b| *b == b'/') {
                Some(i) => (path[..i].to_vec(), path[i + 1..].to_vec()),
                None => (Vec::new(), path.clone()),
            };
            if base == OPAQUE {
                plan.drop_lower(&parent, false, li);
                plan.hidden_below.insert(parent);
            } else if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
                let mut target = parent.clone();
                if !target.is_empty() {
                    target.push(b'/');
                }
                target.extend_from_slice(hidden);
                plan.drop_lower(&target, true, li);
                plan.hidden_below.remove(&target);
                plan.whiteouts.insert(target);
            } else {
                let kind = e.header().entry_type();
                if kind.is_hard_link() {
                    if let Some(target) = e.link_name_bytes() {
                        plan.links.push(((li, n), path.clone(), path_of(&target)?));
                    }
                }
                plan.entry(path, (li, n), kind.is_dir());
            }
        }
    }
    let keep: HashSet<At> = plan.kept.values().map(|k| k.at).collect();
    // A hard link must come after the entry it names, and that entry must be the one the
    // link was made to.
    for (at, link, target) in &plan.links {
        if !keep.contains(at) {
            continue;
        }
        let lost = match plan.kept.get(target) {
            Some(t) if t.at > *at => "replaced",
            None if plan.whiteouts.contains(target) => "deleted",
            _ => continue,
        };
        return Err(io::Error::other(format!(
            "/{} is a hard link to /{}, which a later step {}: one layer cannot hold both",
            String::from_utf8_lossy(link),
            String::from_utf8_lossy(target),
            lost
        )));
    }

    let mut b = tar::Builder::new(w);
    let marker = || -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for p in &plan.whiteouts {
        let (parent, name) = match p.iter().rposition(|b| *b == b'/') {
            Some(i) => (&p[..=i], &p[i + 1..]),
            None => (&p[..0], &p[..]),
        };
        let wh = [parent, WHITEOUT_PREFIX, name].concat();
        append(&mut b, marker(), &wh, None, &[], io::empty())?;
    }
    for d in &plan.hidden_below {
        if d.is_empty() || plan.kept.get(d).is_some_and(|k| k.is_dir) {
            let opq = if d.is_empty() {
                OPAQUE.to_vec()
            } else {
                [d.as_slice(), b"/", OPAQUE].concat()
            };
            append(&mut b, marker(), &opq, None, &[], io::empty())?;
        }
    }

    let mut buf = vec![0u8; COPY_BUFFER];
    for (li, layer) in layers.iter().enumerate() {
        let mut archive = tar::Archive::new(open_layer(layer)?);
        for (n, e) in archive.entries()?.enumerate() {
            let mut e = e?;
            if !keep.contains(&(li, n)) {
                continue;
            }
            copy_entry(&mut b, &mut e, &mut buf)?;
        }
    }
    b.into_inner()
}

/// Copy one entry as this crate writes entries: a ustar header, PAX records where it
/// cannot hold the truth, the entry's xattrs.
fn copy_entry<W: Write, R: Read>(
    b: &mut tar::Builder<W>,
    e: &mut tar::Entry<R>,
    buf: &mut [u8],
) -> io::Result<()> {
    let src = e.header().clone();
    let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut uid, mut gid) = (src.uid()?, src.gid()?);
    if let Some(pax) = e.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key().map_err(io::Error::other)?;
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
            } else if key == "uid" {
                uid = ext.value().ok().and_then(|v| v.parse().ok()).unwrap_or(uid);
            } else if key == "gid" {
                gid = ext.value().ok().and_then(|v| v.parse().ok()).unwrap_or(gid);
            }
        }
    }
    let kind = src.entry_type();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(src.mode()?);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(src.mtime()?);
    h.set_size(if kind.is_file() { e.size() } else { 0 });
    if kind.is_character_special() || kind.is_block_special() {
        h.set_device_major(src.device_major()?.unwrap_or(0))?;
        h.set_device_minor(src.device_minor()?.unwrap_or(0))?;
    }
    let mut name = path_of(&e.path_bytes())?;
    if kind.is_dir() {
        name.push(b'/');
    }
    let link = if kind.is_hard_link() {
        e.link_name_bytes().map(|l| path_of(&l)).transpose()?
    } else {
        e.link_name_bytes().map(|l| l.into_owned())
    };
    if kind.is_file() {
        append_file(b, h, &name, &xattrs, e, buf)
    } else {
        append(b, h, &name, link.as_deref(), &xattrs, io::empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer from (name, kind, content) entries: kind `d` directory, `f` file, `l` hard
    /// link (content: its target).
    fn layer(dir: &Path, name: &str, entries: &[(&str, char, &str)]) -> std::path::PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, content) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_mode(if *kind == 'd' { 0o755 } else { 0o644 });
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            match kind {
                'd' => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{}/", path), io::empty())
                        .unwrap();
                }
                'l' => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, path, content).unwrap();
                }
                _ => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(content.len() as u64);
                    b.append_data(&mut h, path, content.as_bytes()).unwrap();
                }
            }
        }
        let p = dir.join(name);
        std::fs::write(&p, b.into_inner().unwrap()).unwrap();
        p
    }

    fn listing(tar_bytes: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut s = String::new();
                e.read_to_string(&mut s).unwrap();
                let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                if s.is_empty() {
                    name
                } else {
                    format!("{}={}", name, s)
                }
            })
            .collect()
    }

    #[test]
    fn the_last_entry_wins_and_deletions_become_whiteouts_first() {
        let t = tempfile::tempdir().unwrap();
        let l1 = layer(
            t.path(),
            "1",
            &[
                ("app", 'd', ""),
                ("app/a", 'f', "one"),
                ("app/tmp", 'f', "x"),
                ("gone", 'd', ""),
                ("gone/f", 'f', "g"),
            ],
        );
        let l2 = layer(
            t.path(),
            "2",
            &[
                ("app", 'd', ""),
                ("app/a", 'f', "two"),
                ("app/.wh.tmp", 'f', ""),
                (".wh.gone", 'f', ""),
                ("etc", 'd', ""),
                ("etc/.wh.motd", 'f', ""),
            ],
        );
        let l3 = layer(
            t.path(),
            "3",
            &[
                (".wh.app", 'f', ""),
                ("app", 'd', ""),
                ("app/new", 'f', "n"),
                ("link", 'l', "app/new"),
            ],
        );
        let out = write_squashed(&[&l1, &l2, &l3], Vec::new()).unwrap();
        assert_eq!(
            listing(&out),
            [
                "etc/.wh.motd",
                ".wh.gone",
                "app/.wh..wh..opq",
                "etc/",
                "app/",
                "app/new=n",
                "link",
            ]
        );
        // Same layers, same bytes.
        assert_eq!(out, write_squashed(&[&l1, &l2, &l3], Vec::new()).unwrap());
    }

    #[test]
    fn a_file_over_a_directory_drops_what_was_below_it() {
        let t = tempfile::tempdir().unwrap();
        let l1 = layer(t.path(), "1", &[("d", 'd', ""), ("d/x", 'f', "x")]);
        let l2 = layer(t.path(), "2", &[("d", 'f', "now a file")]);
        let out = write_squashed(&[&l1, &l2], Vec::new()).unwrap();
        assert_eq!(listing(&out), ["d=now a file"]);
    }

    #[test]
    fn a_hard_link_to_a_file_a_later_layer_replaced_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let l1 = layer(t.path(), "1", &[("a", 'f', "a"), ("b", 'l', "a")]);
        let l2 = layer(t.path(), "2", &[("a", 'f', "changed")]);
        let err = write_squashed(&[&l1, &l2], Vec::new()).unwrap_err();
        assert!(err.to_string().contains("/b is a hard link to /a"), "{err}");
    }
}
