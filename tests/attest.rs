//! Attestations end to end: provenance and SBOM that are reproducible, that validate with the
//! in-toto and SPDX reference tools, that list exactly the packages an image holds, and a
//! `diff` that names the input behind each differing layer.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// The Python with `in-toto-attestation` and `spdx-tools` that `.ci/run` installs.
fn python() -> Command {
    let p = std::env::var_os("BUILDER_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-assets/py/bin/python3")
        });
    assert!(
        p.is_file(),
        "{} is missing: run .ci/run (it makes a venv with in-toto-attestation and spdx-tools), \
         or set BUILDER_TEST_PYTHON to a python that has them",
        p.display()
    );
    Command::new(p)
}

fn read_json(p: &Path) -> Value {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {}", p.display(), e));
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{}: {}", p.display(), e))
}

/// Every leaf of a JSON document by its path (`a.b[2].c`).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(&format!("{}.{}", prefix, k), x, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{}[{}]", prefix, i), x, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

fn differing(a: &Value, b: &Value) -> BTreeSet<String> {
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten("", a, &mut fa);
    flatten("", b, &mut fb);
    fa.keys()
        .chain(fb.keys())
        .filter(|k| fa.get(*k) != fb.get(*k))
        .cloned()
        .collect()
}

const APP: &str = "FROM busybox:test AS build\nARG GREETING=hello\nCOPY src /src\nRUN cat /src/* > /all && echo $GREETING > /greeting && ls /etc > /etc-list\n\nFROM busybox:test\nCOPY --from=build /all /out/all\nCOPY --from=build /greeting /out/greeting\n";

fn app_context(dir: &Path) -> PathBuf {
    let ctx = dir.join("ctx");
    write(&ctx.join("Buildfile"), APP);
    for i in 0..10 {
        write(&ctx.join(format!("src/f{}", i)), &format!("file {}\n", i));
    }
    ctx
}

/// Build `ctx` into `root` with `extra` flags and a local output; returns the printed digest
/// and the local output directory.
fn build_local(root: &Path, ctx: &Path, out: &Path, extra: &[&str]) -> String {
    let local = format!("local:{}", out.display());
    let stdout = run_ok(build_cmd(root).args(["-o", &local]).args(extra).arg(ctx));
    stdout.lines().last().unwrap_or("").to_string()
}

