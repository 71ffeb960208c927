//! The layer cache: what hits and what misses, and that a killed or concurrent build never
//! leaves the store inconsistent or a later build wrong.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// Build and return (digest, step texts that were CACHED, step texts that ran).
fn build_log(root: &Path, ctx: &Path, extra: &[&str]) -> (String, Vec<String>, Vec<String>) {
    let (out, log) = plain_build(root, ctx, extra);
    let mut texts = std::collections::BTreeMap::new();
    let (mut cached, mut ran) = (Vec::new(), Vec::new());
    for line in log.lines() {
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let Some((n, text)) = rest.split_once(' ') else {
            continue;
        };
        if let Some(t) = text.strip_prefix('[') {
            if let Some((_, instr)) = t.split_once("] ") {
                texts.insert(n.to_string(), instr.to_string());
            }
        } else if text.starts_with("CACHED") {
            cached.push(texts.get(n).cloned().unwrap_or_default());
        } else if text.starts_with("DONE") {
            let t = texts.get(n).cloned().unwrap_or_default();
            if t.starts_with("RUN")
                || t.starts_with("COPY")
                || t.starts_with("ADD")
                || t.starts_with("WORKDIR")
            {
                ran.push(t);
            }
        }
    }
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        cached,
        ran,
    )
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    busybox_base(&root, "busybox:test");
    let ctx = t.path().join("ctx");
    write(&ctx.join("a.txt"), "a");
    write(&ctx.join("b.txt"), "b");
    write(&ctx.join("ignored.log"), "noise");
    write(&ctx.join(".dockerignore"), "*.log\n");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nARG UNUSED=1\nARG USED=1\nCOPY a.txt /a.txt\nRUN cat /a.txt > /a.copy\nCOPY b.txt /b.txt\nRUN echo \"$USED\" > /used\nCOPY . /all/\n",
    );
    (t, root, ctx)
}

const COPY_A: &str = "COPY a.txt /a.txt";
const RUN_A: &str = "RUN cat /a.txt > /a.copy";
const COPY_B: &str = "COPY b.txt /b.txt";
const RUN_USED: &str = "RUN echo \"$USED\" > /used";
const COPY_ALL: &str = "COPY . /all/";

#[test]
fn unchanged_rebuild_hits_everything_and_gives_the_same_digest() {
    let (_t, root, ctx) = setup();
    let (d1, cached, ran) = build_log(&root, &ctx, &[]);
    assert!(cached.is_empty());
    assert_eq!(ran, [COPY_A, RUN_A, COPY_B, RUN_USED, COPY_ALL]);
    let (d2, cached, ran) = build_log(&root, &ctx, &[]);
    assert_eq!(d1, d2);
    assert!(ran.is_empty(), "nothing runs: {ran:?}");
    assert_eq!(cached, [COPY_A, RUN_A, COPY_B, RUN_USED, COPY_ALL]);
    // --no-cache runs everything and still gives the same image.
    let (d3, cached, _) = build_log(&root, &ctx, &["--no-cache"]);
    assert!(cached.is_empty());
    assert_eq!(d1, d3);
}

#[test]
fn touch_hits_but_content_mode_and_owner_changes_miss_exactly_the_readers() {
    let (_t, root, ctx) = setup();
    let (d1, _, _) = build_log(&root, &ctx, &[]);
    // mtime only.
    std::thread::sleep(Duration::from_millis(1100));
    run_ok(std::process::Command::new("touch").arg(ctx.join("b.txt")));
    let (d2, _, ran) = build_log(&root, &ctx, &[]);
    assert!(ran.is_empty(), "touch changes nothing: {ran:?}");
    assert_eq!(d1, d2);
    // Content of b.txt: the steps from COPY b.txt on run again, the ones before hit.
    fs::write(ctx.join("b.txt"), "B").unwrap();
    let (_, cached, ran) = build_log(&root, &ctx, &[]);
    assert_eq!(cached, [COPY_A, RUN_A]);
    assert_eq!(ran, [COPY_B, RUN_USED, COPY_ALL]);
    // Mode of a.txt.
    fs::set_permissions(ctx.join("a.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let (_, cached, ran) = build_log(&root, &ctx, &[]);
    assert!(cached.is_empty() && ran.len() == 5, "{cached:?} {ran:?}");
    // Owner of b.txt.
    nix::unistd::chown(&ctx.join("b.txt"), Some(1234.into()), None).unwrap();
    let (_, cached, ran) = build_log(&root, &ctx, &[]);
    assert_eq!(cached, [COPY_A, RUN_A]);
    assert_eq!(ran, [COPY_B, RUN_USED, COPY_ALL]);
}

#[test]
fn ignored_files_never_affect_the_key() {
    let (_t, root, ctx) = setup();
    let (d1, _, _) = build_log(&root, &ctx, &[]);
    fs::write(ctx.join("ignored.log"), "different noise").unwrap();
    write(&ctx.join("new.log"), "more noise");
    let (d2, _, ran) = build_log(&root, &ctx, &[]);
    assert!(ran.is_empty(), "{ran:?}");
    assert_eq!(d1, d2);
}

#[test]
fn build_args_miss_only_the_steps_that_use_them() {
    let (_t, root, ctx) = setup();
    build_log(&root, &ctx, &[]);
    let (_, cached, ran) = build_log(&root, &ctx, &["--build-arg", "UNUSED=2"]);
    // ARGs are in the environment of every RUN after them, as in docker: RUN steps use them.
    assert_eq!(
        cached,
        [COPY_A],
        "a COPY that does not expand the arg hits: {cached:?}"
    );
    assert_eq!(ran, [RUN_A, COPY_B, RUN_USED, COPY_ALL]);
    let t2 = tempfile::tempdir().unwrap();
    let ctx2 = t2.path().join("ctx");
    write(&ctx2.join("x"), "x");
    write(
        &ctx2.join("Buildfile"),
        "FROM busybox:test\nCOPY x /x\nARG V=1\nCOPY x /x-${V}\nCOPY x /y\n",
    );
    build_log(&root, &ctx2, &[]);
    let (_, cached, ran) = build_log(&root, &ctx2, &["--build-arg", "V=2"]);
    assert_eq!(cached, ["COPY x /x"]);
    assert_eq!(ran, ["COPY x /x-${V}", "COPY x /y"]);
}

#[test]
fn a_changed_stage_invalidates_only_its_copy_from_consumers() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    busybox_base(&root, "busybox:test");
    let ctx = t.path().join("ctx");
    write(&ctx.join("one"), "1");
    write(&ctx.join("two"), "2");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test AS one\nCOPY one /one\n\
         FROM busybox:test AS two\nCOPY two /two\n\
         FROM busybox:test\nRUN echo base > /base\nCOPY --from=two /two /from-two\nCOPY --from=one /one /from-one\n",
    );
    build_log(&root, &ctx, &[]);
    fs::write(ctx.join("one"), "changed").unwrap();
    let (_, cached, ran) = build_log(&root, &ctx, &[]);
    assert_eq!(ran, ["COPY one /one", "COPY --from=one /one /from-one"]);
    assert_eq!(
        cached,
        [
            "COPY two /two",
            "RUN echo base > /base",
            "COPY --from=two /two /from-two"
        ]
    );
}

