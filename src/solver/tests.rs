//! The solver against a fake worker and a throwaway store: every runner, the scheduler's
//! parallel stages, cache hits and misses, in-flight dedupe, and failures located at their
//! op. No namespace, mount or registry is involved: the fake's `run_step` writes the step's
//! diff itself.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::*;
use crate::oci::platform::Platform;
use crate::plan::{
    Action, Chmod, Chown, CopyOp, ExecOp, Id, Input, MkdirOp, Network, Op, OpGraph, Origin, Source,
    StagePlan,
};
use crate::progress::QuietReporter;
use crate::registry::Settings;
use crate::worker::{Exit, Snapshotter};

/// A worker that runs nothing: a step `write PATH TEXT` leaves `PATH` with `TEXT` in its
/// diff, `fail N` exits with N after printing a line, and `meet` waits (up to 30 s) until
/// another `meet` step runs at the same time.
#[derive(Default)]
struct FakeWorker {
    runs: AtomicUsize,
    /// How long each step takes.
    delay: Duration,
    meeting: (Mutex<usize>, Condvar),
    met: AtomicUsize,
}

impl Worker for FakeWorker {
    fn enter(&self, _store: &Store, _req: &BuildRequest) -> Result<Environment, BuildError> {
        Ok(Environment {
            snapshotter: Snapshotter::Copy,
            sandbox_unavailable: None,
            kept: None,
        })
    }

    fn probe_process_sandbox(&self, _scratch: &Path) -> Result<bool, String> {
        Ok(true)
    }

    fn run_step(
        &self,
        input: worker::StepInput,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(Exit, PathBuf), worker::WorkerError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let argv = &input.spec.argv;
        let diff = input.scratch.join("diff");
        std::fs::create_dir_all(&diff).unwrap();
        match argv.first().map(String::as_str) {
            Some("write") => {
                let path = diff.join(argv[1].trim_start_matches('/'));
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &argv[2]).unwrap();
            }
            Some("fail") => {
                on_line("something went wrong");
                return Ok((Exit::Code(argv[1].parse().unwrap()), diff));
            }
            Some("meet") => {
                let (count, cv) = &self.meeting;
                let mut n = count.lock().unwrap();
                *n += 1;
                cv.notify_all();
                let (n, timeout) = cv
                    .wait_timeout_while(n, Duration::from_secs(30), |n| *n < 2)
                    .unwrap();
                if !timeout.timed_out() && *n >= 2 {
                    self.met.fetch_add(1, Ordering::SeqCst);
                }
                std::fs::write(diff.join(&argv[1]), "met").unwrap();
            }
            _ => panic!("the fake worker cannot run {:?}", argv),
        }
        Ok((Exit::Code(0), diff))
    }
}

fn origin(line: usize, text: &str) -> Origin {
    Origin {
        line,
        column: 1,
        text: text.into(),
    }
}

fn run(line: usize, argv: &[&str]) -> Op {
    Op {
        origin: origin(line, &format!("RUN {}", argv.join(" "))),
        edits: Vec::new(),
        action: Action::Exec(ExecOp {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            script: None,
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/".into(),
            user: None,
            mounts: Vec::new(),
            network: Network::None,
            insecure: false,
            args: Vec::new(),
            extra_hosts: Vec::new(),
            limits: Default::default(),
        }),
        history: Some(format!("RUN {}", argv.join(" "))),
    }
}

fn copy(line: usize, from: Input, source: &str, dest: &str) -> Op {
    Op {
        origin: origin(line, &format!("COPY {} {}", source, dest)),
        edits: Vec::new(),
        action: Action::Copy(CopyOp {
            chown: Some(Chown {
                user: Id::Number(1),
                group: Some(Id::Number(2)),
            }),
            chmod: Some(Chmod::parse("640").unwrap()),
            ..CopyOp::plain(from, source, dest, false)
        }),
        history: Some(format!("COPY {} {}", source, dest)),
    }
}

fn workdir(line: usize, dir: &str) -> Op {
    Op {
        origin: origin(line, &format!("WORKDIR {}", dir)),
        edits: Vec::new(),
        action: Action::Mkdir(MkdirOp {
            dir: dir.into(),
            owner: None,
        }),
        history: Some(format!("WORKDIR {}", dir)),
    }
}

