//! The seccomp half of the sandbox policy: Docker's default profile, written as OCI runtime
//! spec data (`linux.seccomp`), and its compilation to BPF for the built-in executor.
//!
//! The profile is an allowlist: every syscall not named returns EPERM. Some syscalls are
//! allowed only when the step holds the capability that makes them meaningful (`mount` with
//! CAP_SYS_ADMIN, `chroot` with CAP_SYS_CHROOT, ...), exactly as moby's profile conditions
//! them; `clone` without CAP_SYS_ADMIN may not create namespaces, and `clone3` (whose flags
//! live behind a pointer seccomp cannot read) answers ENOSYS so libc falls back to `clone`.
//! An external runtime (runc) reads the same data from config.json; the built-in executor
//! compiles it with `seccompiler`, so nobody here writes BPF by hand.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, OnceLock};

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{BpfProgram, TargetArch};
use serde_json::{json, Value};

/// Syscalls every step may make, whatever its capabilities (moby's default list).
const ALWAYS: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
    // Allowed since Linux 4.8, where ptrace can no longer bypass seccomp.
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    // x86 and arm specifics (names a table lacks are skipped for that architecture).
    "arch_prctl",
    "modify_ldt",
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "sync_file_range2",
    "breakpoint",
    "cacheflush",
    "set_tls",
];

/// Syscalls allowed only with a capability, as moby's profile conditions them.
const WITH_CAPABILITY: &[(Capability, &[&str])] = &[
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "lsm_get_self_attr",
            "lsm_list_modules",
            "lsm_set_self_attr",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (Capability::SysChroot, &["chroot"]),
    (
        Capability::SysModule,
        &["delete_module", "init_module", "finit_module"],
    ),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &["kcmp", "pidfd_getfd", "process_madvise"],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (
        Capability::SysTime,
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    (Capability::SysTtyConfig, &["vhangup"]),
    (
        Capability::SysNice,
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    (Capability::Syslog, &["syslog"]),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
];

/// Socket domains a step may create (moby's list: everything the UAPI defines but the
/// removed ones, AF_ALG and AF_VSOCK). Numbers from linux/socket.h.
const SOCKET_DOMAINS: &[u64] = &[
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 21, 22, 24, 26, 27, 28, 29, 30, 31,
    32, 33, 35, 36, 39, 42, 43, 44, 45,
];

/// `personality` values a step may set (Linux, with ADDR_NO_RANDOMIZE and/or UNAME26, or the
/// query 0xffffffff).
const PERSONALITIES: &[u64] = &[0x0, 0x0008, 0x20000, 0x20008, 0xffff_ffff];

/// The namespace flags `clone` may not carry without CAP_SYS_ADMIN.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

fn syscall(names: &[&str], action: LinuxSeccompAction) -> LinuxSyscall {
    let mut s = LinuxSyscall::default();
    s.set_names(names.iter().map(|n| n.to_string()).collect());
    s.set_action(action);
    s
}

fn with_arg(
    mut s: LinuxSyscall,
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
) -> LinuxSyscall {
    let mut arg = LinuxSeccompArgBuilder::default()
        .index(index)
        .op(op)
        .value(value);
    if op == LinuxSeccompOperator::ScmpCmpMaskedEq {
        arg = arg.value_two(0u64);
    }
    s.set_args(arg.build().ok().map(|a| vec![a]));
    s
}

/// Docker's default profile for a step holding `caps` (its bounding set).
pub fn default_profile(caps: &HashSet<Capability>) -> LinuxSeccomp {
    use LinuxSeccompAction::{ScmpActAllow as Allow, ScmpActErrno as Errno};
    let mut rules = vec![syscall(ALWAYS, Allow)];
    for (cap, names) in WITH_CAPABILITY {
        if caps.contains(cap) {
            rules.push(syscall(names, Allow));
        }
    }
    for domain in SOCKET_DOMAINS {
        rules.push(with_arg(
            syscall(&["socket"], Allow),
            0,
            LinuxSeccompOperator::ScmpCmpEq,
            *domain,
        ));
    }
    for p in PERSONALITIES {
        rules.push(with_arg(
            syscall(&["personality"], Allow),
            0,
            LinuxSeccompOperator::ScmpCmpEq,
            *p,
        ));
    }
    if !caps.contains(&Capability::SysAdmin) {
        rules.push(with_arg(
            syscall(&["clone"], Allow),
            0,
            LinuxSeccompOperator::ScmpCmpMaskedEq,
            CLONE_NAMESPACE_FLAGS,
        ));
        let mut clone3 = syscall(&["clone3"], Errno);
        clone3.set_errno_ret(Some(libc::ENOSYS as u32));
        rules.push(clone3);
    }
    let mut profile = LinuxSeccomp::default();
    profile.set_default_action(Errno);
    profile.set_default_errno_ret(Some(libc::EPERM as u32));
    profile.set_architectures(Some(vec![
        Arch::ScmpArchX86_64,
        Arch::ScmpArchX86,
        Arch::ScmpArchX32,
        Arch::ScmpArchAarch64,
        Arch::ScmpArchArm,
    ]));
    profile.set_syscalls(Some(rules));
    profile
}

/// Why a profile could not be turned into a filter.
#[derive(Debug, thiserror::Error)]
#[error("seccomp profile: {0}")]
pub struct SeccompError(pub String);

fn native_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|_| {
        SeccompError(format!(
            "the built-in executor has no syscall table for {} (use --runtime runc)",
            std::env::consts::ARCH
        ))
    })
}