#[test]
fn killed_builds_leave_a_consistent_store_and_the_same_result() {
    let (_t, root, ctx) = setup();
    write(&ctx.join("Buildfile"), "FROM busybox:test\nCOPY a.txt /a.txt\nRUN for i in 1 2 3 4 5 6 7 8; do echo $i > /f$i; done\nRUN sleep 0.3; echo two > /two\nCOPY . /all/\n");
    let (expected, _, _) = build_log(&root, &ctx, &["--no-cache"]);
    let fresh = root.with_file_name("kill-root");
    busybox_base(&fresh, "busybox:test");
    let mut rng_state: u64 = 0x9e3779b97f4a7c15;
    for round in 0..20 {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let delay = Duration::from_millis(rng_state % 900);
        let mut child = builder()
            .args(["build", "--progress", "quiet", "--root"])
            .arg(&fresh)
            .args(if round % 3 == 0 {
                vec!["--no-cache"]
            } else {
                vec![]
            })
            .arg(&ctx)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        run_ok(builder().args(["fsck", "--root"]).arg(&fresh));
    }
    let (after, _, _) = build_log(&fresh, &ctx, &[]);
    assert_eq!(after, expected, "after 20 kills the build is still correct");
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !info.contains(&fresh.display().to_string()),
        "no mount remains"
    );
}

#[test]
fn two_builds_on_one_root_at_once_both_succeed() {
    let (_t, root, ctx) = setup();
    let ctx2 = ctx.with_file_name("ctx2");
    write(&ctx2.join("c.txt"), "c");
    write(
        &ctx2.join("Buildfile"),
        "FROM busybox:test\nCOPY c.txt /c\nRUN sleep 0.2 && cat /c > /c2\n",
    );
    let spawn = |c: &Path, tag: &str| {
        builder()
            .args(["build", "--progress", "quiet", "-t", tag, "--root"])
            .arg(&root)
            .arg(c)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(&ctx, "one"), spawn(&ctx2, "two"));
    for (name, child) in [("one", a), ("two", b)] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    run_ok(builder().args(["fsck", "--root"]).arg(&root));
    let (_, cached, ran) = build_log(&root, &ctx, &[]);
    assert!(ran.is_empty() && cached.len() == 5, "{cached:?} {ran:?}");
}

#[test]
fn prune_keeps_what_tagged_images_need() {
    let (t, root, ctx) = setup();
    let (tagged, _, _) = build_log(&root, &ctx, &["-t", "keep:1"]);
    let ctx2 = t.path().join("other");
    write(&ctx2.join("z"), "z");
    write(
        &ctx2.join("Buildfile"),
        "FROM busybox:test\nCOPY z /z\nRUN echo more > /more\n",
    );
    build_log(&root, &ctx2, &[]);
    let du = run_ok(builder().args(["cache", "du", "--root"]).arg(&root));
    assert!(du.contains("cache entries:          7"), "{du}");
    let out = run_ok(
        builder()
            .args(["cache", "prune", "--all", "--root"])
            .arg(&root),
    );
    assert!(out.contains("removed 7 cache entries"), "{out}");
    run_ok(builder().args(["fsck", "--root"]).arg(&root));
    export_valid_layout(&root, "keep:1", &t.path().join("exported"), "k");
    // The cache is gone, so the steps run again, and give the same image.
    let (again, cached, ran) = build_log(&root, &ctx, &[]);
    assert!(cached.is_empty() && ran.len() == 5);
    assert_eq!(again, tagged);
    // Size-bounded and age-bounded prunes parse and run.
    run_ok(
        builder()
            .args(["cache", "prune", "--keep-storage", "1kB", "--root"])
            .arg(&root),
    );
    run_ok(
        builder()
            .args(["cache", "prune", "--filter", "until=24h", "--root"])
            .arg(&root),
    );
    run_ok(builder().args(["fsck", "--root"]).arg(&root));
}

