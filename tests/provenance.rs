//! Provenance that travels: attestations as OCI 1.1 referrers of their image in layouts
//! and registries (the referrers tag where the registry has no API), `builder diff` between
//! images wherever they are, and `builder verify`, which rebuilds a published image from its
//! provenance and fails on anything else: an edited context, or an edited provenance.

mod common;

use std::path::Path;

use common::registry::*;
use common::*;
use serde_json::Value;

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A multi-stage app FROM `base`: a RUN that reads a build arg beside the context it
/// copies, then a scratch stage that copies both.
fn app_context(base: &str) -> tempfile::TempDir {
    context(&[
        (
            "Buildfile",
            format!(
                "FROM {base} AS build\nARG GREETING=hello\nCOPY src /src\nRUN echo \"$GREETING\" > /greeting && uname -m > /machine\n\nFROM scratch\nCOPY --from=build /src/ /greeting /machine /out/\n"
            ),
        ),
        ("src/a", "file a\n".into()),
        ("src/b", "file b\n".into()),
    ])
}

/// A copy of `ctx` with `src/a` edited.
fn edited_copy(ctx: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", ctx.display()))
            .arg(copy.path()),
    );
    write(&copy.path().join("src/a"), "file a, edited\n");
    copy
}

/// The entries of a layout's index.json that are attestation manifests about `image`.
fn referrers_in_layout(layout: &Path, image: &str) -> Vec<Value> {
    read_json(&layout.join("index.json"))["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["annotations"]["vnd.docker.reference.digest"] == image)
        .cloned()
        .collect()
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap()
}

fn put_blob(layout: &Path, bytes: &[u8]) -> String {
    let hex = sha256_hex(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    format!("sha256:{}", hex)
}

/// Edit the provenance statement about `image` in a layout as `edit` says, and rewrite the
/// attestation manifest and index.json to match (a consistent forgery: every digest holds).
fn tamper_provenance(layout: &Path, image: &str, edit: &dyn Fn(&mut Value)) {
    let mut index = read_json(&layout.join("index.json"));
    let entries = index["manifests"].as_array_mut().unwrap();
    let entry = entries
        .iter_mut()
        .find(|m| m["annotations"]["vnd.docker.reference.digest"] == image)
        .expect("the image has an attestation manifest in the layout");
    let mut manifest: Value =
        serde_json::from_slice(&blob(layout, entry["digest"].as_str().unwrap())).unwrap();
    let layer = manifest["layers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|l| l["annotations"]["in-toto.io/predicate-type"] == "https://slsa.dev/provenance/v1")
        .unwrap();
    let mut statement: Value =
        serde_json::from_slice(&blob(layout, layer["digest"].as_str().unwrap())).unwrap();
    edit(&mut statement);
    let bytes = serde_json::to_vec(&statement).unwrap();
    layer["digest"] = Value::from(put_blob(layout, &bytes));
    layer["size"] = Value::from(bytes.len());
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    entry["digest"] = Value::from(put_blob(layout, &mbytes));
    entry["size"] = Value::from(mbytes.len());
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_layout_holds_its_provenance_as_a_referrer_and_stays_readable() {
    let d = busybox_dir();
    let root = d.path().join("root");
    let ctx = app_context("busybox:test");
    let layout = d.path().join("layout");
    let printed = last_line(&run_ok(
        build_cmd(&root)
            .args(["-o", &format!("oci:{}:v1", layout.display())])
            .arg(ctx.path()),
    ));
    let index = read_json(&layout.join("index.json"));
    let tagged: Vec<&Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "v1")
        .collect();
    assert_eq!(tagged.len(), 1, "{index}");
    assert_eq!(
        tagged[0]["digest"],
        printed.as_str(),
        "the tag names the image"
    );
    assert_eq!(
        tagged[0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let referrers = referrers_in_layout(&layout, &printed);
    assert_eq!(referrers.len(), 1, "{index}");
    assert_eq!(
        referrers[0]["artifactType"],
        "application/vnd.docker.attestation.manifest.v1+json"
    );
    assert!(referrers[0]["annotations"]["org.opencontainers.image.ref.name"].is_null());
    let manifest: Value =
        serde_json::from_slice(&blob(&layout, referrers[0]["digest"].as_str().unwrap())).unwrap();
    assert_eq!(manifest["subject"]["digest"], printed.as_str());
    let statement: Value = serde_json::from_slice(&blob(
        &layout,
        manifest["layers"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(
        format!(
            "sha256:{}",
            statement["subject"][0]["digest"]["sha256"]
                .as_str()
                .unwrap()
        ),
        printed
    );
    // The reference tools read the layout as before.
    run_ok(
        tool("oci-image-tool")
            .args(["validate", "--type", "image", "--ref", "name=v1"])
            .arg(&layout),
    );
    let bundle = umoci_unpack(&layout, "v1", d.path());
    assert!(bundle.join("rootfs/out/a").is_file());
    // A build FROM the layout without a tag takes the image, not its attestation.
    let from = context(&[(
        "Buildfile",
        format!("FROM oci:{}\nENV FROM_LAYOUT=1\n", layout.display()),
    )]);
    run_ok(build_cmd(&root).arg(from.path()));
    // BuildKit's layout, asked for: the tag names an index with the attestation manifest.
    let attested = d.path().join("attested");
    let index_digest = last_line(&run_ok(
        build_cmd(&root)
            .args(["--attest-layout", "index"])
            .args(["-o", &format!("oci:{}:v1", attested.display())])
            .arg(ctx.path()),
    ));
    let nested: Value = serde_json::from_slice(&blob(&attested, &index_digest)).unwrap();
    let kinds: Vec<&str> = nested["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["vnd.docker.reference.type"]
                .as_str()
                .unwrap_or("image")
        })
        .collect();
    assert_eq!(kinds, ["image", "attestation-manifest"]);
    assert_eq!(nested["manifests"][0]["digest"], printed.as_str());
}

#[test]
fn a_push_lists_the_attestations_as_referrers_and_a_pull_brings_them() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let ctx = app_context(&format!("{}/base", reg.host()));
    let a = tempfile::tempdir().unwrap();
    let app = format!("{}/app:1", reg.host());
    let built = last_line(&run_ok(
        user.on("build", a.path())
            .args(["--progress", "plain", "-t", &app, "--push"])
            .arg(ctx.path()),
    ));
    let skopeo_raw = |reference: &str| {
        run_ok(
            tool("skopeo")
                .args(["inspect", "--raw", "--tls-verify=false"])
                .arg(format!("docker://{}", reference)),
        )
    };
    let raw = skopeo_raw(&app);
    assert_eq!(format!("sha256:{}", sha256_hex(raw.as_bytes())), built);
    let image: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        image["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "the tag names the image itself"
    );
    // The registry (distribution 2.x) has no referrers API: the fallback tag lists them.
    let hex = built.trim_start_matches("sha256:");
    let referrers: Value =
        serde_json::from_str(&skopeo_raw(&format!("{}/app:sha256-{}", reg.host(), hex))).unwrap();
    let list = referrers["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{referrers}");
    assert_eq!(
        list[0]["artifactType"],
        "application/vnd.docker.attestation.manifest.v1+json"
    );
    let att: Value = serde_json::from_str(&skopeo_raw(&format!(
        "{}/app@{}",
        reg.host(),
        list[0]["digest"].as_str().unwrap()
    )))
    .unwrap();
    assert_eq!(att["subject"]["digest"], built.as_str());
    // Pushing again adds nothing to the referrers.
    run_ok(
        user.on("build", a.path())
            .args(["-t", &app, "--push"])
            .arg(ctx.path()),
    );
    let again: Value =
        serde_json::from_str(&skopeo_raw(&format!("{}/app:sha256-{}", reg.host(), hex))).unwrap();
    assert_eq!(again["manifests"].as_array().unwrap().len(), 1, "{again}");
    // A pull brings them; a push elsewhere takes them along.
    let b = tempfile::tempdir().unwrap();
    run_ok(user.on("pull", b.path()).arg(&app));
    run_ok(
        user.on("push", b.path())
            .arg(&app)
            .arg(format!("{}/copy:1", reg.host())),
    );
    let copied: Value =
        serde_json::from_str(&skopeo_raw(&format!("{}/copy:sha256-{}", reg.host(), hex))).unwrap();
    assert_eq!(copied["manifests"][0]["digest"], list[0]["digest"]);
    let shown = run_ok(user.builder().args(["imagetools", "inspect"]).arg(&app));
    assert!(
        shown.contains(list[0]["digest"].as_str().unwrap()),
        "imagetools inspect lists the referrer: {shown}"
    );
}

/// `builder diff A B` exits 1 and its explanation names `src/a`.
fn assert_diff_names_the_edit(user: &User, root: &Path, a: &str, b: &str) {
    let out = run(user.on("diff", root).args([a, b]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr_of(&out));
    assert!(
        text.contains("context file src/a:") && text.contains("because src/a changed"),
        "diff {a} {b} names the edited file:\n{text}"
    );
}

#[test]
fn diff_names_the_edited_file_between_layouts_registries_and_both() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let ctx = app_context(&format!("{}/base", reg.host()));
    let edited = edited_copy(ctx.path());
    // Two machines: two stores, one context each.
    let (m1, m2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (l1, l2) = (m1.path().join("layout"), m2.path().join("layout"));
    for (m, l, c, tag) in [(&m1, &l1, ctx.path(), "1"), (&m2, &l2, edited.path(), "2")] {
        run_ok(
            user.on("build", &m.path().join("root"))
                .args(["-o", &format!("oci:{}:t", l.display())])
                .args(["-t", &format!("{}/app:{}", reg.host(), tag), "--push"])
                .arg(c),
        );
    }
    let elsewhere = tempfile::tempdir().unwrap();
    let oci = |l: &Path| format!("oci:{}:t", l.display());
    assert_diff_names_the_edit(&user, elsewhere.path(), &oci(&l1), &oci(&l2));
    let (r1, r2) = (
        format!("{}/app:1", reg.host()),
        format!("{}/app:2", reg.host()),
    );
    assert_diff_names_the_edit(&user, elsewhere.path(), &r1, &r2);
    assert_diff_names_the_edit(&user, elsewhere.path(), &oci(&l1), &r2);
    // The same image in two places is identical.
    let same = run(user.on("diff", elsewhere.path()).args([&oci(&l1), &r1]));
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );
}

#[test]
fn verify_rebuilds_a_published_image_and_fails_on_any_edit() {
    let Some(arm64) = arm64_busybox("verify_rebuilds_a_published_image_and_fails_on_any_edit")
    else {
        return;
    };
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    // A two-platform base at the registry.
    let base_root = tempfile::tempdir().unwrap();
    let base_dir = tempfile::tempdir().unwrap();
    two_platform_base(base_root.path(), base_dir.path(), &arm64);
    run_ok(
        user.on("push", base_root.path())
            .arg("multi-base:1")
            .arg(format!("{}/base:1", reg.host())),
    );
    let ctx = app_context(&format!("{}/base:1", reg.host()));
    let ci = tempfile::tempdir().unwrap();
    let app = format!("{}/app:1", reg.host());
    let layout = ci.path().join("layout");
    let built = last_line(&run_ok(
        user.on("build", &ci.path().join("root"))
            .args(["--platform", "linux/amd64,linux/arm64"])
            .args(["--build-arg", "GREETING=hi"])
            .args(["-t", &app, "--push"])
            .args(["-o", &format!("oci:{}:t", layout.display())])
            .arg(ctx.path()),
    ));
    let verify = |reference: &str, context: &Path, extra: &[&str]| {
        let out = run(user
            .on("verify", tempfile::tempdir().unwrap().path())
            .arg(reference)
            .arg("--context")
            .arg(context)
            .args(extra));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr_of(&out),
        )
    };
    // Reproduced from a fresh store: both platforms.
    let (code, text, err) = verify(&app, ctx.path(), &[]);
    assert_eq!(code, Some(0), "{text}{err}");
    assert!(
        text.contains("linux/amd64: reproduced") && text.contains("linux/arm64: reproduced"),
        "{text}"
    );
    assert!(text.contains("build arg GREETING=hi"), "{text}");
    let (code, json, _) = verify(&app, ctx.path(), &["--format", "json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["reproduced"], true);
    assert_eq!(v["digest"], built.as_str());
    assert_eq!(v["platforms"].as_array().unwrap().len(), 2);

    // An edited context: named before building, and by the explanation.
    let edited = edited_copy(ctx.path());
    let (code, text, err) = verify(&app, edited.path(), &[]);
    assert_eq!(code, Some(1), "{text}{err}");
    assert!(
        text.contains("context files that differ from the provenance")
            && text.contains("  src/a: recorded file")
            && text.contains("because src/a changed"),
        "{text}"
    );

    // A provenance whose build args were edited (every digest rewritten to match) fails,
    // and the arg is named.
    let index: Value = read_json(&layout.join("index.json"));
    let tagged = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "t")
        .unwrap()
        .clone();
    assert_eq!(tagged["digest"], built.as_str());
    let platforms: Value =
        serde_json::from_slice(&blob(&layout, tagged["digest"].as_str().unwrap())).unwrap();
    let amd64 = platforms["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, text, err) = verify(&format!("oci:{}:t", layout.display()), ctx.path(), &[]);
    assert_eq!(code, Some(0), "the untouched layout verifies: {text}{err}");
    // A forged copy of the layout, its provenance about the amd64 image edited: verified.
    let forged = |name: &str, edit: &dyn Fn(&mut Value)| {
        let copy = ci.path().join(name);
        run_ok(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(&layout)
                .arg(&copy),
        );
        tamper_provenance(&copy, &amd64, edit);
        verify(&format!("oci:{}:t", copy.display()), ctx.path(), &[])
    };
    let (code, text, err) = forged("forged-args", &|st| {
        st["predicate"]["buildDefinition"]["externalParameters"]["args"]["GREETING"] =
            Value::from("bye");
    });
    assert_eq!(code, Some(1), "{text}{err}");
    assert!(text.contains("GREETING"), "the edited arg is named: {text}");
    assert!(text.contains("not verified"), "{text}");

    // A statement that says it is about another image fails, however well it rebuilds.
    let (code, text, err) = forged("forged-subject", &|st| {
        st["subject"][0]["digest"]["sha256"] = Value::from("0".repeat(64));
    });
    assert_eq!(code, Some(1), "{text}{err}");
    assert!(text.contains("provenance statement is about"), "{text}");

    // A statement that drops a file the build read fails too, though the image reproduces.
    let (code, text, err) = forged("forged-files", &|st| {
        let files = st["predicate"]["buildDefinition"]["resolvedDependencies"][0]["annotations"]
            ["files"]
            .as_array_mut()
            .unwrap();
        files.retain(|f| f["path"] != "src/b");
    });
    assert_eq!(code, Some(1), "{text}{err}");
    assert!(
        text.contains("the published provenance differs from what the rebuild records: context"),
        "{text}"
    );
}

/// An Ed25519 key pair made with openssl: (private PEM, public PEM).
fn key_pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (private, public) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.pub")),
    );
    run_ok(
        tool("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&private),
    );
    run_ok(
        tool("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public),
    );
    (private, public)
}

#[test]
fn a_signed_image_verifies_with_its_key_and_a_policy_admits_only_signed_bases() {
    let reg = Registry::start(Setup::Plain);
    let user = User::new();
    push_base(&user, &reg);
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = key_pair(keys.path(), "ci");
    let (_, other) = key_pair(keys.path(), "other");
    let ctx = app_context(&format!("{}/base", reg.host()));
    let app = format!("{}/signed:1", reg.host());
    let root = tempfile::tempdir().unwrap();
    let built = last_line(&run_ok(
        user.on("build", root.path())
            .arg("--sign")
            .arg(format!("key={}", private.display()))
            .args(["-t", &app, "--push"])
            .arg(ctx.path()),
    ));
    // The signature is a referrer beside the attestations.
    let referrers: Value = serde_json::from_str(&run_ok(
        tool("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!(
                "docker://{}/signed:sha256-{}",
                reg.host(),
                built.trim_start_matches("sha256:")
            )),
    ))
    .unwrap();
    let types: Vec<&str> = referrers["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["artifactType"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"application/vnd.dev.cosign.artifact.sig.v1+json")
            && types.contains(&"application/vnd.docker.attestation.manifest.v1+json"),
        "{referrers}"
    );
    let verify = |key: &Path| {
        run(user
            .on("verify", tempfile::tempdir().unwrap().path())
            .arg(&app)
            .arg("--context")
            .arg(ctx.path())
            .arg("--key")
            .arg(key))
    };
    let good = verify(&public);
    let text = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{text}{}", stderr_of(&good));
    assert!(text.contains("linux/amd64: signed by"), "{text}");
    let bad = verify(&other);
    let text = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{text}");
    assert!(text.contains("has no signature by"), "{text}");

    // A base-image policy: signed by the CI key, or refused before anything runs.
    let policy = |name: &str, body: String| {
        let p = keys.path().join(name);
        write(&p, &body);
        p
    };
    let signed_by = policy("signed.json", r#"{"signedBy": ["ci.pub"]}"#.into());
    let other_key = policy("other.json", r#"{"signedBy": ["other.pub"]}"#.into());
    let pinned = policy("pinned.json", r#"{"requireDigest": true}"#.into());
    let downstream = |from: &str, policy: &Path| {
        let ctx = context(&[("Buildfile", format!("FROM {from}\nENV DOWNSTREAM=1\n"))]);
        run(user
            .on("build", tempfile::tempdir().unwrap().path())
            .args(["--progress", "plain", "--base-policy"])
            .arg(policy)
            .arg(ctx.path()))
    };
    let ok = downstream(&app, &signed_by);
    assert!(ok.status.success(), "{}", stderr_of(&ok));
    let refused = downstream(&app, &other_key);
    assert!(!refused.status.success());
    let err = stderr_of(&refused);
    assert!(
        err.contains("refused by the policy")
            && err.contains("no signature")
            && !err.contains("DONE"),
        "{err}"
    );
    let refused = downstream(&app, &pinned);
    assert!(stderr_of(&refused).contains("not pinned by digest"));
    let ok = downstream(&format!("{}@{}", app, built), &pinned);
    assert!(ok.status.success(), "{}", stderr_of(&ok));
}