/// seccompiler's spelling of an action.
fn action_json(action: LinuxSeccompAction, errno: Option<u32>) -> Result<Value, SeccompError> {
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => json!("allow"),
        LinuxSeccompAction::ScmpActErrno => json!({ "errno": errno.unwrap_or(libc::EPERM as u32) }),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            json!("kill_thread")
        }
        LinuxSeccompAction::ScmpActKillProcess => json!("kill_process"),
        LinuxSeccompAction::ScmpActTrap => json!("trap"),
        LinuxSeccompAction::ScmpActLog => json!("log"),
        other => return Err(SeccompError(format!("action {} is not supported", other))),
    })
}

/// seccompiler's spelling of one argument condition. OCI's masked comparison is
/// `(arg & value) == valueTwo` on the whole register (a qword); the other comparisons in
/// these profiles test `int` arguments (socket domains, personalities) in their low word.
fn condition_json(a: &LinuxSeccompArg) -> Value {
    let (op, val, width) = match a.op() {
        LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), a.value(), "dword"),
        LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), a.value(), "dword"),
        LinuxSeccompOperator::ScmpCmpLe => (json!("le"), a.value(), "dword"),
        LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), a.value(), "dword"),
        LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), a.value(), "dword"),
        LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), a.value(), "dword"),
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            json!({ "masked_eq": a.value() }),
            a.value_two().unwrap_or(0),
            "qword",
        ),
    };
    json!({ "index": a.index(), "type": width, "op": op, "val": val })
}

/// The calls one filter matches: per syscall name, `None` for every call, or the rules
/// (each a conjunction of conditions) of which one must hold.
#[derive(Default)]
struct Matches(BTreeMap<String, Option<Vec<Vec<Value>>>>);

impl Matches {
    fn add(&mut self, name: &str, rule: Option<Vec<Value>>) {
        let slot = self
            .0
            .entry(name.to_string())
            .or_insert_with(|| Some(Vec::new()));
        match (slot.as_mut(), rule) {
            (None, _) => {}
            (Some(_), None) => *slot = None,
            (Some(rules), Some(conds)) => rules.push(conds),
        }
    }

    fn to_json(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for (name, rules) in &self.0 {
            match rules {
                None => out.push(json!({ "syscall": name })),
                Some(rules) => {
                    for conds in rules {
                        out.push(json!({ "syscall": name, "args": conds }));
                    }
                }
            }
        }
        out
    }
}

/// Which names the syscall table of `arch` knows (asked of seccompiler once per name).
fn known(arch: TargetArch, name: &str) -> bool {
    static CACHE: OnceLock<Mutex<BTreeMap<String, bool>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(k) = cache.lock().ok().and_then(|c| c.get(name).copied()) {
        return k;
    }
    let probe = json!({"p": {"mismatch_action": "allow", "match_action": "trap",
        "filter": [{"syscall": name}]}});
    let ok = seccompiler::compile_from_json(probe.to_string().as_bytes(), arch).is_ok();
    if let Ok(mut c) = cache.lock() {
        c.insert(name.to_string(), ok);
    }
    ok
}