/// Two stages that each wait (bounded) for the other through a shared cache mount: they only
/// both finish when they really run at the same time.
fn rendezvous_buildfile(id: &str) -> String {
    let wait = |me: &str, other: &str| {
        format!("RUN --mount=type=cache,id={id},target=/rv touch /rv/{me}; i=0; while [ ! -e /rv/{other} ]; do sleep 0.1; i=$((i+1)); if [ $i -gt 100 ]; then echo {other} never came; exit 1; fi; done")
    };
    format!(
        "FROM busybox:test AS a\n{}\nFROM busybox:test AS b\n{}\nFROM busybox:test\nCOPY --from=a /bin/sh /a\nCOPY --from=b /bin/sh /b\n",
        wait("a", "b"),
        wait("b", "a")
    )
}

#[test]
fn independent_stages_run_concurrently_up_to_jobs() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    busybox_base(&root, "busybox:test");
    let ctx = t.path().join("ctx");
    let unique = format!(
        "rv-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    write(&ctx.join("Buildfile"), &rendezvous_buildfile(&unique));
    run_ok(
        builder()
            .args([
                "build",
                "--progress",
                "quiet",
                "--no-cache",
                "--jobs",
                "2",
                "--root",
            ])
            .arg(&root)
            .arg(&ctx),
    );
    // One job at a time: the first stage waits for a second that cannot start.
    write(
        &ctx.join("Buildfile"),
        &rendezvous_buildfile(&format!("{unique}-serial")),
    );
    let out = run(builder()
        .args([
            "build",
            "--progress",
            "plain",
            "--no-cache",
            "--jobs",
            "1",
            "--root",
        ])
        .arg(&root)
        .arg(&ctx));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never came"));
}

#[test]
fn identical_steps_in_one_build_run_once() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    busybox_base(&root, "busybox:test");
    let ctx = t.path().join("ctx");
    let step = "RUN sleep 0.5 && cat /proc/sys/kernel/random/uuid > /id";
    write(&ctx.join("Buildfile"), &format!("FROM busybox:test AS a\n{step}\nFROM busybox:test AS b\n{step}\nFROM scratch\nCOPY --from=a /id /a\nCOPY --from=b /id /b\n"));
    let local = t.path().join("out");
    run_ok(
        builder()
            .args(["build", "--progress", "quiet", "--jobs", "2", "--root"])
            .arg(&root)
            .arg("-o")
            .arg(format!("local:{}", local.display()))
            .arg(&ctx),
    );
    let (a, b) = (
        fs::read_to_string(local.join("a")).unwrap(),
        fs::read_to_string(local.join("b")).unwrap(),
    );
    assert_eq!(
        a, b,
        "the second identical step reused the first one's result"
    );
}

#[test]
fn prune_during_a_builds_commit_leaves_its_tag_and_outputs_whole() {
    let (t, root, ctx) = setup();
    for round in 0..3 {
        let gate = t.path().join(format!("gate-{}", round));
        let solved = t.path().join(format!("gate-{}.solved", round));
        let layout = t.path().join(format!("out-{}", round));
        write(&ctx.join("round"), &round.to_string());
        let b = builder()
            .env("BUILDER_TEST_RENDEZVOUS", &gate)
            .args(["build", "--progress", "quiet", "--root"])
            .arg(&root)
            .args(["-t", &format!("raced:{}", round), "-o"])
            .arg(format!("oci:{}:r", layout.display()))
            .arg(&ctx)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The build has solved but committed nothing: a prune now must wait for it.
        for _ in 0..600 {
            if solved.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(solved.exists(), "the build reached its commit point");
        let mut prune = builder()
            .args(["cache", "prune", "--all", "--root"])
            .arg(&root)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        fs::write(&gate, "").unwrap();
        let out = b.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(prune.wait().unwrap().success());
        run_ok(builder().args(["fsck", "--root"]).arg(&root));
        run_ok(
            tool("oci-image-tool")
                .args(["validate", "--type", "image", "--ref", "name=r"])
                .arg(&layout),
        );
        let exported = t.path().join(format!("again-{}", round));
        run_ok(
            builder()
                .args(["export", "--root"])
                .arg(&root)
                .arg(format!("raced:{}", round))
                .arg("-o")
                .arg(format!("oci:{}:x", exported.display())),
        );
    }
}

#[test]
fn scratch_of_a_killed_build_is_counted_and_removed_by_the_next_build() {
    let (t, root, _) = setup();
    let ctx = t.path().join("slow");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nRUN --network=none dd if=/dev/zero of=/big bs=1024 count=2048 && sleep 30\n",
    );
    let mut child = builder()
        .args(["build", "--progress", "quiet", "--root"])
        .arg(&root)
        .arg(&ctx)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let tmp = root.join("tmp");
    let owned = |p: u32| -> Vec<String> {
        fs::read_dir(&tmp)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(&format!("-{}-", p)))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Wait (bounded) until the step has written its big file into its scratch.
    let mut big = false;
    for _ in 0..200 {
        big = walkdir::WalkDir::new(&tmp).into_iter().flatten().any(|e| {
            e.file_name() == "big" && e.metadata().map(|m| m.len()).unwrap_or(0) >= 2 << 20
        });
        if big {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(big, "the step ran");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!owned(pid).is_empty(), "a killed build leaves scratch");
    let du = run_ok(builder().args(["cache", "du", "--root"]).arg(&root));
    let line = du
        .lines()
        .find(|l| l.starts_with("build scratch:"))
        .unwrap_or("");
    assert!(!line.ends_with(" 0B") && !line.is_empty(), "{du}");
    // The next build removes what the dead one owned.
    let quick = t.path().join("quick");
    write(
        &quick.join("Buildfile"),
        "FROM busybox:test\nRUN --network=none true\n",
    );
    build_log(&root, &quick, &[]);
    assert!(owned(pid).is_empty(), "left: {:?}", owned(pid));
    run_ok(builder().args(["fsck", "--root"]).arg(&root));
}

#[test]
fn prune_keeps_every_platform_of_a_tagged_index() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let ctx = t.path().join("ctx");
    write(&ctx.join("amd64.txt"), "amd64\n");
    write(&ctx.join("arm64.txt"), "arm64\n");
    write(
        &ctx.join("Buildfile"),
        "FROM scratch\nARG TARGETARCH\nCOPY $TARGETARCH.txt /arch.txt\n",
    );
    let digest = build(
        &root,
        &ctx,
        &["--platform", "linux/amd64,linux/arm64", "-t", "multi:1"],
    );
    run_ok(
        builder()
            .args(["cache", "prune", "--all", "--root"])
            .arg(&root),
    );
    run_ok(builder().args(["fsck", "--root"]).arg(&root));
    let layout = t.path().join("exported");
    export_valid_layout(&root, "multi:1", &layout, "m");
    let raw = run_ok(
        tool("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:m", layout.display())),
    );
    use sha2::Digest as _;
    assert_eq!(
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(raw.as_bytes()))
        ),
        digest,
        "the index, whole, after a prune"
    );
}

