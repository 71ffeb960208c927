//! Golden listings of the op graph (`builder debug ops`): each `testdata/ops/NAME.Buildfile`
//! lowers to exactly `testdata/ops/NAME.ops`. Set `UPDATE_GOLDEN=1` to rewrite them
//! after a deliberate change (and bump `plan::OP_KEY_VERSION` when keys change meaning).

use std::path::{Path, PathBuf};
use std::process::Command;

fn ops_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/ops")
}

fn listing(file: &Path, extra: &[&str]) -> String {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(["debug", "ops", "--platform", "linux/amd64", "--root"])
        .arg(root.path())
        .args(extra)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debug ops {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn op_listings_match_their_goldens() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(ops_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "Buildfile"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "goldens missing in {}",
        ops_dir().display()
    );
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    for f in &files {
        let got = listing(f, &[]);
        let golden = f.with_extension("ops");
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {}", golden.display(), e));
        if got != want {
            failed.push(format!(
                "{}:\n--- want\n{}\n--- got\n{}",
                f.display(),
                want,
                got
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The keys of the ops of a listing, in order.
fn keys(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.split_once(" key=").map(|(_, k)| k.to_string()))
        .collect()
}

#[test]
fn keys_ignore_where_an_op_is_written_and_follow_what_it_means() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(ops_dir().join("run.Buildfile")).unwrap();
    let plain = dir.path().join("a.Buildfile");
    std::fs::write(&plain, &text).unwrap();
    // Comments, blank lines, spacing and keyword case move or reformat ops without changing
    // what they do.
    let moved = dir.path().join("b.Buildfile");
    let reformatted = text
        .replace("RUN id", "RUN    id")
        .replace("RUN make", "run make");
    std::fs::write(&moved, format!("# a comment\n\n{}", reformatted)).unwrap();
    let a = listing(&plain, &[]);
    let b = listing(&moved, &[]);
    assert_ne!(a, b, "the lines differ");
    assert_eq!(keys(&a), keys(&b));
    // A build arg changes the steps that see it, and only those.
    let c = listing(&plain, &["--build-arg", "VERSION=3"]);
    let (ka, kc) = (keys(&a), keys(&c));
    assert_eq!(ka.len(), kc.len());
    assert_eq!(
        ka[0], kc[0],
        "ARG's history names the default, not the value"
    );
    let changed = ka.iter().zip(&kc).filter(|(x, y)| x != y).count();
    assert!(
        changed >= 5,
        "every RUN after ARG VERSION changes: {changed}"
    );
    assert_eq!(ka[1], kc[1], "ENV PATH does not read VERSION");
    assert_eq!(ka[2], kc[2], "WORKDIR does not read VERSION");
    // The build's default network is resolved into each RUN.
    let d = listing(&plain, &["--network", "none"]);
    assert!(d.contains("\"network\":\"none\""));
    assert_ne!(keys(&a), keys(&d));
}
