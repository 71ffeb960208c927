//! RUN: the build args, entitlements and bind-mount sources it reads, and its run: the
//! step's user, environment, /etc files and mounts resolved, the spec handed to the
//! [`Worker`](crate::solver::Worker), and the diff it returns written as the layer.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::OpRunner;
use crate::oci::image::LayerRef;
use crate::plan::{ExecOp, Input, MountKind, Network, Op, Origin};
use crate::solver::cx::Ctx;
use crate::solver::inputs::StepInput;
use crate::solver::{failures, mounts, BuildError};
use crate::store::Bucket;
use crate::worker::snapshots::{RootView, ViewNeed};
use crate::worker::{self, Exit};

impl OpRunner for ExecOp {
    fn cache_map(&self, cx: &mut Ctx, op: &Op) -> Result<Vec<StepInput>, BuildError> {
        let origin = &op.origin;
        let args: BTreeMap<String, String> = self.args.iter().cloned().collect();
        let mut inputs = vec![StepInput::Args(args)];
        sandbox_of(cx, origin, self)?;
        for (i, mount) in self.mounts.iter().enumerate() {
            if mount.kind != MountKind::Bind {
                continue;
            }
            let source = mount.source.as_deref().unwrap_or(".");
            inputs.push(cx.input_of(origin, &mount.from, source, Some(i))?);
        }
        Ok(inputs)
    }

    fn view_need(&self) -> ViewNeed {
        ViewNeed::Full
    }

    /// Run the step in the sandbox; returns its layer.
    fn run(
        &self,
        cx: &mut Ctx,
        op: &Op,
        view: &mut Option<RootView>,
    ) -> Result<LayerRef, BuildError> {
        let e = self;
        let view = view
            .as_mut()
            .ok_or_else(|| BuildError::Other("internal: RUN without a root view".into()))?;
        let origin = &op.origin;
        if let Err(e) = worker::sandbox::emulation::check(&cx.platform.architecture) {
            return Err(cx.fail(origin, e));
        }
        let (network, insecure) = sandbox_of(cx, origin, e)?;
        let scratch = cx.store.scratch_dir("run-")?;
        let process_sandbox = match cx.kept {
            Some(_) => true,
            None => process_sandbox(cx, origin, scratch.path())?,
        };
        restore_cache_mounts(cx, e);
        let ctx_root = cx.context_root();
        // The build's request outlives the step's borrow of `cx` by `lookup`.
        let req = cx.sh.req;
        let mut guards = mounts::MountGuards::default();
        let mut from_err = None;
        let cache_mounts = cx.store.dir(Bucket::CacheMounts);
        let executor = cx.req.executor.clone();
        let copy_context = cx.kept.is_some();
        let spec = {
            let mut lookup = |f: &Input| -> Result<PathBuf, String> {
                match cx.source_for(origin, f) {
                    Ok(p) => Ok(p),
                    Err(e) => {
                        let m = e.to_string();
                        from_err = Some(e);
                        Err(m)
                    }
                }
            };
            let setting = mounts::StepSetting {
                rootfs: view.path(),
                scratch: scratch.path(),
                network,
                insecure,
                process_sandbox,
                executor,
                mounts: mounts::MountEnv {
                    cache_mounts: &cache_mounts,
                    scratch: scratch.path(),
                    context: &ctx_root,
                    named: &req.named_contexts,
                    ssh: &req.ssh,
                    secrets: &req.secrets,
                    from_root: &mut lookup,
                    copy_context,
                },
            };
            mounts::step_spec(e, setting, &mut guards)
        };
        let spec = match spec {
            Ok(spec) => spec,
            Err(m) => return Err(from_err.unwrap_or_else(|| cx.fail(origin, m))),
        };
        let spec_sandbox = spec.process_sandbox;
        let step_dir = scratch.path().join("step");
        fs::create_dir_all(&step_dir).map_err(|e| cx.fail(origin, e.to_string()))?;
        let mut tail = mounts::Tail::new(12);
        let reporter = cx.req.reporter;
        let step = cx.step;
        let (exit, diff) = cx
            .worker
            .run_step(
                worker::StepInput {
                    view: &*view,
                    scratch: &step_dir,
                    spec,
                    in_place: cx.kept.as_ref(),
                    failed_state: None,
                },
                &mut |line| {
                    reporter.log(step, line);
                    tail.push(line);
                },
            )
            .map_err(|e| cx.fail(origin, e.to_string()))?;
        for n in cx.worker.notices() {
            reporter.warn(&n);
        }
        drop(guards);
        let why = match exit {
            Exit::Code(0) => return cx.commit_layer(op, &diff, view),
            Exit::Code(c) => format!("exit code {}{}", c, tail.render()),
            Exit::Signal(s) => format!(
                "killed by {}{}",
                worker::sandbox::signal_name(s),
                tail.render()
            ),
        };
        let failure = cx.fail(origin, why);
        if cx.kept.is_some() {
            // In place, the step's writes are in the container's own root, gone with the
            // next layout.
            return Err(failure);
        }
        match failures::keep(cx, op, e, &diff, spec_sandbox) {
            Ok(id) => Err(failure.with_failed_state(id, cx.store.root())),
            Err(why) => {
                reporter.warn(&format!(
                    "the failed step's state could not be kept: {}",
                    why
                ));
                Err(failure)
            }
        }
    }
}

