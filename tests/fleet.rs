//! A fleet of CI runners sharing one registry (the real distribution server on 127.0.0.1):
//! concurrent builders pushing the same blobs, cache refs and tags; the inline cache;
//! per-platform images pushed by digest and joined by `imagetools create`; cache mounts that
//! travel with the remote cache.

mod common;

use common::registry::*;
use common::*;

/// The manifest the registry holds for `reference`, as skopeo reads it.
fn raw_manifest(reg: &Registry, reference: &str) -> Result<Vec<u8>, String> {
    let out = run(tool("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/{}", reg.host(), reference),
    ]));
    if !out.status.success() {
        return Err(stderr_of(&out));
    }
    Ok(out.stdout)
}

/// The registry's view of `reference`: its manifest digest.
fn inspect_digest(reg: &Registry, reference: &str) -> Result<String, String> {
    use sha2::Digest;
    let bytes = raw_manifest(reg, reference)?;
    Ok(format!("sha256:{:x}", sha2::Sha256::digest(&bytes)))
}

#[test]
fn concurrent_builders_sharing_a_cache_ref_and_a_tag_never_fail() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let rounds: usize = std::env::var("FLEET_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let builders = 4;
    let cache = format!("{}/cache:main", reg.host());
    let tag = format!("{}/k1:latest", reg.host());
    for round in 0..rounds {
        // Each round changes a file the last steps read: new layers, new manifests, the
        // same base and first steps (blobs every builder pushes at once).
        let ctx = context(&[
            (
                "Buildfile",
                format!(
                    "FROM {}/base\nRUN echo shared > /shared\nCOPY round /round\nRUN cat /round > /copy\n",
                    reg.host()
                ),
            ),
            ("round", format!("round {}\n", round)),
        ]);
        let results: Vec<(bool, String, String)> = std::thread::scope(|s| {
            let running: Vec<_> = (0..builders)
                .map(|_| {
                    let (user, ctx, cache, tag) = (&user, ctx.path(), &cache, &tag);
                    s.spawn(move || {
                        let root = tempfile::tempdir().unwrap();
                        let out = run(user
                            .on("build", root.path())
                            .args(["--progress", "plain"])
                            .args(["--cache-from", &format!("type=registry,ref={}", cache)])
                            .args([
                                "--cache-to",
                                &format!("type=registry,ref={},mode=max", cache),
                            ])
                            .args(["-t", tag, "--push"])
                            .arg(ctx));
                        (
                            out.status.success(),
                            last_line(&String::from_utf8_lossy(&out.stdout)),
                            stderr_of(&out),
                        )
                    })
                })
                .collect();
            running.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (ok, _, log) in &results {
            if !ok {
                // What the registry saw of the blobs the error names.
                let named: Vec<String> = reg
                    .requests()
                    .into_iter()
                    .filter(|r| {
                        log.split("sha256:")
                            .skip(1)
                            .any(|d| r.contains(&d[..12.min(d.len())]))
                    })
                    .collect();
                panic!(
                    "round {}: a builder failed:\n{}\nrequests: {:#?}",
                    round, log, named
                );
            }
        }
        // Every builder made the same image; the tag names it, whole.
        let digest = &results[0].1;
        assert!(results.iter().all(|(_, d, _)| d == digest), "{:?}", results);
        assert!(inspect_digest(&reg, "k1:latest").is_ok());
        inspect_digest(&reg, "cache:main").unwrap_or_else(|e| panic!("round {round}: {e}"));
        let root = tempfile::tempdir().unwrap();
        run_ok(user.on("pull", root.path()).arg(&tag));
        run_ok(&mut user.on("fsck", root.path()));
    }
}

#[test]
fn an_inline_cached_image_makes_a_fresh_build_all_hits() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let ctx = cache_context(&reg);
    let image = format!("{}/app:inline", reg.host());
    let inline = ["--cache-to".to_string(), "type=inline".to_string()];
    let push = ["-t".to_string(), image.clone(), "--push".to_string()];
    let (steps, built, _) = build_fresh(&user, ctx.path(), &[&inline[..], &push[..]].concat());
    assert!(steps.iter().all(|s| s == "DONE"), "{steps:?}");
    // The records are in the pushed image's config.
    let out = run_ok(tool("skopeo").args([
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}", image),
    ]));
    let config: serde_json::Value = serde_json::from_str(&out).unwrap();
    let records = config["builder.cache.v0"]["records"].as_array().unwrap();
    // The final stage's steps: COPY --from, RUN, COPY, RUN (inline is mode=min).
    assert_eq!(records.len(), 4, "{config}");

    // A fresh store: the final stage's steps all hit, and the image is the same.
    let from = [
        "--cache-from".to_string(),
        format!("type=registry,ref={}", image),
    ];
    // (Both push: a pushed build names the index with its attestations.)
    let again = [
        "-t".to_string(),
        format!("{}/app:again", reg.host()),
        "--push".to_string(),
    ];
    let (steps, digest, log) = build_fresh(
        &user,
        ctx.path(),
        &[&from[..], &inline[..], &again[..]].concat(),
    );
    // The deps stage is not in a mode=min cache: its RUN runs; the final stage's hit.
    assert_eq!(steps, ["DONE", "CACHED", "CACHED"], "{log}");
    assert_eq!(digest, built);
    assert_eq!(
        layers_downloaded(&log),
        1,
        "only the base layer the deps RUN reads: {log}"
    );

    // Without --cache-to type=inline the image has no records (and its own digest).
    let (_, plain, _) = build_fresh(&user, ctx.path(), &[&from[..], &again[..]].concat());
    assert_ne!(plain, built);
    // An image without records is refused as a cache by name.
    let out = run(user
        .on("build", tempfile::tempdir().unwrap().path())
        .args([
            "--cache-from",
            &format!("type=registry,ref={}/base", reg.host()),
        ])
        .arg(ctx.path()));
    assert!(
        out.status.success(),
        "a cache that cannot be had is a warning"
    );
    assert!(
        stderr_of(&out)
            .contains("neither a builder cache nor an image built with --cache-to type=inline"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn per_platform_images_pushed_by_digest_join_into_the_single_builds_index() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    let ctx = context(&[
        (
            "Buildfile",
            "FROM scratch\nARG TARGETARCH\nCOPY hello /hello-$TARGETARCH\n".to_string(),
        ),
        ("hello", "hello\n".to_string()),
    ]);
    let repo = format!("{}/multi", reg.host());
    // One build of both platforms.
    let (_, single, _) = build_fresh(
        &user,
        ctx.path(),
        &[
            "--platform".into(),
            "linux/amd64,linux/arm64".into(),
            "-t".into(),
            format!("{}:both", repo),
            "--push".into(),
        ],
    );
    // One machine per platform, each pushing by digest alone.
    let by_digest = |platform: &str| {
        let (_, digest, log) = build_fresh(
            &user,
            ctx.path(),
            &[
                "--platform".into(),
                platform.into(),
                "-o".into(),
                format!("type=image,name={},push-by-digest=true,push=true", repo),
            ],
        );
        assert!(
            log.contains(&format!("pushed {}@{}", repo, digest)),
            "{log}"
        );
        digest
    };
    let amd64 = by_digest("linux/amd64");
    let arm64 = by_digest("linux/arm64");
    // No tag was pushed for them, but the referrers tags that list each platform image's
    // attestations (this registry has no referrers API).
    let tags = run_ok(tool("skopeo").args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}", repo),
    ]));
    let tags: serde_json::Value = serde_json::from_str(&tags).unwrap();
    let mut names: Vec<&str> = tags["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    names.sort();
    let mut expected = vec![
        "both".to_string(),
        format!("sha256-{}", amd64.trim_start_matches("sha256:")),
        format!("sha256-{}", arm64.trim_start_matches("sha256:")),
    ];
    expected.sort();
    assert_eq!(names, expected, "{tags}");

    // Joined: the very index the single build pushed.
    let root = tempfile::tempdir().unwrap();
    let joined = run_ok(
        user.builder()
            .args(["imagetools", "create", "--root"])
            .arg(root.path())
            .args(["-t", &format!("{}:joined", repo)])
            .arg(format!("{}@{}", repo, amd64))
            .arg(format!("{}@{}", repo, arm64)),
    );
    assert_eq!(last_line(&joined), single);
    assert_eq!(inspect_digest(&reg, "multi:joined").unwrap(), single);
    let shown = run_ok(
        user.builder()
            .args(["imagetools", "inspect"])
            .arg(format!("{}:joined", repo)),
    );
    assert!(
        shown.contains("Platform:    linux/amd64") && shown.contains("Platform:    linux/arm64"),
        "{shown}"
    );
    // Each platform pulls from the joined index.
    for p in ["linux/amd64", "linux/arm64"] {
        let r = tempfile::tempdir().unwrap();
        run_ok(
            user.on("pull", r.path())
                .args(["--platform", p])
                .arg(format!("{}:joined", repo)),
        );
    }
}

