//! User and group names resolved through an image's `/etc/passwd` and `/etc/group`, as
//! `--chown` and `USER` need them.

use std::fs;
use std::path::Path;

/// A resolved `user[:group]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

fn lookup(file: &Path, name: &str, field: usize) -> Option<(u32, Option<u32>)> {
    let text = fs::read_to_string(file).ok()?;
    for line in text.lines() {
        let parts: Vec<&str> = line.split(':').collect();
        if parts.first() == Some(&name) && parts.len() > field {
            let id = parts[field].parse().ok()?;
            let gid = parts.get(3).and_then(|g| g.parse().ok());
            return Some((id, gid));
        }
    }
    None
}

/// Resolve `spec` (`user`, `uid`, `user:group`, `uid:gid`) inside `rootfs`. A user without a
/// group uses the user's numeric id as the group, as docker does for `--chown`.
pub fn resolve_chown(rootfs: &Path, spec: &str) -> Result<Owner, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let uid = match user.parse::<u32>() {
        Ok(n) => n,
        Err(_) => lookup(&rootfs.join("etc/passwd"), user, 2)
            .map(|(u, _)| u)
            .ok_or_else(|| {
                format!(
                    "unable to find user {}: no matching entries in the image's /etc/passwd",
                    user
                )
            })?,
    };
    let gid = match group {
        None => uid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(&rootfs.join("etc/group"), g, 2)
                .map(|(g, _)| g)
                .ok_or_else(|| {
                    format!(
                        "unable to find group {}: no matching entries in the image's /etc/group",
                        g
                    )
                })?,
        },
    };
    Ok(Owner { uid, gid })
}

/// Resolve a `USER` value for running and for WORKDIR ownership: a user name without group
/// takes the primary group from /etc/passwd.
pub fn resolve_user(rootfs: &Path, spec: &str) -> Result<Owner, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (
            n,
            lookup(&rootfs.join("etc/passwd"), user, 2).and_then(|(_, g)| g),
        ),
        Err(_) => {
            let (u, g) = lookup(&rootfs.join("etc/passwd"), user, 2).ok_or_else(|| {
                format!(
                    "unable to find user {}: no matching entries in the image's /etc/passwd",
                    user
                )
            })?;
            (u, g)
        }
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(&rootfs.join("etc/group"), g, 2)
                .map(|(g, _)| g)
                .ok_or_else(|| format!("unable to find group {}", g))?,
        },
        None => primary.unwrap_or(0),
    };
    Ok(Owner { uid, gid })
}

/// Apply a `--chmod` value (octal like `755`, or symbolic like `u+x,go-w`) to `mode`.
pub fn apply_chmod(spec: &str, mode: u32, is_dir: bool) -> Result<u32, String> {
    if let Ok(m) = u32::from_str_radix(spec, 8) {
        if m > 0o7777 {
            return Err(format!("invalid --chmod {:?}: above 7777", spec));
        }
        return Ok(m);
    }
    let mut mode = mode & 0o7777;
    for clause in spec.split(',') {
        let op_pos = clause
            .find(['+', '-', '='])
            .ok_or_else(|| format!("invalid --chmod {:?}", spec))?;
        let (who, rest) = clause.split_at(op_pos);
        let op = rest.chars().next().unwrap_or('=');
        let perms = &rest[1..];
        let mut mask = 0u32;
        for w in if who.is_empty() {
            "a".chars()
        } else {
            who.chars()
        } {
            mask |= match w {
                'u' => 0o4700,
                'g' => 0o2070,
                'o' => 0o0007,
                'a' => 0o6777,
                _ => return Err(format!("invalid --chmod {:?}: unknown who {:?}", spec, w)),
            };
        }
        let mut bits = 0u32;
        for p in perms.chars() {
            bits |= match p {
                'r' => 0o444,
                'w' => 0o222,
                'x' => 0o111,
                'X' if is_dir || mode & 0o111 != 0 => 0o111,
                'X' => 0,
                's' => 0o6000,
                't' => 0o1000,
                _ => {
                    return Err(format!(
                        "invalid --chmod {:?}: unknown permission {:?}",
                        spec, p
                    ))
                }
            };
        }
        let bits = bits & mask;
        mode = match op {
            '+' => mode | bits,
            '-' => mode & !bits,
            _ => (mode & !mask) | bits,
        };
    }
    Ok(mode)
}

/// The groups of /etc/group that list `user` as a member (for supplementary groups).
pub fn supplementary_groups(rootfs: &Path, user: &str) -> Vec<u32> {
    let Ok(text) = fs::read_to_string(rootfs.join("etc/group")) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = text
        .lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split(':').collect();
            let members = parts.get(3)?;
            members
                .split(',')
                .any(|m| m.trim() == user)
                .then(|| parts.get(2)?.parse().ok())
                .flatten()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Field `index` of the /etc/passwd line of `uid`, if listed.
fn passwd_field(rootfs: &Path, uid: u32, index: usize) -> Option<String> {
    let text = fs::read_to_string(rootfs.join("etc/passwd")).ok()?;
    text.lines().find_map(|l| {
        let p: Vec<&str> = l.split(':').collect();
        (p.get(2)?.parse::<u32>().ok()? == uid)
            .then(|| p.get(index).map(|h| h.to_string()))
            .flatten()
    })
}

/// The home directory of `uid` in /etc/passwd, if listed.
pub fn home_of(rootfs: &Path, uid: u32) -> Option<String> {
    passwd_field(rootfs, uid, 5)
}

/// The user name of `uid` in /etc/passwd, if listed.
pub fn name_of(rootfs: &Path, uid: u32) -> Option<String> {
    passwd_field(rootfs, uid, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chown_names_and_numbers() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("etc")).unwrap();
        fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(t.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(
            resolve_chown(t.path(), "app").unwrap(),
            Owner {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(
            resolve_chown(t.path(), "app:staff").unwrap(),
            Owner { uid: 1000, gid: 50 }
        );
        assert_eq!(
            resolve_chown(t.path(), "10:11").unwrap(),
            Owner { uid: 10, gid: 11 }
        );
        assert!(resolve_chown(t.path(), "nobody").is_err());
        assert_eq!(
            resolve_user(t.path(), "app").unwrap(),
            Owner {
                uid: 1000,
                gid: 1001
            }
        );
    }

    #[test]
    fn chmod_forms() {
        assert_eq!(apply_chmod("755", 0o644, false).unwrap(), 0o755);
        assert_eq!(apply_chmod("u+x", 0o644, false).unwrap(), 0o744);
        assert_eq!(apply_chmod("go-r", 0o644, false).unwrap(), 0o600);
        assert_eq!(apply_chmod("a=rX", 0o700, true).unwrap(), 0o555);
        assert!(apply_chmod("z+q", 0o644, false).is_err());
    }
}