/// Compile a profile for this machine's architecture. The kernel runs every installed filter
/// and keeps the strictest answer, so a profile becomes one filter for its default action,
/// which every named call passes, plus one filter per other action, which only that action's
/// rules trip. Names this architecture lacks are skipped, as libseccomp skips them.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    static COMPILED: OnceLock<Mutex<BTreeMap<String, Vec<BpfProgram>>>> = OnceLock::new();
    let cache_key = serde_json::to_string(profile).map_err(|e| SeccompError(e.to_string()))?;
    let cache = COMPILED.get_or_init(Default::default);
    if let Some(p) = cache.lock().ok().and_then(|c| c.get(&cache_key).cloned()) {
        return Ok(p);
    }
    let arch = native_arch()?;
    let default = (profile.default_action(), profile.default_errno_ret());
    let mut passes_default = Matches::default();
    let mut others: Vec<((LinuxSeccompAction, Option<u32>), Matches)> = Vec::new();
    for rule in profile.syscalls().iter().flatten() {
        let action = (rule.action(), rule.errno_ret());
        if action == default {
            continue;
        }
        let conds: Option<Vec<Value>> = rule
            .args()
            .as_ref()
            .map(|args| args.iter().map(condition_json).collect());
        for name in rule.names().iter().filter(|n| known(arch, n)) {
            if action.0 == LinuxSeccompAction::ScmpActAllow {
                passes_default.add(name, conds.clone());
            } else {
                // Its own filter decides the call; the default filter lets it through.
                passes_default.add(name, None);
                match others.iter_mut().find(|(a, _)| *a == action) {
                    Some((_, m)) => m.add(name, conds.clone()),
                    None => {
                        let mut m = Matches::default();
                        m.add(name, conds.clone());
                        others.push((action, m));
                    }
                }
            }
        }
    }
    let mut doc = serde_json::Map::new();
    let mut order = Vec::new();
    if default.0 != LinuxSeccompAction::ScmpActAllow {
        doc.insert(
            "default".into(),
            json!({"mismatch_action": action_json(default.0, default.1)?,
                   "match_action": "allow", "filter": passes_default.to_json()}),
        );
        order.push("default".to_string());
    }
    for (i, ((action, errno), m)) in others.iter().enumerate() {
        let name = format!("action{}", i);
        doc.insert(
            name.clone(),
            json!({"mismatch_action": "allow", "match_action": action_json(*action, *errno)?,
                   "filter": m.to_json()}),
        );
        order.push(name);
    }
    let text = Value::Object(doc).to_string();
    let mut map = seccompiler::compile_from_json(text.as_bytes(), arch)
        .map_err(|e| SeccompError(e.to_string()))?;
    let programs: Vec<BpfProgram> = order.iter().filter_map(|n| map.remove(n)).collect();
    if let Ok(mut c) = cache.lock() {
        c.insert(cache_key, programs.clone());
    }
    Ok(programs)
}

/// Install compiled filters on the calling thread (a forked, single-threaded child that still
/// holds CAP_SYS_ADMIN). seccompiler's own installer sets `no_new_privs` first, which docker's
/// policy does not (setuid programs such as `su` work in a RUN step), so the filter is handed
/// to the kernel here.
pub fn apply(programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        let prog = libc::sock_fprog {
            len: p.len() as libc::c_ushort,
            // seccompiler's sock_filter is the kernel's struct sock_filter (repr(C)).
            filter: p.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: prog points at a live, well-formed BPF program for the whole call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(SeccompError(format!(
                "install the filter: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_refuses_what_docker_refuses() {
        let caps: HashSet<Capability> = super::super::policy::default_capabilities();
        let p = default_profile(&caps);
        let allowed: Vec<&String> = p
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| s.action() == LinuxSeccompAction::ScmpActAllow && s.args().is_none())
            .flat_map(|s| s.names())
            .collect();
        for refused in [
            "mount",
            "umount2",
            "open_by_handle_at",
            "keyctl",
            "bpf",
            "unshare",
            "setns",
            "pivot_root",
            "init_module",
            "kexec_load",
            "add_key",
            "request_key",
            "userfaultfd",
            "perf_event_open",
        ] {
            assert!(
                !allowed.iter().any(|a| *a == refused),
                "{} is allowed",
                refused
            );
        }
        assert!(allowed.iter().any(|a| *a == "chroot"));
        let programs = compile(&p).expect("compiles");
        assert_eq!(
            programs.len(),
            2,
            "the EPERM allowlist and the clone3 ENOSYS filter"
        );
    }
}