/// The cache artifact's document at `reference` (its config blob), from the registry.
fn cache_document(reg: &Registry, reference: &str) -> serde_json::Value {
    let manifest: serde_json::Value =
        serde_json::from_slice(&raw_manifest(reg, reference).unwrap()).unwrap();
    let repo = reference.split(':').next().unwrap();
    let url = format!(
        "http://{}/v2/{}/blobs/{}",
        reg.host(),
        repo,
        manifest["config"]["digest"].as_str().unwrap()
    );
    serde_json::from_str(&ureq::get(&url).call().unwrap().into_string().unwrap()).unwrap()
}

fn mount_layers(doc: &serde_json::Value) -> Vec<String> {
    doc["mounts"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|ls| ls.as_array().unwrap().iter())
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_cache_mount_filled_on_one_machine_is_warm_on_the_next() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let run = "RUN --mount=type=cache,target=/cache,id=pkgs sh -c 'if [ -f /cache/marker ]; then echo \"mount=$(cat /cache/marker)\"; else echo \"mount=$((0))-cold\"; for i in $(busybox seq 1 96); do busybox dd if=/dev/urandom of=/cache/pkg-$i bs=64k count=4 2>/dev/null; done; echo warm > /cache/marker; fi; echo x > /cache/extra-$(cat /round); cat /round > /copy'";
    let buildfile = format!("FROM {}/base\nCOPY round /round\n{}\n", reg.host(), run);
    let ctx = context(&[("Buildfile", buildfile.clone()), ("round", "1\n".into())]);
    let cache = format!("{}/cache:mounts", reg.host());
    let to = [
        "--cache-to".to_string(),
        format!("type=registry,ref={},mode=max", cache),
    ];
    let from = [
        "--cache-from".to_string(),
        format!("type=registry,ref={}", cache),
    ];
    // Machine A fills the mount and exports it.
    let (_, _, log) = build_fresh(&user, ctx.path(), &to);
    assert!(log.contains("mount=0-cold"), "{log}");
    let first = cache_document(&reg, "cache:mounts");
    let first_layers = mount_layers(&first);
    assert!(
        first_layers.len() >= 4,
        "a 24 MiB mount travels in groups: {first}"
    );

    // Every step hits: the mount is not downloaded.
    let before = reg.requests().len();
    let (steps, _, log) = build_fresh(&user, ctx.path(), &from);
    assert_eq!(steps, ["CACHED"], "{log}");
    let fetched: Vec<String> = reg.requests()[before..]
        .iter()
        .filter(|r| r.starts_with("GET ") && first_layers.iter().any(|l| r.contains(l.as_str())))
        .cloned()
        .collect();
    assert!(
        fetched.is_empty(),
        "mount layers fetched for a build that ran nothing: {fetched:?}"
    );

    // Machine B: the RUN misses, and finds the mount warm; its export uploads only what
    // changed (the new file's group).
    write(&ctx.path().join("round"), "2\n");
    let before = reg.requests().len();
    let (steps, _, log) = build_fresh(&user, ctx.path(), &[&from[..], &to[..]].concat());
    assert_eq!(steps, ["DONE"], "{log}");
    assert!(log.contains("mount=warm"), "the mount came back: {log}");
    assert!(log.contains("cache mount pkgs restored from"), "{log}");
    let second_layers = mount_layers(&cache_document(&reg, "cache:mounts"));
    let uploaded: Vec<&String> = second_layers
        .iter()
        .filter(|l| {
            reg.requests()[before..].iter().any(|r| {
                r.starts_with("PUT ") && r.contains("/blobs/uploads/") && r.contains(l.as_str())
            })
        })
        .collect();
    eprintln!(
        "cache mount: {} groups; the second export uploaded {} of {}",
        first_layers.len(),
        uploaded.len(),
        second_layers.len()
    );
    assert!(
        !uploaded.is_empty() && uploaded.len() <= 2,
        "{} of {} mount groups uploaded again",
        uploaded.len(),
        second_layers.len()
    );

    // Opting out leaves the mounts home.
    let out_dir = tempfile::tempdir().unwrap();
    build_fresh(
        &user,
        ctx.path(),
        &[
            "--cache-to".to_string(),
            format!(
                "type=local,dest={},mode=max,cache-mounts=false",
                out_dir.path().display()
            ),
        ],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.path().join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out_dir.path().join("blobs/sha256").join(&manifest_digest)).unwrap(),
    )
    .unwrap();
    let config = manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out_dir.path().join("blobs/sha256").join(config)).unwrap(),
    )
    .unwrap();
    assert!(mount_layers(&doc).is_empty(), "{doc}");
}
