//! A fleet of CI runners sharing one registry (the real distribution server on 127.0.0.1):
//! concurrent builders pushing the same blobs, cache refs and tags; the inline cache;
//! per-platform images pushed by digest and joined by `imagetools create`; cache mounts that
//! travel with the remote cache.

mod common;

use common::registry::*;
use common::*;

/// The registry's view of `reference`: its manifest digest, by skopeo.
fn inspect_digest(reg: &Registry, reference: &str) -> Result<String, String> {
    let out = run(tool("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/{}", reg.host(), reference),
    ]));
    if !out.status.success() {
        return Err(stderr_of(&out));
    }
    Ok(format!("sha256:{}", sha256_hex(&out.stdout)))
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
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