#[test]
fn two_clean_builds_give_the_same_index_and_a_change_shows_where_it_is_named() {
    let a = busybox_dir();
    let b = busybox_dir();
    let ctx_a = app_context(a.path());
    // The second context sits elsewhere, deeper, with other mtimes.
    let ctx_b = b.path().join("some/other/place");
    std::fs::create_dir_all(&ctx_b).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", ctx_a.display()))
            .arg(&ctx_b),
    );
    run_ok(
        Command::new("touch")
            .args(["-d", "2031-05-05 10:00:00"])
            .arg(ctx_b.join("src/f3")),
    );
    let (oa, ob) = (a.path().join("out"), b.path().join("out"));
    let (ma, mb) = (a.path().join("meta.json"), b.path().join("meta.json"));
    let da = build_local(
        &a.path().join("root"),
        &ctx_a,
        &oa,
        &["-t", "app:1", "--metadata-file", ma.to_str().unwrap()],
    );
    let db = build_local(
        &b.path().join("root"),
        &ctx_b,
        &ob,
        &["-t", "app:1", "--metadata-file", mb.to_str().unwrap()],
    );
    assert!(da.starts_with("sha256:"), "{}", da);
    assert_eq!(da, db, "the image digest is the same");
    let index_of = |m: &Path| {
        read_json(m)["attestations.index.digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        index_of(&ma),
        index_of(&mb),
        "the index digest, attestations included, is the same"
    );
    assert_ne!(index_of(&ma), da);
    for f in ["provenance.json", "sbom.spdx.json"] {
        assert_eq!(
            std::fs::read(oa.join(f)).unwrap(),
            std::fs::read(ob.join(f)).unwrap(),
            "{} is byte-identical",
            f
        );
    }
    let prov = read_json(&oa.join("provenance.json"));
    let text = prov.to_string();
    for leak in [
        a.path().to_str().unwrap(),
        "/tmp/",
        "startedOn",
        "finishedOn",
        "invocationId",
    ] {
        assert!(
            !text.contains(leak),
            "provenance holds {:?}: {}",
            leak,
            text
        );
    }

    // One context file edited: what changes names it, the steps downstream of it, and the
    // image; nothing else.
    write(&ctx_b.join("src/f7"), "file 7, edited\n");
    let ob2 = b.path().join("out2");
    build_local(&b.path().join("root"), &ctx_b, &ob2, &["-t", "app:2"]);
    let prov2 = read_json(&ob2.join("provenance.json"));
    let changed = differing(&prov, &prov2);
    let files = prov["predicate"]["buildDefinition"]["resolvedDependencies"][0]["annotations"]
        ["files"]
        .as_array()
        .unwrap()
        .clone();
    let f7 = files
        .iter()
        .position(|f| f["path"] == "src/f7")
        .expect("src/f7 is among the files the build read");
    let allowed = |k: &str| {
        k == ".subject[0].digest.sha256"
            || k == ".predicate.buildDefinition.resolvedDependencies[0].digest.sha256"
            || k == format!(
                ".predicate.buildDefinition.resolvedDependencies[0].annotations.files[{}].digest",
                f7
            )
            || (k.starts_with(".predicate.buildDefinition.internalParameters.steps[")
                && (k.ends_with(".cacheKey")
                    || k.ends_with(".layer.digest")
                    || k.ends_with(".layer.diffID")
                    || k.ends_with("].digest")
                    || k.ends_with("].key")))
    };
    let unexpected: Vec<&String> = changed.iter().filter(|k| !allowed(k)).collect();
    assert!(
        unexpected.is_empty(),
        "fields changed that do not name the edit: {:?}",
        unexpected
    );
    assert!(changed.contains(&format!(
        ".predicate.buildDefinition.resolvedDependencies[0].annotations.files[{}].digest",
        f7
    )));

    // A build arg changed: the arg, and the RUN that reads it (and what follows).
    let ob3 = b.path().join("out3");
    build_local(
        &b.path().join("root"),
        &ctx_b,
        &ob3,
        &["-t", "app:3", "--build-arg", "GREETING=bye"],
    );
    let prov3 = read_json(&ob3.join("provenance.json"));
    let changed = differing(&prov2, &prov3);
    assert!(changed.contains(".predicate.buildDefinition.externalParameters.args.GREETING"));
    for k in &changed {
        assert!(
            k == ".subject[0].digest.sha256"
                || k == ".predicate.buildDefinition.externalParameters.args.GREETING"
                || (k.starts_with(".predicate.buildDefinition.internalParameters.steps[")
                    && !k.contains(".op")
                    && !k.contains(".line")),
            "{} changed with a build arg",
            k
        );
    }
}

#[test]
fn attestations_validate_with_the_reference_tools() {
    let d = busybox_dir();
    let ctx = app_context(d.path());
    let out = d.path().join("out");
    build_local(
        &d.path().join("root"),
        &ctx,
        &out,
        &["--build-arg", "GREETING=hi"],
    );
    let check = r#"
import json, sys
from google.protobuf import json_format
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
doc = json.load(open(sys.argv[1]))
pb = json_format.ParseDict(doc, statement_pb2.Statement())
Statement.copy_from_pb(pb).validate()
json_format.ParseDict(doc["predicate"], provenance_pb2.Provenance())
print("valid")
"#;
    let got = run_ok(
        python()
            .args(["-c", check])
            .arg(out.join("provenance.json")),
    );
    assert!(got.contains("valid"), "{}", got);
    let spdx = run(python()
        .args(["-m", "spdx_tools.spdx.clitools.pyspdxtools", "-i"])
        .arg(out.join("sbom.spdx.json")));
    assert!(
        spdx.status.success() && !String::from_utf8_lossy(&spdx.stdout).contains("invalid"),
        "pyspdxtools: {}{}",
        String::from_utf8_lossy(&spdx.stdout),
        String::from_utf8_lossy(&spdx.stderr)
    );
    // How they sit in layouts and registries: tests/provenance.rs.
}