/// `builder export NAME -o oci:LAYOUT:TAG`, and the layout validates.
fn export_valid_layout(root: &Path, name: &str, layout: &Path, tag: &str) {
    run_ok(
        builder()
            .args(["export", "--root"])
            .arg(root)
            .args([name, "-o"])
            .arg(format!("oci:{}:{}", layout.display(), tag)),
    );
    run_ok(
        tool("oci-image-tool")
            .args([
                "validate",
                "--type",
                "image",
                "--ref",
                &format!("name={tag}"),
            ])
            .arg(layout),
    );
}

/// The log lines of a `--progress json` build, and its digest.
fn progress_lines(root: &Path, ctx: &Path) -> (String, Vec<String>) {
    progress_lines_with(root, ctx, &[])
}

/// [`progress_lines`] with `extra` arguments.
fn progress_lines_with(root: &Path, ctx: &Path, extra: &[&str]) -> (String, Vec<String>) {
    let out = run(builder()
        .args(["build", "--progress", "json", "--root"])
        .arg(root)
        .args(extra)
        .arg(ctx));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    let lines = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["line"].as_str().map(str::to_string))
        .collect();
    let digest = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    (digest, lines)
}

/// The `layer …: N chunks, C compressed, R reused` events of a `--progress json` build, and
/// its digest.
fn chunk_events(root: &Path, ctx: &Path) -> (String, Vec<(usize, usize)>) {
    let (digest, lines) = progress_lines(root, ctx);
    let mut events = Vec::new();
    for text in lines {
        if let Some((_, counts)) = text.strip_prefix("layer ").and_then(|t| t.split_once(": ")) {
            let nums: Vec<usize> = counts
                .split(", ")
                .filter_map(|p| p.split(' ').next()?.parse().ok())
                .collect();
            if let [chunks, compressed, _reused] = nums[..] {
                events.push((chunks, compressed));
            }
        }
    }
    (digest, events)
}

#[test]
fn an_edited_copy_recompresses_one_chunk_and_gives_the_cold_blob() {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(&ctx.join("Buildfile"), "FROM scratch\nCOPY src /src\n");
    // About 5 MB in 1,200 files: several chunks.
    for i in 0..1200 {
        let body: String = (0..400)
            .map(|k| format!("{} ", (i * 7919 + k * 31) % 10007))
            .collect();
        write(&ctx.join(format!("src/d{}/f{}.txt", i / 100, i)), &body);
    }
    let warm_root = t.path().join("warm");
    let (_, cold_events) = chunk_events(&warm_root, &ctx);
    let (chunks, compressed) = cold_events[0];
    assert!(chunks >= 4, "{} chunks", chunks);
    assert_eq!(compressed, chunks, "a cold build compresses every chunk");
    // One file edited (and grown): one chunk is compressed again, the rest are reused.
    let edited = ctx.join("src/d6/f654.txt");
    let mut text = fs::read_to_string(&edited).unwrap();
    text.push_str("an edit\n");
    fs::write(&edited, text).unwrap();
    let (warm, events) = chunk_events(&warm_root, &ctx);
    assert_eq!(events.len(), 1, "{:?}", events);
    assert_eq!(events[0].1, 1, "chunks compressed again: {:?}", events);
    // A cold build of the edited context in a fresh store gives the same blob.
    let (cold, _) = chunk_events(&t.path().join("cold"), &ctx);
    assert_eq!(
        warm, cold,
        "the edit rebuild's image (and layer) is the cold build's"
    );
}

/// The `layer …: N tar segments, R read from earlier layers` events of a `--progress json`
/// build, and its digest.
fn segment_events(root: &Path, ctx: &Path) -> (String, Vec<(usize, usize)>) {
    let (digest, lines) = progress_lines(root, ctx);
    let mut events = Vec::new();
    for text in lines {
        let Some((_, counts)) = text.split_once(": ") else {
            continue;
        };
        if let Some((n, rest)) = counts.split_once(" tar segments, ") {
            let read = rest.split(' ').next().and_then(|r| r.parse().ok());
            if let (Ok(n), Some(read)) = (n.parse(), read) {
                events.push((n, read));
            }
        }
    }
    (digest, events)
}

