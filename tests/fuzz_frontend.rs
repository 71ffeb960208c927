//! Property test: no input panics the front end. Random bytes and random mutations of every
//! testdata build file go through the parser, typing, planning, expansion and .dockerignore.
//! `cargo test` runs a quick pass; `FUZZ_ITERATIONS=3000000 cargo test --release --test
//! fuzz_frontend` runs a long one (`FUZZ_SEED` picks another sequence).

use std::fs;
use std::path::Path;

use builder::frontend::checks;
use builder::frontend::{self, BaseResolver, LowerOptions, PlanOptions};
use builder::oci::platform::Platform;
use builder::syntax::dockerignore::IgnoreMatcher;
use builder::syntax::expand::{LexOptions, Lexer};
use rand::{rngs::StdRng, Rng, SeedableRng};

const TOKENS: &[&str] = &[
    "\\\n",
    "`\n",
    "\n",
    " ",
    "\t",
    "#",
    "# escape=`\n",
    "# syntax=x\n",
    "<<EOF",
    "<<-EOF",
    "<<'EOF'",
    "\nEOF\n",
    "${",
    "}",
    "$",
    ":-",
    ":?",
    "##",
    "%%",
    "//",
    "[\"",
    "\"]",
    "\"",
    "'",
    ",",
    "=",
    "--from=",
    "--mount=type=cache,target=/x",
    "FROM ",
    "AS ",
    "COPY ",
    "RUN ",
    "ENV ",
    "ARG ",
    "ONBUILD ",
    "HEALTHCHECK ",
    "\u{feff}",
    "é",
    "\u{0}",
    "\r\n",
];

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    for e in walkdir::WalkDir::new(base).into_iter().flatten() {
        if e.file_name() == "Buildfile" {
            out.push(fs::read(e.path()).unwrap());
        }
    }
    assert!(!out.is_empty());
    out
}

fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.gen_range(1..6) {
        let pos = if v.is_empty() {
            0
        } else {
            rng.gen_range(0..=v.len())
        };
        match rng.gen_range(0..4) {
            0 if !v.is_empty() => {
                let end = (pos + rng.gen_range(1..16)).min(v.len());
                v.drain(pos.min(v.len())..end);
            }
            1 => {
                let t = TOKENS[rng.gen_range(0..TOKENS.len())];
                v.splice(pos..pos, t.bytes());
            }
            2 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] = rng.gen();
            }
            _ => {
                let n = rng.gen_range(1..8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                v.splice(pos..pos, bytes);
            }
        }
    }
    v
}

/// Every base image is an empty one that sets a few things lowering reads.
struct AnyImage;

impl BaseResolver for AnyImage {
    fn resolve(
        &self,
        _: &str,
        p: &Platform,
    ) -> Result<builder::oci::image::StoredImage, Box<dyn std::error::Error + Send + Sync>> {
        let mut state =
            builder::oci::image::ImageState::scratch(&p.os, &p.architecture, p.variant.as_deref());
        state.set_env("A", "$B");
        state.docker.onbuild = Some(vec!["RUN echo ${A:-x}".into(), "ENV X=1".into()]);
        let d = builder::oci::digest::Digest::of(b"any");
        Ok(builder::oci::image::StoredImage {
            manifest_digest: d.clone(),
            manifest_size: 0,
            config_digest: d,
            state,
        })
    }
}

fn exercise(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    if let Ok((doc, typed)) = builder::syntax::parse_instructions("Buildfile", &text) {
        let _ = doc.dump();
        if let Ok(graph) = frontend::lower_graph(
            "Buildfile",
            &text,
            doc.escape,
            &typed,
            &PlanOptions::default(),
        ) {
            // Lowering to ops walks every instruction with its scope.
            let _ = frontend::lower_ops(
                &graph,
                &LowerOptions {
                    file: "Buildfile",
                    source: &text,
                    escape: doc.escape,
                    build_args: &Default::default(),
                    platform: Platform::host(),
                    network: builder::plan::Network::Sandbox,
                    extra_hosts: Vec::new(),
                    limits: Default::default(),
                    made: Default::default(),
                },
                &AnyImage,
            );
        }
        // The build checks read the same parse, and the directive's text.
        let ignore = IgnoreMatcher::from_file_text(&text).unwrap_or_default();
        let host = Platform::host();
        let _ = checks::CheckPolicy::parse(doc.directives.check.as_deref());
        let _ = checks::run(
            &checks::CheckInput {
                source: &text,
                doc: &doc,
                typed: &typed,
                ignore: &ignore,
                build_args: &Default::default(),
                target_platform: &host.spec(),
                platform_args: &Platform::args(&host, &host),
                bases: &checks::NoBaseImages,
            },
            &checks::CheckPolicy::default(),
        );
    }
    if let Ok(m) = IgnoreMatcher::from_file_text(&text) {
        let _ = m.is_walked_out("a/b/c.txt", true);
        let _ = m.may_reinclude_below("a/b");
    }
    let env = |n: &str| n.len().is_multiple_of(2).then(|| "a b".to_string());
    let lexer = Lexer::new('\\', LexOptions::default());
    let _ = lexer.word(&text, &env);
    let _ = lexer.words(&text, &env);
    if let Ok(m) = IgnoreMatcher::from_file_text(&text) {
        let _ = m.is_ignored("a/b/c.txt");
    }
}

#[test]
fn front_end_never_panics() {
    let iterations: u64 = std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let corpus = seeds();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..iterations {
        let input = if i % 4 == 0 {
            let n = rng.gen_range(0..256);
            (0..n).map(|_| rng.gen::<u8>()).collect()
        } else {
            let s = &corpus[rng.gen_range(0..corpus.len())];
            mutate(&mut rng, s)
        };
        let r = std::panic::catch_unwind(|| exercise(&input));
        assert!(
            r.is_ok(),
            "panic on input #{i} (seed {seed}): {:?}",
            String::from_utf8_lossy(&input)
        );
    }
}
