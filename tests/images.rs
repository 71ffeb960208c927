//! End-to-end: build real images and check them with real tools (skopeo, umoci, runc,
//! oci-image-tool), refuse hostile inputs, and reproduce digests.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;

fn example_context() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello")
}

#[test]
fn scratch_example_is_a_valid_layout_that_skopeo_and_umoci_read() {
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    let digest = build(
        &t.path().join("root"),
        &example_context(),
        &[
            "-t",
            "hello:1.0",
            "-o",
            &format!("oci:{}:1.0", layout.display()),
        ],
    );
    assert!(
        digest.starts_with("sha256:"),
        "last stdout line is the digest: {digest}"
    );

    run_ok(
        tool("oci-image-tool")
            .args(["validate", "--type", "image", "--ref", "name=1.0"])
            .arg(&layout),
    );
    let inspect = run_ok(
        tool("skopeo")
            .arg("inspect")
            .arg(format!("oci:{}:1.0", layout.display())),
    );
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["Digest"], digest.as_str());
    assert_eq!(v["Labels"]["org.opencontainers.image.title"], "hello");
    // FROM scratch starts, as in BuildKit, with the default PATH (and WorkingDir /).
    assert_eq!(
        v["Env"],
        serde_json::json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "GREETING=hello from builder"
        ])
    );

    let bundle = umoci_unpack(&layout, "1.0", t.path());
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("srv/site/index.html")).unwrap(),
        fs::read_to_string(example_context().join("site/index.html")).unwrap()
    );
    let about = rootfs.join("srv/bin/about");
    assert_eq!(
        fs::read_to_string(&about).unwrap(),
        "This image was built with a greeting.\n"
    );
    assert_eq!(
        fs::metadata(&about).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let md = fs::metadata(rootfs.join("srv/site/style.css")).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o777), (0, 0, 0o644));

    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["process"]["args"],
        serde_json::json!(["/srv/site/index.html"])
    );
    assert_eq!(config["process"]["cwd"], "/srv");
}

#[test]
fn busybox_base_copy_chown_user_and_runc_run() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    busybox_base(&root, "busybox:test");
    let ctx = t.path().join("ctx");
    write(&ctx.join("hello.txt"), "hi from the image\n");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nCOPY --chown=app:staff hello.txt /home/app/\nUSER app\nWORKDIR /home/app/work\nCMD [\"/bin/sh\", \"-c\", \"cat /home/app/hello.txt; id -u; id -g; pwd\"]\n",
    );
    let layout = t.path().join("layout");
    build(
        &root,
        &ctx,
        &["-o", &format!("oci:{}:app", layout.display())],
    );
    let bundle = umoci_unpack(&layout, "app", t.path());
    let md = fs::metadata(bundle.join("rootfs/home/app/hello.txt")).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (1000, 50),
        "--chown names resolve through the image's passwd and group"
    );
    let wd = fs::metadata(bundle.join("rootfs/home/app/work")).unwrap();
    assert_eq!(wd.uid(), 1000, "WORKDIR is created for the USER");

    // runc needs no terminal here.
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["process"]["terminal"] = serde_json::json!(false);
    fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let id = format!("builder-test-{}", std::process::id());
    let out = run_ok(
        tool("runc")
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id),
    );
    assert_eq!(out, "hi from the image\n1000\n1000\n/home/app/work\n");
}