fn segment_files(root: &Path) -> usize {
    walkdir::WalkDir::new(root.join("cache/segments"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && !e.path().to_string_lossy().contains("/layers/"))
        .count()
}

#[test]
fn an_edited_copy_reads_the_files_of_one_tar_segment_and_gives_the_cold_blob() {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(&ctx.join("Buildfile"), "FROM scratch\nCOPY src /src\n");
    for i in 0..1500 {
        write(
            &ctx.join(format!("src/d{}/f{}.txt", i / 100, i)),
            &format!("file {}\n", i).repeat(i % 40 + 1),
        );
    }
    let root = t.path().join("warm");
    let (_, cold) = segment_events(&root, &ctx);
    assert_eq!(cold.len(), 1, "{:?}", cold);
    let (segments, read) = cold[0];
    assert!(segments >= 10, "{} segments", segments);
    assert_eq!(read, 0, "a cold build has nothing to read back");
    assert_eq!(segment_files(&root), segments);

    // One file edited: every other segment is read back whole.
    let edited = ctx.join("src/d7/f777.txt");
    let mut text = fs::read_to_string(&edited).unwrap();
    text.push_str("an edit\n");
    fs::write(&edited, text).unwrap();
    let (warm, events) = segment_events(&root, &ctx);
    assert_eq!(events, vec![(segments, segments - 1)]);
    // A fresh store's cold build of the edited context gives the same image.
    let (fresh, _) = segment_events(&t.path().join("cold"), &ctx);
    assert_eq!(warm, fresh);

    // Segments the store holds are checked: a damaged one is not used, and the layer is
    // still the one its files give.
    for e in walkdir::WalkDir::new(root.join("cache/segments"))
        .into_iter()
        .flatten()
    {
        if e.file_type().is_file() && !e.path().to_string_lossy().contains("/layers/") {
            let mut bytes = fs::read(e.path()).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            fs::write(e.path(), bytes).unwrap();
        }
    }
    let other = ctx.join("src/d2/f222.txt");
    fs::write(&other, "another edit\n").unwrap();
    let (damaged, events) = segment_events(&root, &ctx);
    assert_eq!(events, vec![(segments, 0)]);
    let (fresh, _) = segment_events(&t.path().join("cold2"), &ctx);
    assert_eq!(damaged, fresh);

    // Pruning everything removes them.
    run_ok(
        builder()
            .args(["cache", "prune", "--all", "--root"])
            .arg(&root),
    );
    assert_eq!(segment_files(&root), 0);
}

/// Build `ctx` into an OCI layout under `scratch` and unpack it with umoci; returns the
/// root filesystem.
fn build_and_unpack(root: &Path, ctx: &Path, scratch: &Path) -> std::path::PathBuf {
    let layout = scratch.join("layout");
    run_ok(
        builder()
            .args(["build", "--root"])
            .arg(root)
            .arg("-o")
            .arg(format!("oci:{}:t", layout.display()))
            .arg(ctx),
    );
    umoci_unpack(&layout, "t", &scratch.join("bundle")).join("rootfs")
}

/// The snapshot directories (`fs` full, `meta` skeleton) of a store, and the total size of
/// the regular files in them.
fn snapshot_kinds(root: &Path) -> (usize, usize, u64) {
    let (mut full, mut meta, mut bytes) = (0, 0, 0);
    for chain in fs::read_dir(root.join("snapshots")).into_iter().flatten() {
        let chain = chain.unwrap().path();
        for (kind, n) in [("fs", &mut full), ("meta", &mut meta)] {
            let d = chain.join(kind);
            if d.is_dir() {
                *n += 1;
                for e in walkdir::WalkDir::new(&d) {
                    let e = e.unwrap();
                    if e.file_type().is_file() {
                        bytes += e.metadata().unwrap().len();
                    }
                }
            }
        }
    }
    (full, meta, bytes)
}

#[test]
fn a_copy_after_a_copy_unpacks_no_big_file_and_a_later_run_sees_every_byte() {
    let dir = busybox_dir();
    let root = dir.path().join("root");
    let ctx = dir.path().join("ctx");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::create_dir_all(ctx.join("data")).unwrap();
    fs::write(ctx.join("data/big.bin"), &big).unwrap();
    write(&ctx.join("small.txt"), "small\n");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nCOPY data/ /data/\nCOPY --chown=app small.txt /data/\n",
    );
    build(&root, &ctx, &[]);
    // The second COPY resolved /data and the user `app` in skeletons: the 3 MB file was
    // verified as its layer was read, but never written.
    let (full, meta, bytes) = snapshot_kinds(&root);
    assert_eq!(full, 0, "no full snapshot for COPY steps");
    assert!(
        meta >= 2,
        "skeletons of the base and the first COPY: {}",
        meta
    );
    assert!(bytes < 1_000_000, "{} bytes of files in skeletons", bytes);
    // A RUN on top reads the big file whole, and the chown of the second COPY stands.
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nCOPY data/ /data/\nCOPY --chown=app small.txt /data/\n\
         RUN wc -c /data/big.bin > /size && stat -c %u /data/small.txt > /owner\n",
    );
    let rootfs = build_and_unpack(&root, &ctx, dir.path());
    assert_eq!(
        fs::read_to_string(rootfs.join("size")).unwrap().trim(),
        "3000000 /data/big.bin"
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("owner")).unwrap().trim(),
        "1000"
    );
    assert_eq!(fs::read(rootfs.join("data/big.bin")).unwrap(), big);
}

