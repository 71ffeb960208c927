//! The sandbox policy as data: one OCI runtime spec per step, Docker's default.
//!
//! Whoever runs the step (the built-in executor or an external OCI runtime such as runc),
//! it runs this spec:
//! - Docker's 14 default capabilities in the bounding, permitted and effective sets; nothing
//!   inheritable or ambient. A step run as another user keeps only the bounding set.
//! - Docker's default seccomp allowlist ([`super::seccomp`]).
//! - runc's masked paths (`/proc/kcore`, `/proc/keys`, `/sys/firmware`, ...) and read-only
//!   paths (`/proc/sys`, `/proc/sysrq-trigger`, ...).
//! - Its own mount, PID, IPC, UTS and network namespaces; a minimal /dev; read-only /sys.
//! - No device but the standard few: the cgroup rule denies every other device to runc, and
//!   the built-in executor mounts everything the step can write `nodev`.
//!
//! `RUN --security=insecure` (allowed only by `--allow security.insecure`) lifts the
//! capability, seccomp and path restrictions, as BuildKit's privileged mode does.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxDeviceCgroup, LinuxNamespace, LinuxNamespaceType,
    LinuxResources, Mount, PosixRlimit, PosixRlimitBuilder, Process, Root, Spec, User,
};

use super::{ExtraMount, NetworkMode, RunSpec};

/// Docker's default capability set.
pub fn default_capabilities() -> HashSet<Capability> {
    [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect()
}

/// Every capability this kernel knows, for `--security=insecure`.
fn all_capabilities() -> HashSet<Capability> {
    caps::all()
        .into_iter()
        .filter_map(|c| {
            let name = c.to_string();
            let short = name.strip_prefix("CAP_").unwrap_or(&name);
            short.parse::<Capability>().ok()
        })
        .collect()
}

/// runc's masked paths: hidden behind /dev/null (files) or an empty read-only tmpfs (dirs).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// runc's read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Host device nodes bound into the step's /dev (the set runc creates).
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(dest));
    m.set_typ(Some(typ.to_string()));
    m.set_source(Some(PathBuf::from(source)));
    m.set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    m
}

/// The step's mounts in order: the standard file systems, then /etc files, then RUN --mount.
fn mounts(spec: &RunSpec) -> Vec<Mount> {
    let sys_options: &[&str] = if spec.insecure {
        &["nosuid", "noexec", "nodev"]
    } else {
        &["nosuid", "noexec", "nodev", "ro"]
    };
    let proc = if spec.process_sandbox {
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])
    } else {
        // The relaxed sandbox: the caller's /proc (and what masks it), read-only.
        mount(
            "/proc",
            "bind",
            "/proc",
            &["rbind", "nosuid", "noexec", "nodev", "ro"],
        )
    };
    // Docker's default is 64 MiB; a size is given in KiB, rounded up.
    let shm_size = format!(
        "size={}k",
        spec.limits.shm_size.unwrap_or(64 << 20).div_ceil(1024)
    );
    let mut out = vec![
        proc,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", &shm_size],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount("/sys", "sysfs", "sysfs", sys_options),
    ];
    for (host, target) in &spec.etc_files {
        out.push(mount(
            target,
            "bind",
            &host.display().to_string(),
            &["rbind", "ro", "nosuid", "nodev", "noexec"],
        ));
    }
    for m in &spec.mounts {
        match m {
            ExtraMount::Bind {
                source,
                target,
                readonly,
            } => out.push(mount(
                target,
                "bind",
                &source.display().to_string(),
                &[
                    "rbind",
                    if *readonly { "ro" } else { "rw" },
                    "nosuid",
                    "nodev",
                ],
            )),
            ExtraMount::Tmpfs { target, size } => {
                let size = size.map(|s| format!("size={}", s));
                let mut options = vec!["nosuid", "nodev", "mode=1777"];
                if let Some(s) = &size {
                    options.push(s);
                }
                out.push(mount(target, "tmpfs", "tmpfs", &options))
            }
        }
    }
    out
}

/// `--ulimit`s as the spec's rlimits (none given: the runtime's own).
fn rlimits(limits: &crate::plan::RunLimits) -> Option<Vec<PosixRlimit>> {
    if limits.ulimits.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for u in &limits.ulimits {
        let Some(typ) = super::rlimit_type(u) else {
            continue;
        };
        let (soft, hard) = u.values();
        if let Ok(r) = PosixRlimitBuilder::default()
            .typ(typ)
            .soft(soft)
            .hard(hard)
            .build()
        {
            out.push(r);
        }
    }
    Some(out)
}

