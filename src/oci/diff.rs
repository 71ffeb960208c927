//! What differs between two images: the config (field by field), each layer (entry by entry:
//! content, mode, owner, mtime, link target, xattrs; whiteouts shown as deletions), and the
//! merged filesystem the layers produce.

use std::collections::BTreeMap;
use std::io::{self, Read};

use serde_json::{json, Value};

use super::blobs::{BlobError, BlobStore};
use super::digest::{Digest, HashingWriter};
use super::image::StoredImage;
use super::unpack::open_layer;

/// One file's description inside a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub kind: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub size: u64,
    pub link: String,
    pub xattrs: BTreeMap<String, String>,
    pub sha256: String,
}

/// A layer's entries by path; whiteouts are listed as `kind == "whiteout"` at the hidden path.
pub type LayerListing = BTreeMap<String, EntryInfo>;

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("layer {layer}: {source}")]
    Io { layer: String, source: io::Error },
}

/// List a layer blob.
pub fn list_layer(blobs: &BlobStore, digest: &Digest) -> Result<LayerListing, DiffError> {
    let io_e = |source| DiffError::Io {
        layer: digest.to_string(),
        source,
    };
    let path = blobs
        .ensure(digest)
        .map_err(|e| io_e(std::io::Error::other(e.to_string())))?;
    let mut a = tar::Archive::new(open_layer(&path).map_err(io_e)?);
    let mut out = BTreeMap::new();
    for e in a.entries().map_err(io_e)? {
        let mut e = e.map_err(io_e)?;
        let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let path = format!(
            "/{}",
            raw.trim_start_matches("./")
                .trim_start_matches('/')
                .trim_end_matches('/')
        );
        let h = e.header().clone();
        let mut xattrs = BTreeMap::new();
        if let Ok(Some(exts)) = e.pax_extensions() {
            for x in exts.flatten() {
                if let Some(k) = x.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                    xattrs.insert(k.to_string(), hex::encode(x.value_bytes()));
                }
            }
        }
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let mut w = HashingWriter::new(io::sink());
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).map_err(io_e)?;
        io::Write::write_all(&mut w, &buf).map_err(io_e)?;
        let (d, size, _) = w.finish();
        let name = path.rsplit('/').next().unwrap_or("").to_string();
        let (path, kind) = if name == ".wh..wh..opq" {
            (
                path[..path.len() - name.len()]
                    .trim_end_matches('/')
                    .to_string()
                    + "/*",
                "opaque".to_string(),
            )
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            (
                format!("{}{}", &path[..path.len() - name.len()], hidden),
                "whiteout".to_string(),
            )
        } else {
            let kind = match h.entry_type() {
                tar::EntryType::Directory => "dir",
                tar::EntryType::Symlink => "symlink",
                tar::EntryType::Link => "hardlink",
                tar::EntryType::Regular | tar::EntryType::Continuous => "file",
                _ => "special",
            };
            (path, kind.to_string())
        };
        out.insert(
            path,
            EntryInfo {
                kind,
                mode: h.mode().unwrap_or(0),
                uid: h.uid().unwrap_or(0),
                gid: h.gid().unwrap_or(0),
                mtime: h.mtime().unwrap_or(0),
                size,
                link,
                xattrs,
                sha256: if size > 0 {
                    d.to_string()
                } else {
                    String::new()
                },
            },
        );
    }
    Ok(out)
}

/// The fields that differ between two entries.
fn changed_fields(a: &EntryInfo, b: &EntryInfo) -> Vec<String> {
    let mut v = Vec::new();
    if a.kind != b.kind {
        v.push(format!("type {} -> {}", a.kind, b.kind));
    }
    if a.sha256 != b.sha256 || a.size != b.size {
        v.push(format!("content ({} bytes -> {} bytes)", a.size, b.size));
    }
    if a.mode != b.mode {
        v.push(format!("mode {:04o} -> {:04o}", a.mode, b.mode));
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        v.push(format!("owner {}:{} -> {}:{}", a.uid, a.gid, b.uid, b.gid));
    }
    if a.mtime != b.mtime {
        v.push(format!("mtime {} -> {}", a.mtime, b.mtime));
    }
    if a.link != b.link {
        v.push(format!("link target {:?} -> {:?}", a.link, b.link));
    }
    if a.xattrs != b.xattrs {
        v.push("xattrs".to_string());
    }
    v
}

/// Compare two listings into `(change, path, detail)` rows.
fn compare(a: &LayerListing, b: &LayerListing) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    for (p, ea) in a {
        match b.get(p) {
            None => rows.push(("removed".into(), p.clone(), String::new())),
            Some(eb) => {
                let f = changed_fields(ea, eb);
                if !f.is_empty() {
                    rows.push(("changed".into(), p.clone(), f.join(", ")));
                }
            }
        }
    }
    for p in b.keys() {
        if !a.contains_key(p) {
            let kind = if b[p].kind == "whiteout" {
                "deleted"
            } else {
                "added"
            };
            rows.push((kind.into(), p.clone(), String::new()));
        }
    }
    rows
}