/// Fill each cache mount of `e` that is not here from an imported cache that holds it, just
/// before the step runs (a step that hits never gets here, so nothing is fetched for it).
/// A mount that cannot be restored starts empty, as it would without the import.
fn restore_cache_mounts(cx: &Ctx, e: &ExecOp) {
    if cx.req.cache_from.is_empty() {
        return;
    }
    let bucket = cx.store.dir(Bucket::CacheMounts);
    for m in e.mounts.iter().filter(|m| m.kind == MountKind::Cache) {
        let key = mounts::cache_mount_key(m);
        let dir = bucket.join(&key);
        if dir.exists() {
            continue;
        }
        let id =
            m.id.clone()
                .or_else(|| m.target.clone())
                .unwrap_or_default();
        // Filled beside its place, then renamed into it: whole or absent.
        let staged = fs::create_dir_all(&bucket).and_then(|_| {
            tempfile::Builder::new()
                .prefix(&format!(".{}-", key))
                .tempdir_in(&bucket)
        });
        let Ok(staged) = staged else {
            continue;
        };
        if mounts::own_cache_dir(staged.path(), m).is_err() {
            continue;
        }
        for r in &cx.req.cache_from {
            match r.restore_mount(&key, staged.path(), &cx.store.blobs) {
                Ok(None) => continue,
                Ok(Some(bytes)) => {
                    // Another step restoring the same mount at once may have won: its copy
                    // stays, and this one goes with `staged`.
                    if fs::rename(staged.path(), &dir).is_ok() {
                        cx.req.reporter.log(
                            cx.step,
                            &format!(
                                "cache mount {} restored from {} ({} bytes)",
                                id,
                                r.location(),
                                bytes
                            ),
                        );
                    }
                }
                Err(why) => cx.req.reporter.warn(&format!(
                    "cache mount {} could not be restored from {}: {}",
                    id,
                    r.location(),
                    why
                )),
            }
            break;
        }
    }
}

/// Whether RUN gets its own PID namespace and /proc here (`false`: the relaxed sandbox,
/// said once and recorded), or why RUN cannot be sandboxed at all.
fn process_sandbox(cx: &Ctx, origin: &Origin, scratch: &Path) -> Result<bool, BuildError> {
    let hint = || {
        match worker::inplace::detect_container() {
        Some(c) => format!(
            "builder runs in {}, which allows no new namespaces: use --isolation container, where the container itself is the sandbox",
            c
        ),
        None => "run builder as root, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0)".to_string(),
    }
    };
    if let Some(why) = &cx.sandbox_unavailable {
        return Err(cx.fail(
            origin,
            format!("RUN cannot be sandboxed: {}; {}", why, hint()),
        ));
    }
    let probed = cx.process_sandbox.get_or_init(|| {
        let r = cx.worker.probe_process_sandbox(scratch);
        if let Ok(false) = r {
            cx.req.reporter.warn("a fresh /proc cannot be mounted here (a container's /proc has masked paths): RUN steps share builder's PID namespace and see its /proc read-only, as BuildKit's no-process-sandbox mode does; the provenance records it");
            if let Ok(mut t) = cx.trace.lock() {
                t.isolation = worker::NO_PROCESS_SANDBOX.to_string();
            }
        }
        r
    });
    match probed {
        Ok(full) => Ok(*full),
        Err(e) => Err(cx.fail(
            origin,
            format!("RUN cannot be sandboxed: {}; {}", e, hint()),
        )),
    }
}

/// The step's network and whether it runs insecure, refused unless the build holds the
/// entitlement (checked for cached steps too, as BuildKit checks the whole definition).
fn sandbox_of(
    cx: &Ctx,
    origin: &Origin,
    e: &ExecOp,
) -> Result<(worker::sandbox::NetworkMode, bool), BuildError> {
    if e.network == Network::Host && !cx.req.entitlements.network_host {
        return Err(cx.fail(
            origin,
            "network host is not allowed: start the build with --allow network.host",
        ));
    }
    if e.insecure && !cx.req.entitlements.security_insecure {
        return Err(cx.fail(
            origin,
            "--security=insecure is not allowed: start the build with --allow security.insecure",
        ));
    }
    Ok((mounts::network_mode(e.network), e.insecure))
}