#[test]
fn skopeo_copies_between_every_export_format() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let oci_dir = t.path().join("oci");
    let oci_tar = t.path().join("image-oci.tar");
    let docker_tar = t.path().join("image-docker.tar");
    let digest = build(
        &root,
        &example_context(),
        &[
            "-t",
            "hello:2",
            "-o",
            &format!("oci:{}:v1", oci_dir.display()),
            "-o",
            &format!("oci-archive:{}:v1", oci_tar.display()),
            "-o",
            &format!("type=docker,dest={}", docker_tar.display()),
        ],
    );
    let inspect = |r: &str| -> serde_json::Value {
        serde_json::from_str(&run_ok(tool("skopeo").args(["inspect", r]))).unwrap()
    };
    assert_eq!(
        inspect(&format!("oci-archive:{}:v1", oci_tar.display()))["Digest"],
        digest.as_str()
    );
    let docker = inspect(&format!("docker-archive:{}", docker_tar.display()));
    assert_eq!(docker["Labels"]["org.opencontainers.image.title"], "hello");
    let copies = t.path().join("copies");
    for (i, src) in [
        format!("oci:{}:v1", oci_dir.display()),
        format!("oci-archive:{}:v1", oci_tar.display()),
        format!("docker-archive:{}", docker_tar.display()),
    ]
    .iter()
    .enumerate()
    {
        let dst = format!("oci:{}:c{}", copies.display(), i);
        run_ok(tool("skopeo").args(["copy", src, &dst]));
        assert_eq!(
            inspect(&dst)["Env"],
            serde_json::json!([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "GREETING=hello from builder"
            ])
        );
    }
    // builder reads its own archives back as bases.
    for base in [
        format!("oci-archive:{}:v1", oci_tar.display()),
        format!("docker-archive:{}", docker_tar.display()),
    ] {
        let ctx = t.path().join("ctx2");
        write(
            &ctx.join("Buildfile"),
            &format!("FROM {}\nLABEL rebuilt=yes\n", base),
        );
        let d = build(&t.path().join("root2"), &ctx, &[]);
        assert!(d.starts_with("sha256:"));
    }
    // Image commands.
    let images = run_ok(builder().args(["images", "--root"]).arg(&root));
    assert!(images.contains("hello:2"), "{images}");
    run_ok(
        builder()
            .args(["tag", "--root"])
            .arg(&root)
            .args(["hello:2", "hello:again"]),
    );
    let hist = run_ok(
        builder()
            .args(["history", "--root"])
            .arg(&root)
            .arg("hello:again"),
    );
    assert!(hist.contains("COPY site/ ./site/"), "{hist}");
    let exported = t.path().join("exported");
    run_ok(
        builder()
            .args(["export", "--root"])
            .arg(&root)
            .args(["hello:again", "-o"])
            .arg(format!("local:{}", exported.display())),
    );
    assert!(exported.join("srv/site/index.html").is_file());
    run_ok(
        builder()
            .args(["rm", "--root"])
            .arg(&root)
            .arg("hello:again"),
    );
    assert!(!run(builder()
        .args(["inspect", "--root"])
        .arg(&root)
        .arg("hello:again"))
    .status
    .success());
    run_ok(builder().args(["fsck", "--root"]).arg(&root));
}

#[test]
fn same_inputs_same_digest_across_roots_and_mtimes() {
    let t = tempfile::tempdir().unwrap();
    let copy_ctx = |dst: &Path, mtime: i64| {
        fs::create_dir_all(dst).unwrap();
        for e in walkdir::WalkDir::new(example_context()).min_depth(1) {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(example_context()).unwrap();
            let to = dst.join(rel);
            if e.file_type().is_dir() {
                fs::create_dir_all(&to).unwrap();
            } else {
                fs::copy(e.path(), &to).unwrap();
            }
            let ts = nix::sys::time::TimeSpec::new(mtime, 0);
            nix::sys::stat::utimensat(
                None,
                &to,
                &ts,
                &ts,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }
    };
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    // Two checkouts at different times: every mtime is later than the epoch and is clamped.
    copy_ctx(&a, 1_600_000_000);
    copy_ctx(&b, 1_650_000_000);
    let d1 = run_ok(
        builder()
            .env("SOURCE_DATE_EPOCH", "1500000000")
            .args(["build", "--root"])
            .arg(t.path().join("r1"))
            .arg(&a),
    );
    let d2 = run_ok(
        builder()
            .env("SOURCE_DATE_EPOCH", "1500000000")
            .args(["build", "--root"])
            .arg(t.path().join("r2"))
            .arg(&b),
    );
    assert_eq!(
        d1, d2,
        "fresh roots and different context mtimes give the same digest"
    );
    // A different epoch gives a different image (created and clamped mtimes change).
    let d3 = run_ok(
        builder()
            .env("SOURCE_DATE_EPOCH", "1400000000")
            .args(["build", "--root"])
            .arg(t.path().join("r3"))
            .arg(&b),
    );
    assert_ne!(d2, d3);
}

type Entry<'a> = (&'a str, tar::EntryType, &'a [u8], Option<&'a str>);