fn stage(index: usize, ops: Vec<Op>, deps: Vec<usize>) -> StagePlan {
    StagePlan {
        index,
        name: None,
        platform: Platform::host(),
        source: Source::Scratch,
        origin: origin(1, "FROM scratch"),
        base_edits: Vec::new(),
        ops,
        deps,
    }
}

/// A store and a context with `f.txt`.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    context: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let context = dir.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("f.txt"), "from the context\n").unwrap();
    Fixture {
        _dir: dir,
        store,
        context,
    }
}

fn request<'a>(f: &Fixture, stages: Vec<StagePlan>, target: usize) -> BuildRequest<'a> {
    BuildRequest {
        file_name: "Buildfile".into(),
        graph: OpGraph { stages, target },
        context: f.context.clone(),
        ignore: Default::default(),
        named_contexts: Default::default(),
        ssh: Default::default(),
        epoch: 0,
        compression: crate::oci::layer::Compression::Gzip(1),
        force_compression: false,
        squash: false,
        platform: Platform::host(),
        reporter: &QuietReporter,
        entitlements: Entitlements::default(),
        executor: worker::sandbox::Executor::Builtin,
        isolation: worker::Isolation::Sandbox,
        keep: Vec::new(),
        secrets: BTreeMap::new(),
        no_cache: false,
        no_cache_filter: Vec::new(),
        jobs: 4,
        pull: PullPolicy::Never,
        registry: Arc::new(Client::new(Settings::default())),
        cache_from: Vec::new(),
        show_platform: false,
        explain_against: None,
        labels: Vec::new(),
    }
}

/// Path -> (mode, uid, gid, content) of a layer blob.
fn layer_entries(
    store: &Store,
    l: &crate::oci::image::LayerRef,
) -> BTreeMap<String, (u32, u64, u64, String)> {
    let blob = std::fs::read(store.blobs.path(&l.digest)).unwrap();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
    let mut out = BTreeMap::new();
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut text = String::new();
        let _ = e.read_to_string(&mut text);
        out.insert(
            e.path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_string(),
            (h.mode().unwrap(), h.uid().unwrap(), h.gid().unwrap(), text),
        );
    }
    out
}

#[test]
fn every_runner_makes_its_layer_and_a_rebuild_hits() {
    let f = fixture();
    let worker = FakeWorker::default();
    let stages = || {
        vec![stage(
            0,
            vec![
                workdir(2, "/work"),
                copy(3, Input::Context, "f.txt", "/work/f.txt"),
                run(4, &["write", "/work/out", "made by the step"]),
            ],
            vec![],
        )]
    };
    let solver = Solver::with_worker(&f.store, &worker);
    let first = solver.build(&request(&f, stages(), 0)).unwrap();
    let layers = &first.image.state.layers;
    assert_eq!(layers.len(), 3);
    let mkdir = layer_entries(&f.store, &layers[0]);
    assert_eq!(mkdir["work"].0 & 0o7777, 0o755);
    let copied = layer_entries(&f.store, &layers[1]);
    assert_eq!(
        copied["work/f.txt"],
        (0o640, 1, 2, "from the context\n".to_string())
    );
    let ran = layer_entries(&f.store, &layers[2]);
    assert_eq!(ran["work/out"].3, "made by the step");
    assert_eq!(worker.runs.load(Ordering::SeqCst), 1);
    assert_eq!(first.steps.len(), 3);
    // The provenance names the context file the COPY read.
    let copy_step = &first.trace.steps[1];
    assert_eq!(copy_step.inputs[0]["context"], "f.txt");

    // Nothing changed: every step hits, the worker is not asked, the image is the same.
    let second = solver.build(&request(&f, stages(), 0)).unwrap();
    assert_eq!(worker.runs.load(Ordering::SeqCst), 1);
    assert_eq!(second.image.manifest_digest, first.image.manifest_digest);
    assert_eq!(second.trace.steps.len(), 3);

    // An edited context file: WORKDIR still hits; the COPY and the RUN after it run again.
    std::fs::write(f.context.join("f.txt"), "edited\n").unwrap();
    let third = solver.build(&request(&f, stages(), 0)).unwrap();
    assert_eq!(worker.runs.load(Ordering::SeqCst), 2);
    assert_eq!(third.image.state.layers[0].digest, layers[0].digest);
    assert_ne!(third.image.state.layers[1].digest, layers[1].digest);

    // --no-cache runs everything again.
    let mut fresh = request(&f, stages(), 0);
    fresh.no_cache = true;
    solver.build(&fresh).unwrap();
    assert_eq!(worker.runs.load(Ordering::SeqCst), 3);
}

