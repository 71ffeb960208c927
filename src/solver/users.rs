//! User and group names resolved through an image's `/etc/passwd` and `/etc/group`, as
//! `--chown` and `USER` need them. Both files are read inside the image's root (a symlink in
//! the image never reaches the host's files), only when they are regular files, and only up to
//! [`MAX_USER_DB`] bytes.

use std::path::Path;

use crate::oci::root::Root;
use crate::plan::{Chown, Id};

/// The most `/etc/passwd` or `/etc/group` may hold; real ones are a few KiB.
pub const MAX_USER_DB: u64 = 4 << 20;

use crate::plan::perms::MAX_ID;

/// A resolved `user[:group]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// An image's `/etc/passwd` and `/etc/group`, as read once from its root.
pub struct UserDb {
    passwd: String,
    group: String,
}

/// A numeric id, or `None` for a name; an id out of range is an error, not a name.
fn numeric_id(what: &str, s: &str) -> Result<Option<u32>, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match s.parse::<u64>() {
        Ok(n) if n <= MAX_ID => Ok(Some(n as u32)),
        _ => Err(format!(
            "invalid {} id {}: ids go from 0 to {}",
            what, s, MAX_ID
        )),
    }
}

impl UserDb {
    /// Read both files inside `rootfs`; a missing file is an empty one.
    pub fn load(rootfs: &Path) -> Result<UserDb, String> {
        let root = Root::open(rootfs).map_err(|e| format!("{}: {}", rootfs.display(), e))?;
        let read = |rel: &str| -> Result<String, String> {
            Ok(root
                .read_regular(Path::new(rel), MAX_USER_DB)
                .map_err(|e| format!("the image's {}", e))?
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default())
        };
        Ok(UserDb {
            passwd: read("etc/passwd")?,
            group: read("etc/group")?,
        })
    }

    /// The fields of the first line of `text` whose field `key` is `value`.
    fn entry<'a>(text: &'a str, key: usize, value: &str) -> Option<Vec<&'a str>> {
        text.lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|p| p.get(key) == Some(&value))
    }

    /// A user's uid and primary gid by name.
    fn user(&self, name: &str) -> Option<(u32, Option<u32>)> {
        let p = Self::entry(&self.passwd, 0, name)?;
        let uid = p.get(2)?.parse().ok()?;
        Some((uid, p.get(3).and_then(|g| g.parse().ok())))
    }

    /// The passwd line of `uid`.
    fn by_uid(&self, uid: u32) -> Option<Vec<&str>> {
        self.passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|p| p.get(2).and_then(|u| u.parse::<u32>().ok()) == Some(uid))
    }

    fn group_id(&self, name: &str) -> Option<u32> {
        Self::entry(&self.group, 0, name)?.get(2)?.parse().ok()
    }

    fn group_of(&self, g: &str) -> Result<u32, String> {
        match numeric_id("group", g)? {
            Some(n) => Ok(n),
            None => self.group_id(g).ok_or_else(|| {
                format!(
                    "unable to find group {}: no matching entries in the image's /etc/group",
                    g
                )
            }),
        }
    }

    /// `--chown`'s owner: a user without a group takes the user's numeric id as the group,
    /// as docker does.
    pub fn chown(&self, chown: &Chown) -> Result<Owner, String> {
        let uid = match &chown.user {
            Id::Number(n) => *n,
            Id::Name(name) => self.user(name).map(|(u, _)| u).ok_or_else(|| {
                format!(
                    "unable to find user {}: no matching entries in the image's /etc/passwd",
                    name
                )
            })?,
        };
        let gid = match &chown.group {
            None => uid,
            Some(Id::Number(n)) => *n,
            Some(Id::Name(g)) => self.group_of(g)?,
        };
        Ok(Owner { uid, gid })
    }

    /// `USER`'s `user[:group]`: a user without a group takes its primary group from
    /// /etc/passwd.
    pub fn user_spec(&self, spec: &str) -> Result<Owner, String> {
        let (user, group) = split_spec(spec);
        let (uid, primary) = match numeric_id("user", user)? {
            Some(n) => (n, self.user(user).and_then(|(_, g)| g)),
            None => self.user(user).ok_or_else(|| {
                format!(
                    "unable to find user {}: no matching entries in the image's /etc/passwd",
                    user
                )
            })?,
        };
        let gid = match group {
            Some(g) => self.group_of(g)?,
            None => primary.unwrap_or(0),
        };
        Ok(Owner { uid, gid })
    }

    /// The groups of /etc/group that list `user` as a member (supplementary groups).
    pub fn supplementary_groups(&self, user: &str) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .group
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

    /// The home directory of `uid` in /etc/passwd, if listed.
    pub fn home_of(&self, uid: u32) -> Option<String> {
        self.by_uid(uid)?.get(5).map(|h| h.to_string())
    }

    /// The user name of `uid` in /etc/passwd, if listed.
    pub fn name_of(&self, uid: u32) -> Option<String> {
        self.by_uid(uid)?.first().map(|h| h.to_string())
    }
}

fn split_spec(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    }
}

/// Resolve `--chown`'s names inside `rootfs`.
pub fn resolve_chown(rootfs: &Path, chown: &Chown) -> Result<Owner, String> {
    UserDb::load(rootfs)?.chown(chown)
}

/// Resolve a `USER` value for running and for WORKDIR ownership.
pub fn resolve_user(rootfs: &Path, spec: &str) -> Result<Owner, String> {
    UserDb::load(rootfs)?.user_spec(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn chown(spec: &str) -> Chown {
        Chown::parse(spec).unwrap()
    }

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
            resolve_chown(t.path(), &chown("app")).unwrap(),
            Owner {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(
            resolve_chown(t.path(), &chown("app:staff")).unwrap(),
            Owner { uid: 1000, gid: 50 }
        );
        assert_eq!(
            resolve_chown(t.path(), &chown("10:11")).unwrap(),
            Owner { uid: 10, gid: 11 }
        );
        assert!(resolve_chown(t.path(), &chown("nobody")).is_err());
        assert_eq!(
            resolve_chown(t.path(), &chown("4294967294")).unwrap(),
            Owner {
                uid: u32::MAX - 1,
                gid: u32::MAX - 1
            }
        );
        for bad in ["4294967295", "1:4294967295"] {
            let e = resolve_user(t.path(), bad).unwrap_err();
            assert!(e.contains("ids go from 0 to 4294967294"), "{e}");
        }
        assert_eq!(
            resolve_user(t.path(), "app").unwrap(),
            Owner {
                uid: 1000,
                gid: 1001
            }
        );
    }
}