#[test]
fn snapshots_made_as_layers_are_written_give_what_snapshots_unpacked_from_blobs_give() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    let big: Vec<u8> = (0..500_000u32).map(|i| (i * 13 % 251) as u8).collect();
    fs::create_dir_all(ctx.join("data/sub")).unwrap();
    fs::write(ctx.join("data/big.bin"), &big).unwrap();
    fs::write(ctx.join("data/sub/a.txt"), "a\n").unwrap();
    std::os::unix::fs::symlink("sub/a.txt", ctx.join("data/link")).unwrap();
    write(&ctx.join("small.txt"), "small\n");
    let copies = "FROM busybox:test\nCOPY data/ /data/\nWORKDIR /data/sub\n\
                  COPY --chown=app --chmod=600 small.txt ./\n";
    let with_run = format!(
        "{}RUN ls -lnR --full-time /data > /list && wc -c /data/big.bin >> /list \
         && cat /data/link /data/sub/small.txt >> /list\n",
        copies
    );
    // Cold: each step's snapshot for the next comes from its layer's own stream.
    let cold = dir.path().join("cold");
    busybox_base(&cold.join("root"), "busybox:test");
    write(&ctx.join("Buildfile"), &with_run);
    let cold_digest = build(&cold.join("root"), &ctx, &[]);
    // Step by step: the COPY layers come from the cache, their snapshots from the blobs.
    let stepped = dir.path().join("stepped");
    busybox_base(&stepped.join("root"), "busybox:test");
    write(&ctx.join("Buildfile"), copies);
    build(&stepped.join("root"), &ctx, &[]);
    fs::remove_dir_all(stepped.join("root/snapshots")).unwrap();
    write(&ctx.join("Buildfile"), &with_run);
    let (stepped_digest, _, ran) = build_log(&stepped.join("root"), &ctx, &[]);
    assert_eq!(ran.len(), 1, "only the RUN runs: {:?}", ran);
    assert_eq!(stepped_digest, cold_digest);
}