/// The runtime spec of one step: `rootfs` is its root directory (mounted by the caller for
/// an external runtime), `netns` the network namespace it joins (None: a new one).
pub fn runtime_spec(spec: &RunSpec, rootfs: &Path, netns: Option<&Path>) -> Spec {
    let caps = if spec.insecure {
        all_capabilities()
    } else {
        default_capabilities()
    };
    let mut capabilities = LinuxCapabilities::default();
    capabilities.set_bounding(Some(caps.clone()));
    capabilities.set_permitted(Some(caps.clone()));
    capabilities.set_effective(Some(caps.clone()));
    capabilities.set_inheritable(Some(HashSet::new()));
    capabilities.set_ambient(Some(HashSet::new()));

    let mut user = User::default();
    user.set_uid(spec.uid);
    user.set_gid(spec.gid);
    user.set_additional_gids(Some(spec.groups.clone()));
    user.set_umask(Some(0o022));

    let mut process = Process::default();
    process.set_terminal(Some(spec.terminal.is_some()));
    process.set_user(user);
    process.set_args(Some(spec.argv.clone()));
    process.set_env(Some(
        spec.env
            .iter()
            .map(|(k, v)| format!("{}={}", k, v))
            .collect(),
    ));
    process.set_cwd(PathBuf::from(&spec.cwd));
    process.set_capabilities(Some(capabilities));
    process.set_no_new_privileges(Some(false));
    process.set_rlimits(rlimits(&spec.limits));
    process.set_apparmor_profile(None);
    process.set_oom_score_adj(None);
    process.set_selinux_label(None);

    let mut root = Root::default();
    root.set_path(rootfs.to_path_buf());
    root.set_readonly(Some(false));

    let namespace = |typ, path: Option<&Path>| {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(typ);
        ns.set_path(path.map(Path::to_path_buf));
        ns
    };
    let mut namespaces: Vec<LinuxNamespace> = [
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
    ]
    .into_iter()
    .filter(|t| spec.process_sandbox || *t != LinuxNamespaceType::Pid)
    .map(|typ| namespace(typ, None))
    .collect();
    if spec.network != NetworkMode::Host {
        namespaces.push(namespace(LinuxNamespaceType::Network, netns));
    }

    let mut linux = oci_spec::runtime::Linux::default();
    linux.set_namespaces(Some(namespaces));
    linux.set_uid_mappings(None);
    linux.set_gid_mappings(None);
    linux.set_devices(None);
    linux.set_cgroups_path(None);
    // Every device is denied (runc adds back the standard few it creates); insecure allows all.
    let mut devices = LinuxDeviceCgroup::default();
    devices.set_allow(spec.insecure);
    devices.set_access(Some("rwm".into()));
    let mut resources = LinuxResources::default();
    resources.set_devices(Some(vec![devices]));
    linux.set_resources(Some(resources));
    if spec.insecure {
        linux.set_masked_paths(Some(Vec::new()));
        linux.set_readonly_paths(Some(Vec::new()));
        linux.set_seccomp(None);
    } else {
        linux.set_masked_paths(Some(MASKED_PATHS.iter().map(|p| p.to_string()).collect()));
        linux.set_readonly_paths(Some(READONLY_PATHS.iter().map(|p| p.to_string()).collect()));
        linux.set_seccomp(Some(super::seccomp::default_profile(&caps)));
    }

    let mut out = Spec::default();
    out.set_version("1.0.2".into());
    out.set_root(Some(root));
    out.set_hostname(Some(spec.hostname.clone()));
    out.set_mounts(Some(mounts(spec)));
    out.set_process(Some(process));
    out.set_linux(Some(linux));
    out.set_hooks(None);
    out.set_annotations(None);
    out
}

/// The spec as canonical JSON (capability sets sorted), for `builder debug sandbox` and for
/// an external runtime's config.json.
pub fn to_json(spec: &Spec) -> Result<String, serde_json::Error> {
    let mut v = serde_json::to_value(spec)?;
    if let Some(caps) = v
        .pointer_mut("/process/capabilities")
        .and_then(|c| c.as_object_mut())
    {
        for set in caps.values_mut() {
            if let Some(list) = set.as_array_mut() {
                list.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
        }
    }
    serde_json::to_string_pretty(&v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::sandbox::{Executor, RootMount};

    fn step(insecure: bool) -> RunSpec {
        RunSpec {
            terminal: None,
            limits: Default::default(),
            root: RootMount::Bind {
                dir: PathBuf::from("/r"),
            },
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            groups: vec![],
            hostname: "builder".into(),
            network: NetworkMode::Loopback,
            insecure,
            etc_files: vec![],
            mounts: vec![ExtraMount::Bind {
                source: PathBuf::from("/ctx"),
                target: "/src".into(),
                readonly: true,
            }],
            executor: Executor::Builtin,
            process_sandbox: true,
        }
    }

    #[test]
    fn default_policy_is_dockers() {
        let s = runtime_spec(&step(false), Path::new("/r"), None);
        let caps = s
            .process()
            .as_ref()
            .and_then(|p| p.capabilities().clone())
            .unwrap_or_default();
        let bounding = caps.bounding().clone().unwrap_or_default();
        assert_eq!(bounding.len(), 14);
        for absent in [
            Capability::SysAdmin,
            Capability::DacReadSearch,
            Capability::NetAdmin,
            Capability::SysRawio,
            Capability::Syslog,
            Capability::SysModule,
            Capability::SysPtrace,
        ] {
            assert!(!bounding.contains(&absent), "{:?}", absent);
        }
        assert!(caps.inheritable().clone().unwrap_or_default().is_empty());
        let linux = s.linux().clone().unwrap_or_default();
        assert!(linux
            .masked_paths()
            .clone()
            .unwrap_or_default()
            .contains(&"/proc/kcore".to_string()));
        assert!(linux
            .readonly_paths()
            .clone()
            .unwrap_or_default()
            .contains(&"/proc/sys".to_string()));
        assert!(linux.seccomp().is_some());
        let bind = s
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new("/src"));
        let options = bind.and_then(|m| m.options().clone()).unwrap_or_default();
        assert!(options.contains(&"ro".to_string()) && options.contains(&"nodev".to_string()));
    }

    #[test]
    fn insecure_lifts_the_restrictions() {
        let s = runtime_spec(&step(true), Path::new("/r"), None);
        let linux = s.linux().clone().unwrap_or_default();
        assert!(linux.seccomp().is_none());
        assert!(linux.masked_paths().clone().unwrap_or_default().is_empty());
        let caps = s
            .process()
            .as_ref()
            .and_then(|p| p.capabilities().clone())
            .unwrap_or_default();
        assert!(caps
            .bounding()
            .clone()
            .unwrap_or_default()
            .contains(&Capability::SysAdmin));
    }
}