/// Write a tar layer by hand, with raw names the tar crate would refuse to produce.
fn evil_tar(path: &Path, entries: &[Entry]) {
    let f = fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(f);
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.set_link_name_literal(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn hostile_base_layers_are_refused_and_write_nothing_outside() {
    let t = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<Entry>)> = vec![
        (
            "dotdot",
            vec![(
                "../../../../../../tmp/BUILDER_PWNED_dotdot",
                tar::EntryType::Regular,
                b"x",
                None,
            )],
        ),
        (
            "hardlink-out",
            vec![(
                "link",
                tar::EntryType::Link,
                b"",
                Some("../../../../etc/passwd"),
            )],
        ),
    ];
    let fixtures = testdata("adversarial");
    fs::create_dir_all(&fixtures).unwrap();
    for (name, entries) in cases {
        let layer = fixtures.join(format!("{name}.tar"));
        evil_tar(&layer, &entries);
        let root = t.path().join(format!("root-{name}"));
        let out = run(builder()
            .args(["import", "--root"])
            .arg(&root)
            .arg(&layer)
            .args(["-t", &format!("evil:{name}")]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: must be refused");
        assert!(
            err.contains("entry") && err.contains(&layer.display().to_string()),
            "{name}: the error names the layer and entry: {err}"
        );
    }
    // An absolute name is taken relative to the layer root, as docker's and containerd's
    // unpackers take it: accepted, and written inside.
    let layer = fixtures.join("absolute.tar");
    evil_tar(
        &layer,
        &[(
            "/tmp/BUILDER_PWNED_abs",
            tar::EntryType::Regular,
            b"x",
            None,
        )],
    );
    let root = t.path().join("root-absolute");
    run_ok(
        builder()
            .args(["import", "--root"])
            .arg(&root)
            .arg(&layer)
            .args(["-t", "evil:absolute"]),
    );
    assert!(!Path::new("/tmp/BUILDER_PWNED_dotdot").exists());
    assert!(!Path::new("/tmp/BUILDER_PWNED_abs").exists());

    // A symlink, then a file written "through" it: neutralised inside the image.
    let layer = fixtures.join("symlink-then-file.tar");
    let target_dir = t.path().join("outside");
    fs::create_dir_all(&target_dir).unwrap();
    let link_target = target_dir.display().to_string();
    evil_tar(
        &layer,
        &[
            ("escape", tar::EntryType::Symlink, b"", Some(&link_target)),
            ("escape/pwned", tar::EntryType::Regular, b"x", None),
        ],
    );
    let root = t.path().join("root-symlink");
    run_ok(
        builder()
            .args(["import", "--root"])
            .arg(&root)
            .arg(&layer)
            .args(["-t", "evil:symlink"]),
    );
    assert!(
        !target_dir.join("pwned").exists(),
        "nothing is written through a symlink to the host"
    );
    let ctx = t.path().join("ctx");
    write(&ctx.join("Buildfile"), "FROM evil:symlink\nLABEL ok=1\n");
    let local = t.path().join("local");
    build(&root, &ctx, &["-o", &format!("local:{}", local.display())]);
    assert!(!target_dir.join("pwned").exists());
    assert!(
        local
            .join(link_target.trim_start_matches('/'))
            .join("pwned")
            .is_file(),
        "the file lands inside the image's own tree"
    );
}

#[test]
fn copy_refuses_context_symlink_to_host_file() {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", ctx.join("shadow")).unwrap();
    write(
        &ctx.join("Buildfile"),
        "FROM scratch\nCOPY shadow /shadow\n",
    );
    let out = run(builder()
        .args(["build", "--root"])
        .arg(t.path().join("root"))
        .arg(&ctx));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Buildfile:2:1")
            && err.contains(
                "shadow: is a symlink to /etc/shadow, which is outside the build context"
            ),
        "{err}"
    );
    // A directory copy keeps the symlink as a symlink and never reads the host file.
    write(&ctx.join("Buildfile"), "FROM scratch\nCOPY . /ctx/\n");
    let local = t.path().join("local");
    build(
        &t.path().join("root"),
        &ctx,
        &["-o", &format!("local:{}", local.display())],
    );
    assert_eq!(
        fs::read_link(local.join("ctx/shadow")).unwrap(),
        Path::new("/etc/shadow")
    );
}

#[test]
fn copy_rules_match_docker() {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(&ctx.join("dir/a.txt"), "a");
    write(&ctx.join("dir/sub/b.txt"), "b");
    write(&ctx.join("one.txt"), "1");
    write(&ctx.join("two.txt"), "2");
    write(&ctx.join("ignored.log"), "no");
    write(&ctx.join(".dockerignore"), "*.log\n");
    write(&ctx.join("arch/data.txt"), "inside the archive");
    let tgz = ctx.join("archive.tar.gz");
    {
        let f = fs::File::create(&tgz).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        let mut b = tar::Builder::new(gz);
        b.append_dir_all("arch", ctx.join("arch")).unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    write(
        &ctx.join("Buildfile"),
        "FROM scratch AS src\nCOPY one.txt /from-stage.txt\n\
         FROM scratch\nWORKDIR /w\nCOPY dir /contents/\nCOPY dir/a.txt renamed.txt\nCOPY *.txt /many/\nCOPY --parents dir/sub/b.txt /p/\n\
         COPY --exclude=sub dir /excl/\nADD archive.tar.gz /unpacked/\nCOPY --from=src /from-stage.txt /copied-from-stage.txt\nCOPY . /all/\n",
    );
    let local = t.path().join("local");
    build(
        &t.path().join("root"),
        &ctx,
        &["-o", &format!("local:{}", local.display())],
    );
    let read = |p: &str| fs::read_to_string(local.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(
        read("contents/a.txt"),
        "a",
        "a directory source copies its contents"
    );
    assert_eq!(read("contents/sub/b.txt"), "b");
    assert!(!local.join("contents/dir").exists());
    assert_eq!(
        read("w/renamed.txt"),
        "a",
        "relative destinations are under WORKDIR"
    );
    assert_eq!(read("many/one.txt"), "1");
    assert_eq!(read("many/two.txt"), "2");
    assert_eq!(
        read("p/dir/sub/b.txt"),
        "b",
        "--parents keeps the source path"
    );
    assert!(
        local.join("excl/a.txt").exists() && !local.join("excl/sub").exists(),
        "--exclude"
    );
    assert_eq!(
        read("unpacked/arch/data.txt"),
        "inside the archive",
        "ADD extracts local archives"
    );
    assert_eq!(read("copied-from-stage.txt"), "1");
    assert!(
        !local.join("all/ignored.log").exists(),
        ".dockerignore applies to COPY"
    );
    assert!(local.join("all/one.txt").exists());
}

/// Answer every request with a redirect to `location`; returns the port.
fn serve_redirect(location: &str, requests: usize) -> u16 {
    let head = format!(
        "HTTP/1.1 302 Found\r\nLocation: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        location
    );
    serve_raw(head.into_bytes(), requests)
}

#[test]
fn add_fetches_urls_and_verifies_checksums() {
    let body: &'static [u8] = b"remote file content\n";
    let port = serve(body.to_vec(), 4);
    let sum = format!("sha256:{}", builder::oci::digest::Digest::of(body).hex());
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        &format!(
            "FROM scratch\nADD --checksum={sum} http://127.0.0.1:{port}/files/remote.txt /dl/\n"
        ),
    );
    let local = t.path().join("local");
    build(
        &t.path().join("root"),
        &ctx,
        &["-o", &format!("local:{}", local.display())],
    );
    assert_eq!(fs::read(local.join("dl/remote.txt")).unwrap(), body);
    // A wrong checksum fails the build and says so.
    let bad = format!("sha256:{}", "0".repeat(64));
    write(
        &ctx.join("Buildfile"),
        &format!(
            "FROM scratch\nADD --checksum={bad} http://127.0.0.1:{port}/files/remote.txt /dl/\n"
        ),
    );
    let out = run(builder()
        .args(["build", "--root"])
        .arg(t.path().join("root"))
        .arg(&ctx));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn add_refuses_redirects_to_other_schemes_and_follows_http_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let ctx = dir.path().join("ctx");
    let port = serve_redirect("file:///etc/passwd", 1);
    write(
        &ctx.join("Buildfile"),
        &format!("FROM scratch\nADD http://127.0.0.1:{port}/x /x\n"),
    );
    let out = run(builder()
        .args(["build", "--progress", "plain", "--root"])
        .arg(&root)
        .arg(&ctx));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "an error, not a panic: {err}");
    assert!(
        err.contains("file") && err.contains("only http and https"),
        "{err}"
    );

    // An http redirect to another server is followed.
    let target = serve(b"moved here\n".to_vec(), 1);
    let port = serve_redirect(&format!("http://127.0.0.1:{target}/real.txt"), 1);
    write(
        &ctx.join("Buildfile"),
        &format!("FROM scratch\nADD http://127.0.0.1:{port}/x /dl/\n"),
    );
    let local = dir.path().join("local");
    build(&root, &ctx, &["-o", &format!("local:{}", local.display())]);
    assert_eq!(
        fs::read_to_string(local.join("dl/x")).unwrap(),
        "moved here\n"
    );
}

#[test]
fn from_scratch_starts_with_dockers_path_and_working_directory() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let ctx = t.path().join("ctx");
    write(&ctx.join("Buildfile"), "FROM scratch\nLABEL a=b\n");
    build(&root, &ctx, &["-t", "s:1"]);
    let out = run_ok(builder().args(["inspect", "--root"]).arg(&root).arg("s:1"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let config = v
        .pointer("/config/config")
        .or_else(|| v.pointer("/config"))
        .cloned()
        .unwrap_or_default();
    let text = config.to_string();
    assert!(
        text.contains("\"WorkingDir\":\"/\"")
            && text.contains("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "{out}"
    );
}

#[test]
fn history_has_an_empty_layer_entry_per_arg_and_none_for_onbuild() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let ctx = t.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM scratch\nARG A=1\nARG B\nONBUILD RUN echo hi\nLABEL a=b\n",
    );
    // A --build-arg value never shows in the history: the default as written does.
    build(&root, &ctx, &["-t", "h:1", "--build-arg", "A=9"]);
    let out = run_ok(builder().args(["inspect", "--root"]).arg(&root).arg("h:1"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let history = v["config"]["history"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let created: Vec<&str> = history
        .iter()
        .map(|h| h["created_by"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(created, ["ARG A=1", "ARG B", "LABEL a=b"], "{out}");
    assert!(history.iter().all(|h| h["empty_layer"] == true));
}

#[test]
fn force_compression_recompresses_inherited_layers_with_the_same_content() {
    let base = busybox_dir();
    let root = base.path().join("root");
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    write(&ctx.join("a.txt"), "zstd me\n");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nCOPY a.txt /a.txt\n",
    );
    let layout = t.path().join("layout");
    let zstd = ["--compression", "zstd"];
    // Without the flag, the base's gzip layer stays as it is; the step's layer is zstd.
    build(
        &root,
        &ctx,
        &[
            &zstd[..],
            &["-o", &format!("oci:{}:kept", layout.display())],
        ]
        .concat(),
    );
    let kept = layout_layers(&layout, "kept");
    assert_eq!(kept.len(), 2);
    assert!(kept[0].0.ends_with("tar+gzip"), "{:?}", kept);
    assert!(kept[1].0.ends_with("tar+zstd"), "{:?}", kept);

    let forced_out = format!("oci:{}:forced", layout.display());
    let forced_args = [&zstd[..], &["--force-compression", "-o", &forced_out]].concat();
    let out = run(build_cmd(&root).args(&forced_args).arg(&ctx));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}", log);
    assert!(log.contains("compressed again as"), "{}", log);
    let forced = layout_layers(&layout, "forced");
    assert!(
        forced.iter().all(|l| l.0.ends_with("tar+zstd")),
        "{:?}",
        forced
    );
    // The same tars inside: the diff_ids are the base's, and only the base blob changed.
    assert_eq!(
        forced.iter().map(|l| &l.2).collect::<Vec<_>>(),
        kept.iter().map(|l| &l.2).collect::<Vec<_>>()
    );
    assert_ne!(forced[0].1, kept[0].1);
    assert_eq!(forced[1].1, kept[1].1);
    // oci-image-tool 1.0.0-rc1 and umoci predate zstd layers: skopeo decompresses them
    // (checking each blob's digest) into a gzip copy, which umoci unpacks.
    let gzip_copy = t.path().join("gzip-copy");
    run_ok(
        tool("skopeo")
            .args(["copy", "--dest-compress", "--dest-compress-format", "gzip"])
            .arg(format!("oci:{}:forced", layout.display()))
            .arg(format!("oci:{}:forced", gzip_copy.display())),
    );
    let bundle = umoci_unpack(&gzip_copy, "forced", t.path());
    assert_eq!(
        fs::read_to_string(bundle.join("rootfs/a.txt")).unwrap(),
        "zstd me\n"
    );
    assert!(bundle.join("rootfs/bin/busybox").is_file());

    // A rebuild gives the same image without compressing the base again.
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let again = run(build_cmd(&root).args(&forced_args).arg(&ctx));
    let log = String::from_utf8_lossy(&again.stderr).into_owned();
    assert!(again.status.success(), "{}", log);
    assert!(!log.contains("compressed again as"), "{}", log);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout)
            .lines()
            .last()
            .unwrap(),
        first
    );
    // The conversion's memo lives as long as its blob: a prune that removes the blob
    // removes the memo.
    let memos = || fs::read_dir(root.join("converted")).map_or(0, |d| d.count());
    assert_eq!(memos(), 1);
    run_ok(
        builder()
            .args(["cache", "prune", "--all", "--root"])
            .arg(&root),
    );
    assert_eq!(memos(), 0);
}