#[test]
fn independent_stages_run_side_by_side_and_copy_from_reads_them() {
    let f = fixture();
    let worker = FakeWorker::default();
    let stages = vec![
        stage(0, vec![run(2, &["meet", "a"])], vec![]),
        stage(1, vec![run(4, &["meet", "b"])], vec![]),
        stage(
            2,
            vec![
                copy(6, Input::Stage(0), "/a", "/a"),
                copy(7, Input::Stage(1), "/b", "/b"),
            ],
            vec![0, 1],
        ),
    ];
    let solver = Solver::with_worker(&f.store, &worker);
    let out = solver.build(&request(&f, stages, 2)).unwrap();
    // Both RUNs waited for each other: they ran at the same time.
    assert_eq!(worker.met.load(Ordering::SeqCst), 2);
    let layers = &out.image.state.layers;
    assert_eq!(layers.len(), 2);
    assert_eq!(layer_entries(&f.store, &layers[0])["a"].3, "met");
    assert_eq!(layer_entries(&f.store, &layers[1])["b"].3, "met");
    // The provenance names the stages read, by key.
    assert_eq!(out.trace.steps.last().unwrap().inputs[0]["stage"], "1");
}

#[test]
fn an_identical_step_of_two_builds_at_once_runs_once() {
    let f = fixture();
    let worker = FakeWorker {
        delay: Duration::from_millis(300),
        ..FakeWorker::default()
    };
    let stages = || vec![stage(0, vec![run(2, &["write", "/x", "x"])], vec![])];
    let solver = Solver::with_worker(&f.store, &worker);
    let (a, b) = (request(&f, stages(), 0), request(&f, stages(), 0));
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| solver.build(&a).unwrap());
        let hb = s.spawn(|| solver.build(&b).unwrap());
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!(worker.runs.load(Ordering::SeqCst), 1);
    assert_eq!(ra.image.manifest_digest, rb.image.manifest_digest);
}

#[test]
fn a_failed_step_names_its_origin_and_stops_what_reads_it() {
    let f = fixture();
    let worker = FakeWorker::default();
    let stages = vec![
        stage(0, vec![run(2, &["fail", "3"])], vec![]),
        stage(
            1,
            vec![
                copy(4, Input::Stage(0), "/x", "/x"),
                run(5, &["write", "/y", "y"]),
            ],
            vec![0],
        ),
    ];
    let solver = Solver::with_worker(&f.store, &worker);
    let err = solver.build(&request(&f, stages, 1)).err().unwrap();
    let BuildError::Step(failure) = err else {
        panic!("not a step failure: {err}")
    };
    assert_eq!((failure.file.as_str(), failure.line), ("Buildfile", 2));
    assert_eq!(failure.text, "RUN fail 3");
    assert!(failure.msg.contains("exit code 3"), "{}", failure.msg);
    assert!(
        failure.msg.contains("something went wrong"),
        "{}",
        failure.msg
    );
    // Stage 1 never started.
    assert_eq!(worker.runs.load(Ordering::SeqCst), 1);
}

#[test]
fn a_run_on_the_host_network_needs_the_entitlement_even_when_cached() {
    let f = fixture();
    let worker = FakeWorker::default();
    let mut op = run(3, &["write", "/x", "x"]);
    if let Action::Exec(e) = &mut op.action {
        e.network = Network::Host;
    }
    let stages = || vec![stage(0, vec![op.clone()], vec![])];
    let solver = Solver::with_worker(&f.store, &worker);
    let mut allowed = request(&f, stages(), 0);
    allowed.entitlements.network_host = true;
    solver.build(&allowed).unwrap();
    let err = solver.build(&request(&f, stages(), 0)).err().unwrap();
    assert!(err.to_string().contains("--allow network.host"), "{err}");
    assert_eq!(worker.runs.load(Ordering::SeqCst), 1);
}
