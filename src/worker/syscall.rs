//! The system calls that set up mounts and namespaces, behind one trait: [`Host`] makes them,
//! and [`Recorder`] (for unit tests) writes them down and answers as told. The overlay, view
//! and sandbox set-up code takes a `&dyn Syscall`, so its decisions (which flags, which
//! fallback, in what order) are tested without root.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// An overlay to mount through the new mount API (`fsopen`/`fsconfig`/`fsmount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySpec {
    /// Top first.
    pub lowers: Vec<PathBuf>,
    pub upper_work: Option<(PathBuf, PathBuf)>,
    pub target: PathBuf,
    pub readonly: bool,
    pub nodev: bool,
    /// In a user namespace overlay keeps its markers in `user.overlay.*`.
    pub userxattr: bool,
}

/// The calls mount and namespace set-up makes.
pub trait Syscall: Sync {
    fn unshare(&self, flags: CloneFlags) -> Result<(), Errno>;
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno>;
    fn umount(&self, target: &Path, flags: MntFlags) -> Result<(), Errno>;
    fn chdir(&self, dir: &Path) -> Result<(), Errno>;
    /// `ENOSYS` or `EINVAL`: this kernel has no such API (or not for overlay's `lowerdir+`).
    fn mount_overlay_new_api(&self, spec: &OverlaySpec) -> Result<(), Errno>;
}

/// The real thing.
pub struct Host;

impl Syscall for Host {
    fn unshare(&self, flags: CloneFlags) -> Result<(), Errno> {
        nix::sched::unshare(flags)
    }

    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn umount(&self, target: &Path, flags: MntFlags) -> Result<(), Errno> {
        nix::mount::umount2(target, flags)
    }

    fn chdir(&self, dir: &Path) -> Result<(), Errno> {
        nix::unistd::chdir(dir)
    }

    fn mount_overlay_new_api(&self, spec: &OverlaySpec) -> Result<(), Errno> {
        mount_overlay_fsconfig(spec)
    }
}

/// The new mount API's way; `EINVAL` or `ENOSYS` mean this kernel does not have it.
fn mount_overlay_fsconfig(spec: &OverlaySpec) -> Result<(), nix::errno::Errno> {
    let (lowers, target, readonly, nodev) = (&spec.lowers, &spec.target, spec.readonly, spec.nodev);
    let upper_work = spec
        .upper_work
        .as_ref()
        .map(|(u, w)| (u.as_path(), w.as_path()));
    use std::ffi::CString;
    use std::os::fd::{FromRawFd, OwnedFd};
    let cstr = |s: &str| CString::new(s).map_err(|_| nix::errno::Errno::EINVAL);
    let path = |p: &Path| cstr(&p.display().to_string());
    let check = |rc: libc::c_long| -> Result<libc::c_long, nix::errno::Errno> {
        if rc < 0 {
            Err(nix::errno::Errno::last())
        } else {
            Ok(rc)
        }
    };
    let fstype = cstr("overlay")?;
    // SAFETY: plain syscalls on C strings that outlive them; descriptors are owned at once.
    let fs = unsafe {
        OwnedFd::from_raw_fd(check(libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), 1))? as i32)
    };
    let set = |key: &str, value: &CString| -> Result<(), nix::errno::Errno> {
        let k = cstr(key)?;
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                std::os::fd::AsRawFd::as_raw_fd(&fs),
                1, /* FSCONFIG_SET_STRING */
                k.as_ptr(),
                value.as_ptr(),
                0,
            )
        })
        .map(|_| ())
    };
    for l in lowers {
        set("lowerdir+", &path(l)?)?;
    }
    if let Some((upper, work)) = upper_work {
        set("upperdir", &path(upper)?)?;
        set("workdir", &path(work)?)?;
    }
    if spec.userxattr {
        // In a user namespace overlay keeps its markers in `user.overlay.*`.
        let k = cstr("userxattr")?;
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                std::os::fd::AsRawFd::as_raw_fd(&fs),
                0, /* FSCONFIG_SET_FLAG */
                k.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                0,
            )
        })?;
    }
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            std::os::fd::AsRawFd::as_raw_fd(&fs),
            6, /* FSCONFIG_CMD_CREATE */
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    })?;
    let mut attrs: libc::c_ulong = 0;
    if readonly {
        attrs |= 0x1; /* MOUNT_ATTR_RDONLY */
    }
    if nodev {
        attrs |= 0x4; /* MOUNT_ATTR_NODEV */
    }
    let mnt = unsafe {
        OwnedFd::from_raw_fd(check(libc::syscall(
            libc::SYS_fsmount,
            std::os::fd::AsRawFd::as_raw_fd(&fs),
            1, /* FSMOUNT_CLOEXEC */
            attrs,
        ))? as i32)
    };
    let empty = cstr("")?;
    let to = path(target)?;
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            std::os::fd::AsRawFd::as_raw_fd(&mnt),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            4, /* MOVE_MOUNT_F_EMPTY_PATH */
        )
    })?;
    Ok(())
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Unshare(CloneFlags),
    Mount {
        source: Option<String>,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
        data: Option<String>,
    },
    Umount(PathBuf),
    Chdir(PathBuf),
    OverlayNewApi(OverlaySpec),
}

/// A fake that records every call and fails the ones it was told to.
#[derive(Default)]
pub struct Recorder {
    calls: std::sync::Mutex<Vec<Call>>,
    /// A call whose debug text contains the key fails with the errno.
    failures: std::sync::Mutex<Vec<(String, Errno)>>,
}

impl Recorder {
    /// Fail every call whose description contains `pattern` (`"OverlayNewApi"`,
    /// `"fstype: Some(\"sysfs\")"`, a path...) with `errno`.
    pub fn fail(self, pattern: &str, errno: Errno) -> Recorder {
        if let Ok(mut f) = self.failures.lock() {
            f.push((pattern.to_string(), errno));
        }
        self
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn record(&self, call: Call) -> Result<(), Errno> {
        let text = format!("{:?}", call);
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        match failures.iter().find(|(p, _)| text.contains(p.as_str())) {
            Some((_, errno)) => Err(*errno),
            None => Ok(()),
        }
    }
}

impl Syscall for Recorder {
    fn unshare(&self, flags: CloneFlags) -> Result<(), Errno> {
        self.record(Call::Unshare(flags))
    }

    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        self.record(Call::Mount {
            source: source.map(str::to_string),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        })
    }

    fn umount(&self, target: &Path, _flags: MntFlags) -> Result<(), Errno> {
        self.record(Call::Umount(target.to_path_buf()))
    }

    fn chdir(&self, dir: &Path) -> Result<(), Errno> {
        self.record(Call::Chdir(dir.to_path_buf()))
    }

    fn mount_overlay_new_api(&self, spec: &OverlaySpec) -> Result<(), Errno> {
        self.record(Call::OverlayNewApi(spec.clone()))
    }
}