#[test]
fn the_sbom_lists_exactly_the_packages_the_image_holds() {
    let d = busybox_dir();
    let ctx = d.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\n\
         COPY os-release /etc/os-release\n\
         COPY status /var/lib/dpkg/status\n\
         COPY installed /lib/apk/db/installed\n\
         COPY site/ /usr/lib/python3/site-packages/\n\
         COPY app/ /app/\n\
         RUN rm -r /app/node_modules/gone /usr/lib/python3/site-packages/old-1.0.dist-info\n",
    );
    write(
        &ctx.join("os-release"),
        "NAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID=\"12\"\n",
    );
    write(
        &ctx.join("status"),
        "Package: bash\nStatus: install ok installed\nPriority: required\nArchitecture: amd64\nVersion: 5.2.15-2+b2\nDescription: GNU Bourne Again SHell\n Bash is an sh-compatible command language interpreter.\n\n\
         Package: coreutils\nStatus: install ok installed\nArchitecture: amd64\nVersion: 9.1-1\n\n\
         Package: removed-one\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1.0\n",
    );
    write(
        &ctx.join("installed"),
        "C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nT:the musl c library\n\nC:Q1def=\nP:zlib\nV:1.3.1-r0\nA:x86_64\n",
    );
    write(
        &ctx.join("site/requests-2.31.0.dist-info/METADATA"),
        "Metadata-Version: 2.1\nName: requests\nVersion: 2.31.0\nSummary: HTTP\n\nLong description.\n",
    );
    write(
        &ctx.join("site/six-1.16.0.egg-info/PKG-INFO"),
        "Metadata-Version: 1.2\nName: six\nVersion: 1.16.0\n",
    );
    write(
        &ctx.join("site/old-1.0.dist-info/METADATA"),
        "Name: old\nVersion: 1.0\n",
    );
    write(
        &ctx.join("app/package.json"),
        r#"{"name":"the-app","version":"0.0.1"}"#,
    );
    write(
        &ctx.join("app/node_modules/left-pad/package.json"),
        r#"{"name":"left-pad","version":"1.3.0"}"#,
    );
    write(
        &ctx.join("app/node_modules/left-pad/lib/package.json"),
        r#"{"name":"not-a-package","version":"9"}"#,
    );
    write(
        &ctx.join("app/node_modules/@scope/util/package.json"),
        r#"{"name":"@scope/util","version":"2.0.1"}"#,
    );
    write(
        &ctx.join("app/node_modules/left-pad/node_modules/dep/package.json"),
        r#"{"name":"dep","version":"0.1.0"}"#,
    );
    write(
        &ctx.join("app/node_modules/gone/package.json"),
        r#"{"name":"gone","version":"6.6.6"}"#,
    );
    let out = d.path().join("out");
    build_local(&d.path().join("root"), &ctx, &out, &[]);
    let doc = read_json(&out.join("sbom.spdx.json"));
    let mut found: Vec<(String, String, String)> = doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["SPDXID"] != "SPDXRef-Image")
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["versionInfo"].as_str().unwrap().to_string(),
                p["externalRefs"][0]["referenceLocator"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    found.sort();
    let want = [
        ("@scope/util", "2.0.1", "pkg:npm/%40scope/util@2.0.1"),
        (
            "bash",
            "5.2.15-2+b2",
            "pkg:deb/debian/bash@5.2.15-2%2Bb2?arch=amd64",
        ),
        (
            "coreutils",
            "9.1-1",
            "pkg:deb/debian/coreutils@9.1-1?arch=amd64",
        ),
        ("dep", "0.1.0", "pkg:npm/dep@0.1.0"),
        ("left-pad", "1.3.0", "pkg:npm/left-pad@1.3.0"),
        (
            "musl",
            "1.2.4-r2",
            "pkg:apk/debian/musl@1.2.4-r2?arch=x86_64",
        ),
        ("requests", "2.31.0", "pkg:pypi/requests@2.31.0"),
        ("six", "1.16.0", "pkg:pypi/six@1.16.0"),
        (
            "zlib",
            "1.3.1-r0",
            "pkg:apk/debian/zlib@1.3.1-r0?arch=x86_64",
        ),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(found, want);
    // Every package hangs off the image.
    let contains = doc["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["relationshipType"] == "CONTAINS")
        .count();
    assert_eq!(contains, want.len());
}

#[test]
fn flags_choose_what_is_recorded() {
    let d = busybox_dir();
    let root = d.path().join("root");
    let ctx = app_context(d.path());
    // Nothing recorded: the name is the image manifest itself, as before attestations.
    let out = d.path().join("none");
    let plain = build_local(
        &root,
        &ctx,
        &out,
        &["--provenance", "false", "--sbom", "false"],
    );
    assert!(!out.join("provenance.json").exists() && !out.join("sbom.spdx.json").exists());
    let raw = run_ok(builder().args(["inspect", "--root"]).arg(&root).arg(&plain));
    assert!(raw.contains("\"layers\""), "{}", raw);
    // mode=min: the inputs, no steps.
    let out = d.path().join("min");
    build_local(
        &root,
        &ctx,
        &out,
        &["--provenance", "mode=min", "--sbom", "false"],
    );
    let p = read_json(&out.join("provenance.json"));
    let internal = &p["predicate"]["buildDefinition"]["internalParameters"];
    assert_eq!(internal["mode"], "min");
    assert!(internal.get("steps").is_none(), "{}", internal);
    assert!(!out.join("sbom.spdx.json").exists());
    // BuildKit's --attest spelling; max has one record per layer-producing step.
    let out = d.path().join("max");
    build_local(
        &root,
        &ctx,
        &out,
        &[
            "--attest",
            "type=provenance,mode=max",
            "--attest",
            "type=sbom,disabled=true",
        ],
    );
    let p = read_json(&out.join("provenance.json"));
    let steps = p["predicate"]["buildDefinition"]["internalParameters"]["steps"]
        .as_array()
        .unwrap()
        .clone();
    let ops: Vec<&str> = steps.iter().map(|s| s["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        vec![
            "COPY src /src",
            "RUN cat /src/* > /all && echo $GREETING > /greeting && ls /etc > /etc-list",
            "COPY --from=build /all /out/all",
            "COPY --from=build /greeting /out/greeting",
        ]
    );
    assert!(steps
        .iter()
        .all(|s| s["layer"]["diffID"].is_string() && s["cacheKey"].is_string()));
    assert!(!out.join("sbom.spdx.json").exists());
    // A build file outside the context is named, not located: no absolute path is recorded.
    let outside = d.path().join("elsewhere/Other.Buildfile");
    write(&outside, APP);
    let out = d.path().join("outside");
    build_local(&root, &ctx, &out, &["-f", outside.to_str().unwrap()]);
    let text = std::fs::read_to_string(out.join("provenance.json")).unwrap();
    let p: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        p["predicate"]["buildDefinition"]["externalParameters"]["buildFile"]["path"],
        "Other.Buildfile"
    );
    assert!(!text.contains(d.path().to_str().unwrap()), "{}", text);
    // Bad values are refused with what is accepted.
    let bad = run(build_cmd(&root)
        .args(["--provenance", "mode=huge"])
        .arg(&ctx));
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("mode=min, mode=max or false"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// `builder diff` of two tags, as text and as JSON.
fn diff(root: &Path, a: &str, b: &str) -> (String, Value) {
    let text = run(builder().args(["diff", "--root"]).arg(root).args([a, b]));
    assert_eq!(text.status.code(), Some(1), "the images differ");
    let json = run(builder()
        .args(["diff", "--format", "json", "--root"])
        .arg(root)
        .args([a, b]));
    (
        String::from_utf8_lossy(&text.stdout).into_owned(),
        serde_json::from_slice(&json.stdout).unwrap(),
    )
}

#[test]
fn diff_names_the_input_behind_each_layer() {
    let d = busybox_dir();
    let root = d.path().join("root");
    let ctx = app_context(d.path());
    run_ok(build_cmd(&root).args(["-t", "app:1"]).arg(&ctx));
    run_ok(
        build_cmd(&root)
            .args(["-t", "build:1", "--target", "build"])
            .arg(&ctx),
    );

    // One context file edited: in the stage that reads it, the COPY's layer is named with
    // the file; in the final image, the layer copied from that stage.
    write(&ctx.join("src/f7"), "file 7, edited\n");
    run_ok(build_cmd(&root).args(["-t", "app:2"]).arg(&ctx));
    run_ok(
        build_cmd(&root)
            .args(["-t", "build:2", "--target", "build"])
            .arg(&ctx),
    );
    let (text, _) = diff(&root, "build:1", "build:2");
    let line = text
        .lines()
        .find(|l| {
            l.contains(
                "(stage build, step 2: COPY src /src) differs because src/f7 changed (sha256:",
            )
        })
        .unwrap_or_else(|| panic!("no layer line for the COPY:\n{}", text));
    assert!(line.starts_with("layer 2 "), "{}", line);
    let (text, json) = diff(&root, "app:1", "app:2");
    assert!(text.contains("context file src/f7: sha256:"), "{}", text);
    // The final image's layer made from the edited file names the stage it copies from,
    // and why that stage changed.
    assert!(
        text.contains("layer 2 (stage 1, step 1: COPY --from=build /all /out/all) differs because stage build changed (its step 2: COPY src /src, because src/f7 changed (sha256:"),
        "{}",
        text
    );
    let x = &json["explanation"];
    assert_eq!(x["inputs"]["context"][0]["path"], "src/f7");
    let layer = x["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["step"]["op"] == "COPY --from=build /all /out/all")
        .expect("the COPY --from layer is explained");
    assert!(layer["causes"][0]
        .as_str()
        .unwrap()
        .contains("stage build changed"));

    // One build arg changed: the RUN that reads it.
    for (tag, target) in [("app:3", None), ("build:3", Some("build"))] {
        let mut c = build_cmd(&root);
        c.args(["-t", tag, "--build-arg", "GREETING=bye"]);
        if let Some(t) = target {
            c.args(["--target", t]);
        }
        run_ok(c.arg(&ctx));
    }
    let run_step =
        "step 3: RUN cat /src/* > /all && echo $GREETING > /greeting && ls /etc > /etc-list";
    let (text, json) = diff(&root, "build:2", "build:3");
    assert!(
        text.contains("build arg GREETING: unset -> bye"),
        "{}",
        text
    );
    assert!(
        text.contains(&format!(
            "layer 3 (stage build, {}) differs because build arg GREETING changed (\"hello\" -> \"bye\")",
            run_step
        )),
        "{}",
        text
    );
    assert_eq!(json["explanation"]["inputs"]["args"][0]["name"], "GREETING");
    let (text, _) = diff(&root, "app:2", "app:3");
    assert!(
        text.contains(&format!(
            "layer 3 (stage 1, step 2: COPY --from=build /greeting /out/greeting) differs because stage build changed (its {}, because build arg GREETING changed",
            run_step
        )),
        "{}",
        text
    );

    // One base image changed.
    busybox_with_extra_file(&root, "busybox:test");
    run_ok(
        build_cmd(&root)
            .args([
                "-t",
                "build:4",
                "--target",
                "build",
                "--build-arg",
                "GREETING=bye",
            ])
            .arg(&ctx),
    );
    let (text, json) = diff(&root, "build:3", "build:4");
    assert!(text.contains("image busybox:test: sha256:"), "{}", text);
    assert!(
        text.contains("layer 1 (stage build, FROM busybox:test) differs because image busybox:test changed (sha256:"),
        "{}",
        text
    );
    // The RUN lists /etc: its layer changed because the base did (the COPY before it made
    // the same layer on either base).
    assert!(
        text.contains(&format!(
            "layer 3 (stage build, {}) differs because its base image busybox:test changed (sha256:",
            run_step
        )),
        "{}",
        text
    );
    assert!(!text.contains("step 2: COPY src /src) differs"), "{}", text);
    assert_eq!(
        json["explanation"]["inputs"]["images"][0]["name"],
        "busybox:test"
    );
}

/// Replace `name` in `root` with a busybox image that has one more file in /etc.
fn busybox_with_extra_file(root: &Path, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path();
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox-static is not installed: run .ci/run");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(bb, rootfs.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "echo", "ls", "rm"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
    }
    write(&rootfs.join("etc/extra"), "a new base\n");
    run_ok(
        builder()
            .args(["import", "--root"])
            .arg(root)
            .arg(rootfs)
            .args(["-t", name]),
    );
}

#[test]
fn verify_explains_a_step_that_is_not_reproducible() {
    let d = busybox_dir();
    let ctx = d.path().join("ctx");
    write(
        &ctx.join("Buildfile"),
        "FROM busybox:test\nCOPY a /a\nRUN cat /proc/sys/kernel/random/uuid > /random\n",
    );
    write(&ctx.join("a"), "a\n");
    let out = run(build_cmd(&d.path().join("root")).arg("--verify").arg(&ctx));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not reproducible"), "{}", err);
    assert!(err.contains("inputs: the same"), "{}", err);
    assert!(
        err.contains("(stage 0, step 2: RUN cat /proc/sys/kernel/random/uuid > /random) differs because its instruction and inputs are the same"),
        "{}",
        err
    );
}
