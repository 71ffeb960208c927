//! Steps for another architecture run under QEMU user emulation that the kernel starts
//! through `binfmt_misc`, the mechanism BuildKit and buildah rely on. A handler registered with
//! the F flag (the interpreter is opened at registration) works inside the sandbox's rootfs
//! too. Without one, a foreign step is refused with how to register it: it never runs the
//! wrong architecture silently, and never hands a foreign binary to the host.

use std::fs;
use std::path::Path;

const BINFMT: &str = "/proc/sys/fs/binfmt_misc";

/// QEMU's name for an OCI architecture.
fn qemu_name(arch: &str) -> Option<&'static str> {
    Some(match arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "arm" => "arm",
        "386" => "i386",
        "ppc64le" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64le" => "mips64el",
        _ => return None,
    })
}

/// Whether a step of `arch` can run here: natively, or through an enabled binfmt_misc
/// handler for it with the F flag. The error says how to get one.
pub fn check(arch: &str) -> Result<(), String> {
    let host = crate::oci::platform::Platform::host().architecture;
    if arch == host {
        return Ok(());
    }
    let Some(name) = qemu_name(arch) else {
        return Err(format!(
            "RUN for architecture {} on this {} machine: builder knows no QEMU emulator for it",
            arch, host
        ));
    };
    match handler(Path::new(BINFMT), name) {
        Handler::Ready => Ok(()),
        Handler::NoFixBinary(entry) => Err(format!(
            "RUN for {} on this {} machine: the binfmt_misc handler {} lacks the F flag, so the \
             emulator cannot be found inside the step's root filesystem; register it again \
             with F (Debian's qemu-user-static does)",
            arch, host, entry
        )),
        Handler::Missing => Err(format!(
            "RUN for {arch} on this {host} machine needs QEMU user emulation, and no binfmt_misc \
             handler for {name} is registered: install Debian's qemu-user-static and \
             binfmt-support (apt-get install qemu-user-static binfmt-support), or mount \
             binfmt_misc (mount -t binfmt_misc binfmt_misc {BINFMT}) and write a qemu-{name} \
             entry with the F flag to {BINFMT}/register"
        )),
    }
}

enum Handler {
    Ready,
    NoFixBinary(String),
    Missing,
}

/// Look for an enabled handler whose interpreter is QEMU's `qemu-NAME`.
fn handler(dir: &Path, name: &str) -> Handler {
    let Ok(entries) = fs::read_dir(dir) else {
        return Handler::Missing;
    };
    let mut found = Handler::Missing;
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if file == "register" || file == "status" {
            continue;
        }
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        };
        let enabled = text.lines().next() == Some("enabled");
        let interpreter = text
            .lines()
            .find_map(|l| l.strip_prefix("interpreter "))
            .unwrap_or("");
        let base = interpreter.rsplit('/').next().unwrap_or("");
        // Debian names it qemu-NAME-static, or (qemu 8 on) NAME-binfmt-P beside its libexec.
        let is_qemu = base == format!("qemu-{}", name)
            || base == format!("qemu-{}-static", name)
            || base == format!("{}-binfmt-P", name);
        if !enabled || !is_qemu {
            continue;
        }
        let fix_binary = text
            .lines()
            .find_map(|l| l.strip_prefix("flags: "))
            .is_some_and(|f| f.contains('F'));
        if fix_binary {
            return Handler::Ready;
        }
        found = Handler::NoFixBinary(file);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_an_enabled_fix_binary_handler() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(handler(d.path(), "aarch64"), Handler::Missing));
        fs::write(d.path().join("register"), "").unwrap();
        fs::write(
            d.path().join("qemu-aarch64"),
            "enabled\ninterpreter /usr/libexec/qemu-binfmt/arm-binfmt-P\nflags: PF\n",
        )
        .unwrap();
        assert!(matches!(handler(d.path(), "aarch64"), Handler::Missing));
        fs::write(
            d.path().join("qemu-aarch64"),
            "enabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: OC\n",
        )
        .unwrap();
        assert!(matches!(
            handler(d.path(), "aarch64"),
            Handler::NoFixBinary(_)
        ));
        fs::write(
            d.path().join("qemu-aarch64"),
            "enabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: OCF\noffset 0\n",
        )
        .unwrap();
        assert!(matches!(handler(d.path(), "aarch64"), Handler::Ready));
        assert!(check(&crate::oci::platform::Platform::host().architecture).is_ok());
    }
}