/// The filesystem the layers produce, as a listing.
fn merged(layers: &[LayerListing]) -> LayerListing {
    let mut fs: LayerListing = BTreeMap::new();
    for l in layers {
        for (p, e) in l {
            match e.kind.as_str() {
                "whiteout" => {
                    let prefix = format!("{}/", p);
                    fs.retain(|k, _| k != p && !k.starts_with(&prefix));
                }
                "opaque" => {
                    let dir = p.trim_end_matches("/*");
                    let prefix = format!("{}/", dir);
                    fs.retain(|k, _| !k.starts_with(&prefix));
                }
                _ => {}
            }
        }
        for (p, e) in l {
            if e.kind != "whiteout" && e.kind != "opaque" {
                fs.insert(p.clone(), e.clone());
            }
        }
    }
    fs
}

/// Flatten JSON into `path -> value` for field-by-field comparison.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(
                    &if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{}.{}", prefix, k)
                    },
                    x,
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{}[{}]", prefix, i), x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The full difference report, as JSON (`identical` is true when the manifests match).
pub fn diff_images(
    a_blobs: &BlobStore,
    a: &StoredImage,
    b_blobs: &BlobStore,
    b: &StoredImage,
) -> Result<Value, DiffError> {
    let identical = a.manifest_digest == b.manifest_digest;
    let mut config = Vec::new();
    let ca: Value = serde_json::from_slice(&a_blobs.get(&a.config_digest)?).unwrap_or(Value::Null);
    let cb: Value = serde_json::from_slice(&b_blobs.get(&b.config_digest)?).unwrap_or(Value::Null);
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &ca, &mut fa);
    flatten("", &cb, &mut fb);
    for (k, va) in &fa {
        match fb.get(k) {
            Some(vb) if vb == va => {}
            Some(vb) => config.push(json!({"field": k, "a": va, "b": vb})),
            None => config.push(json!({"field": k, "a": va, "b": null})),
        }
    }
    for (k, vb) in &fb {
        if !fa.contains_key(k) {
            config.push(json!({"field": k, "a": null, "b": vb}));
        }
    }
    let mut layers = Vec::new();
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    let n = a.state.layers.len().max(b.state.layers.len());
    for i in 0..n {
        let xa = a.state.layers.get(i);
        let xb = b.state.layers.get(i);
        let list_a = match xa {
            Some(l) => list_layer(a_blobs, &l.digest)?,
            None => BTreeMap::new(),
        };
        let list_b = match xb {
            Some(l) => list_layer(b_blobs, &l.digest)?,
            None => BTreeMap::new(),
        };
        if xa.map(|l| &l.digest) != xb.map(|l| &l.digest) {
            let rows: Vec<Value> = compare(&list_a, &list_b)
                .into_iter()
                .map(|(c, p, d)| json!({"change": c, "path": p, "detail": d}))
                .collect();
            layers.push(json!({"index": i + 1, "a": xa.map(|l| l.digest.to_string()), "b": xb.map(|l| l.digest.to_string()), "entries": rows}));
        }
        la.push(list_a);
        lb.push(list_b);
    }
    let merged_rows: Vec<Value> = compare(&merged(&la), &merged(&lb))
        .into_iter()
        .map(|(c, p, d)| json!({"change": c, "path": p, "detail": d}))
        .collect();
    Ok(json!({
        "identical": identical,
        "a": a.manifest_digest.to_string(),
        "b": b.manifest_digest.to_string(),
        "config": config,
        "layers": layers,
        "merged": merged_rows,
    }))
}

/// `<prefix><change> <path>[: detail]` for one entry row.
fn entry_line(prefix: &str, e: &Value) -> String {
    let detail = e["detail"].as_str().unwrap_or("");
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(": {}", detail)
    };
    format!(
        "{}{} {}{}\n",
        prefix,
        e["change"].as_str().unwrap_or(""),
        e["path"].as_str().unwrap_or(""),
        detail
    )
}

/// The report as text, one difference a line.
pub fn render(report: &Value) -> String {
    let mut out = String::new();
    if report["identical"].as_bool() == Some(true) {
        out.push_str(&format!(
            "identical: {}\n",
            report["a"].as_str().unwrap_or("")
        ));
        return out;
    }
    out.push_str(&format!(
        "--- a {}\n+++ b {}\n",
        report["a"].as_str().unwrap_or(""),
        report["b"].as_str().unwrap_or("")
    ));
    for c in report["config"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "config {}: {} -> {}\n",
            c["field"].as_str().unwrap_or(""),
            c["a"],
            c["b"]
        ));
    }
    for l in report["layers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "layer {}: {} -> {}\n",
            l["index"],
            l["a"].as_str().unwrap_or("(none)"),
            l["b"].as_str().unwrap_or("(none)")
        ));
        for e in l["entries"].as_array().into_iter().flatten() {
            out.push_str(&entry_line("  ", e));
        }
    }
    for e in report["merged"].as_array().into_iter().flatten() {
        out.push_str(&entry_line("merged ", e));
    }
    out
}