#[test]
fn a_rebuild_after_edits_copies_each_file_as_it_is_now() {
    let dir = busybox_dir();
    let root = dir.path().join("root");
    let ctx = dir.path().join("ctx");
    for i in 0..50 {
        write(
            &ctx.join(format!("src/f{}.txt", i)),
            &format!("file {}\n", i),
        );
    }
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nCOPY src/ /src/\n",
    );
    build(&root, &ctx, &[]);
    // Content, size and mode change; a file appears; the rebuild takes what it hashed.
    write(&ctx.join("src/f7.txt"), "edited, and longer than before\n");
    fs::set_permissions(ctx.join("src/f9.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    write(&ctx.join("src/new.txt"), "new\n");
    let rootfs = build_and_unpack(&root, &ctx, dir.path());
    assert_eq!(
        fs::read_to_string(rootfs.join("src/f7.txt")).unwrap(),
        "edited, and longer than before\n"
    );
    let mode = fs::metadata(rootfs.join("src/f9.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        fs::read_to_string(rootfs.join("src/new.txt")).unwrap(),
        "new\n"
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("src/f3.txt")).unwrap(),
        "file 3\n"
    );
}

/// The attestation index a build names (its provenance included), from `--metadata-file`.
fn attested_index(root: &Path, ctx: &Path, meta: &Path) -> String {
    build_log(root, ctx, &["--metadata-file", meta.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&fs::read(meta).unwrap()).unwrap();
    v["attestations.index.digest"].as_str().unwrap().to_string()
}

#[test]
fn a_no_op_takes_the_last_listing_and_records_what_a_fresh_store_records() {
    let (t, root, ctx) = setup();
    let meta = t.path().join("meta.json");
    let listings = root.join("cache/listings");
    let first = attested_index(&root, &ctx, &meta);
    // Files written within the last seconds are never trusted unchanged: nothing is kept.
    assert!(fs::read_dir(&listings).map_or(true, |d| d.count() == 0));
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(attested_index(&root, &ctx, &meta), first);
    let kept: Vec<_> = fs::read_dir(&listings).unwrap().flatten().collect();
    // One per COPY's sources.
    assert_eq!(kept.len(), 3, "{:?}", kept);
    let written = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    let before: Vec<_> = kept.iter().map(|e| written(&e.path())).collect();
    // A no-op reads the listings, writes none, and records the same provenance.
    assert_eq!(attested_index(&root, &ctx, &meta), first);
    let after: Vec<_> = kept.iter().map(|e| written(&e.path())).collect();
    assert_eq!(before, after, "a no-op rewrote a listing");
    let fresh = t.path().join("fresh");
    busybox_base(&fresh, "busybox:test");
    assert_eq!(attested_index(&fresh, &ctx, &meta), first);
    // An edit that keeps the size and the mtime is still seen (the ctime moved).
    let b = ctx.join("b.txt");
    let mtime = fs::metadata(&b).unwrap().modified().unwrap();
    fs::write(&b, "B").unwrap();
    fs::File::options()
        .write(true)
        .open(&b)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::thread::sleep(Duration::from_millis(2200));
    let (_, _, ran) = build_log(&root, &ctx, &[]);
    assert_eq!(ran, [COPY_B, RUN_USED, COPY_ALL]);
    let edited = attested_index(&root, &ctx, &meta);
    assert_ne!(edited, first);
    assert_eq!(attested_index(&fresh, &ctx, &meta), edited);
}

/// `--metadata-file` lists each step with its result and time, and `--summary` writes them
/// as Markdown: a first build runs every step, an unchanged rebuild runs none.
#[test]
fn metadata_and_summary_say_which_steps_ran() {
    let (t, root, ctx) = setup();
    let meta = t.path().join("meta.json");
    let summary = t.path().join("summary.md");
    let args = [
        "--metadata-file",
        meta.to_str().unwrap(),
        "--summary",
        summary.to_str().unwrap(),
        "-t",
        "summed:1",
    ];
    let results = |meta: &Path| -> Vec<(String, bool)> {
        let v: serde_json::Value = serde_json::from_slice(&fs::read(meta).unwrap()).unwrap();
        v["builder.steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                assert!(s["seconds"].as_f64().unwrap() >= 0.0);
                (
                    s["instruction"].as_str().unwrap().to_string(),
                    s["cached"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    build_log(&root, &ctx, &args);
    let first = results(&meta);
    let layered = [COPY_A, RUN_A, COPY_B, RUN_USED, COPY_ALL];
    assert_eq!(
        first.iter().map(|(op, _)| op.as_str()).collect::<Vec<_>>(),
        layered
    );
    assert!(first.iter().all(|(_, cached)| !cached), "{first:?}");
    let md = fs::read_to_string(&summary).unwrap();
    assert!(md.contains("| steps | 5 run, 0 cached |"), "{md}");
    assert!(md.contains("| names | summed:1 |"), "{md}");

    build_log(&root, &ctx, &args);
    assert!(results(&meta).iter().all(|(_, cached)| *cached));
    let md = fs::read_to_string(&summary).unwrap();
    assert!(md.contains("| steps | 0 run, 5 cached |"), "{md}");
    assert!(md.contains(&format!("| `{}` | cached |", RUN_A)), "{md}");
    let digest = fs::read_to_string(&meta).unwrap();
    let v: serde_json::Value = serde_json::from_str(&digest).unwrap();
    assert!(
        md.contains(v["containerimage.digest"].as_str().unwrap()),
        "{md}"
    );
}

/// A successful build with plain progress: its output, and its progress (stderr).
fn plain_build(root: &Path, ctx: &Path, extra: &[&str]) -> (std::process::Output, String) {
    let out = run(builder()
        .args(["build", "--progress", "plain", "--root"])
        .arg(root)
        .args(extra)
        .arg(ctx));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    (out, log)
}

/// A build's plain progress (stderr).
fn plain_log(root: &Path, ctx: &Path, extra: &[&str]) -> String {
    plain_build(root, ctx, extra).1
}

/// The `cache miss:` reasons of a plain-progress log, by step text.
fn misses(log: &str) -> Vec<(String, String)> {
    let mut text: std::collections::BTreeMap<String, String> = Default::default();
    let mut out = Vec::new();
    for line in log.lines() {
        let Some((n, rest)) = line.strip_prefix('#').and_then(|r| r.split_once(' ')) else {
            continue;
        };
        if let Some((_, instr)) = rest.strip_prefix('[').and_then(|t| t.split_once("] ")) {
            text.insert(n.to_string(), instr.to_string());
        } else if let Some(why) = rest.strip_prefix("cache miss: ") {
            out.push((text.get(n).cloned().unwrap_or_default(), why.to_string()));
        }
    }
    out
}

/// A step that runs says why, against the last build of the same build file: the context
/// file that changed, the build arg, the base image's new digest; nothing changed, nothing
/// runs and nothing is said.
#[test]
fn a_step_that_runs_says_why_it_missed() {
    let (t, root, ctx) = setup();
    let args = ["--build-arg", "USED=1"];
    let first = plain_log(&root, &ctx, &args);
    assert!(
        misses(&first).is_empty(),
        "a first build has nothing to compare with: {first}"
    );

    // Nothing changed: nothing runs, nothing is said.
    let log = plain_log(&root, &ctx, &args);
    let (_, cached, ran) = build_log(&root, &ctx, &args);
    assert!(ran.is_empty() && !cached.is_empty());
    assert!(misses(&log).is_empty(), "{log}");

    // One context file.
    write(&ctx.join("b.txt"), "b, edited");
    let log = plain_log(&root, &ctx, &args);
    let m = misses(&log);
    assert_eq!(
        m[0],
        (COPY_B.to_string(), "b.txt changed".to_string()),
        "{log}"
    );
    assert!(
        m.iter().all(|(op, _)| op != COPY_A && op != RUN_A),
        "steps before the change hit: {m:?}"
    );
    assert!(
        m.contains(&(COPY_ALL.to_string(), "b.txt changed".to_string())),
        "{m:?}"
    );

    // A build arg.
    let log = plain_log(&root, &ctx, &["--build-arg", "USED=2"]);
    let m = misses(&log);
    // Every RUN after `ARG USED` has it in its environment, as in docker.
    let arg = "build arg USED changed (1 -> 2)".to_string();
    assert_eq!(m[0], (RUN_A.to_string(), arg.clone()), "{log}");
    assert!(m.contains(&(RUN_USED.to_string(), arg)), "{m:?}");
    assert!(m.contains(&(COPY_B.to_string(), "the step before it changed".into())));

    // The base image.
    let other = t.path().join("rootfs");
    std::fs::create_dir_all(other.join("bin")).unwrap();
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap();
    std::fs::copy(bb, other.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "echo"] {
        std::os::unix::fs::symlink("busybox", other.join("bin").join(a)).unwrap();
    }
    std::fs::write(other.join("version"), "2").unwrap();
    let out = run(builder()
        .args(["import", "--root"])
        .arg(&root)
        .arg(&other)
        .args(["-t", "busybox:test"]));
    assert!(out.status.success());
    let log = plain_log(&root, &ctx, &["--build-arg", "USED=2"]);
    let m = misses(&log);
    let (op, why) = &m[0];
    assert_eq!(op, COPY_A, "{log}");
    assert!(
        why.starts_with("FROM: base image busybox:test now sha256:"),
        "{why}"
    );
    assert_eq!(m[1].1, "the step before it changed");
}

#[test]
fn a_miss_is_explained_against_a_named_image_and_its_build_is_listed() {
    let (_t, root, ctx) = setup();
    let tagged = |tag: &str, extra: &[&str]| {
        let mut args = vec!["-t", tag];
        args.extend_from_slice(extra);
        plain_log(&root, &ctx, &args)
    };
    tagged("app:one", &[]);
    write(&ctx.join("c.txt"), "c");
    tagged("app:two", &[]);

    // Against the last build only b.txt differs; against app:one c.txt is new too.
    write(&ctx.join("b.txt"), "b, edited");
    let log = tagged("app:three", &["--explain-against", "app:one"]);
    let m = misses(&log);
    assert_eq!(m[0], (COPY_B.to_string(), "b.txt changed".into()), "{log}");
    assert!(
        m.contains(&(COPY_ALL.to_string(), "b.txt changed, c.txt added".into())),
        "{m:?}"
    );

    // What the build of app:two did, step by step.
    let out = run(builder()
        .args(["debug", "cache", "app:two", "--json", "--root"])
        .arg(&root));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = v["steps"].as_array().unwrap();
    let texts: Vec<&str> = steps
        .iter()
        .map(|s| s["instruction"].as_str().unwrap())
        .collect();
    assert_eq!(texts, [COPY_A, RUN_A, COPY_B, RUN_USED, COPY_ALL]);
    for s in &steps[..4] {
        assert_eq!(s["cached"], true, "{s}");
        assert!(s["key"].as_str().unwrap().starts_with("sha256:"), "{s}");
    }
    assert_eq!(steps[4]["cached"], false);
    assert_eq!(steps[4]["miss"], "c.txt added");
    let out = run(builder()
        .args(["debug", "cache", "app:two", "--root"])
        .arg(&root));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("cache miss: c.txt added"), "{listing}");
    assert!(listing.contains("5 steps: 1 ran, 4 cached"), "{listing}");

    // An image no build made here is refused by name.
    let out = run(builder()
        .args(["build", "--explain-against", "busybox:test", "--root"])
        .arg(&root)
        .arg(&ctx));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--explain-against busybox:test") && err.contains("no record"),
        "{err}"
    );
}

/// The two counts of each `{prefix}…N{middle}M{suffix}` line of a build.
fn counted(lines: &[String], prefix: &str, middle: &str, suffix: &str) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter_map(|text| {
            let (first, rest) = text.strip_prefix(prefix)?.split_once(middle)?;
            let first = first.rsplit(' ').next()?;
            Some((
                first.parse().ok()?,
                rest.strip_suffix(suffix)?.parse().ok()?,
            ))
        })
        .collect()
}

/// A scratch directory with a store holding `busybox:test` (`root`) and a context whose
/// build file is `buildfile` (`ctx`).
fn busybox_build(buildfile: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = busybox_dir();
    let (root, ctx) = (t.path().join("root"), t.path().join("ctx"));
    write(&ctx.join("Buildfile"), buildfile);
    (t, root, ctx)
}

/// The `layer …: N files read, B bytes` events of a build.
fn read_events(lines: &[String]) -> Vec<(u64, u64)> {
    counted(lines, "layer ", " files read, ", " bytes")
}

#[test]
fn a_run_commit_reads_each_file_it_wrote_once() {
    // Small files (read ahead into memory), big ones (streamed) and a hard link (not read).
    let (t, root, ctx) = busybox_build(
        "FROM busybox:test\nRUN mkdir /out && for i in $(seq 1 150); do head -c $((i * 97)) /bin/busybox > /out/f$i; done && head -c 300000 /bin/busybox > /out/big && head -c 90000 /bin/busybox > /out/mid && ln /out/big /out/big-link\n",
    );
    let layout = t.path().join("layout");
    let output = format!("oci:{}:1", layout.display());
    let (_, lines) = progress_lines_with(&root, &ctx, &["-o", &output]);
    let reads = read_events(&lines);
    assert_eq!(reads.len(), 1, "one layer written: {:?}", reads);
    // What the layer holds: its regular files (a hard link is an entry without content).
    let (_, digest, _) = layout_layers(&layout, "1").pop().unwrap();
    let blob = fs::File::open(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.header().entry_type() == tar::EntryType::Regular {
            files += 1;
            bytes += entry.header().size().unwrap();
        }
    }
    assert_eq!(files, 152, "the RUN's 152 files are in its layer");
    assert_eq!(
        reads[0],
        (files, bytes),
        "each file the RUN wrote is read once to commit it, and nothing more"
    );
}

/// The `unpacked N layers before the step, B bytes of blobs` events of a build.
fn unpack_events(lines: &[String]) -> Vec<(u64, u64)> {
    counted(
        lines,
        "unpacked ",
        " layers before the step, ",
        " bytes of blobs",
    )
}

#[test]
fn a_base_is_unpacked_once_before_the_first_run_and_never_again() {
    // Two RUNs: the second's view comes from the first's layer as it is written.
    let (_t, root, ctx) =
        busybox_build("FROM busybox:test\nRUN echo one > /one\nRUN echo two > /two\n");
    let (_, lines) = progress_lines(&root, &ctx);
    let events = unpack_events(&lines);
    assert_eq!(
        events.len(),
        1,
        "one unpack, before the first RUN: {events:?}"
    );
    let (layers, bytes) = events[0];
    assert_eq!(layers, 1, "the base's one layer");
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find_map(|p| fs::metadata(p).ok())
        .unwrap()
        .len();
    assert!(
        bytes > busybox / 4 && bytes < busybox * 2,
        "{bytes} bytes of blobs for a {busybox}-byte busybox"
    );
    // Another build on that base unpacks nothing: the snapshot is kept.
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nRUN echo three > /three\n",
    );
    let (_, lines) = progress_lines(&root, &ctx);
    assert_eq!(unpack_events(&lines), vec![], "the base's snapshot is kept");
}

#[test]
fn a_base_layer_is_scanned_for_the_sbom_as_it_is_unpacked() {
    // With the SBOM off, nothing but the unpack and the RUN's commit would scan a layer: each
    // layer this build decompressed or wrote has its scan kept, so an SBOM never
    // decompresses a base layer a second time.
    let (_t, root, ctx) = busybox_build("FROM busybox:test\nRUN echo one > /one\n");
    let (_, lines) = progress_lines_with(&root, &ctx, &["--sbom=false"]);
    assert_eq!(unpack_events(&lines).len(), 1, "the base was unpacked");
    let scans: Vec<String> = fs::read_dir(root.join("cache/sbom"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        scans.len(),
        2,
        "the base layer's scan and the RUN layer's: {scans:?}"
    );
}
