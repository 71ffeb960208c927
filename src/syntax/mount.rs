//! `RUN --mount=type=...,k=v` specs (CSV fields), validated the way BuildKit validates them.

/// The kind of a `RUN --mount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

/// `sharing=` of a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

/// One parsed mount.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mount {
    pub kind: MountType,
    pub target: Option<String>,
    pub source: Option<String>,
    pub from: Option<String>,
    pub id: Option<String>,
    pub readonly: bool,
    pub sharing: Sharing,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub required: bool,
    pub env: Option<String>,
    pub size: Option<u64>,
}

fn parse_bool(k: &str, v: Option<&str>) -> Result<bool, String> {
    match v {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(o) => Err(format!("invalid value {:?} for mount option {}", o, k)),
    }
}

impl Mount {
    /// Parse a `--mount` value such as `type=cache,target=/root/.cache,sharing=locked`.
    pub fn parse(spec: &str) -> Result<Mount, String> {
        let mut m = Mount {
            kind: MountType::Bind,
            target: None,
            source: None,
            from: None,
            id: None,
            readonly: true,
            sharing: Sharing::Shared,
            mode: None,
            uid: None,
            gid: None,
            required: false,
            env: None,
            size: None,
        };
        let fields: Vec<(String, Option<String>)> = spec
            .split(',')
            .filter(|f| !f.is_empty())
            .map(|f| match f.split_once('=') {
                Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.to_string())),
                None => (f.trim().to_ascii_lowercase(), None),
            })
            .collect();
        if let Some((_, v)) = fields.iter().find(|(k, _)| k == "type") {
            m.kind = match v.as_deref() {
                Some("bind") => MountType::Bind,
                Some("cache") => MountType::Cache,
                Some("tmpfs") => MountType::Tmpfs,
                Some("secret") => MountType::Secret,
                Some("ssh") => MountType::Ssh,
                other => return Err(format!("unsupported mount type {:?}", other.unwrap_or(""))),
            };
        }
        if m.kind == MountType::Cache {
            m.readonly = false;
        }
        let num = |k: &str, v: &Option<String>, radix: u32| -> Result<u32, String> {
            let v = v.as_deref().unwrap_or("");
            u32::from_str_radix(v, radix)
                .map_err(|_| format!("invalid value {:?} for mount option {}", v, k))
        };
        for (k, v) in &fields {
            let need = || {
                v.clone()
                    .ok_or_else(|| format!("mount option {} needs a value", k))
            };
            match k.as_str() {
                "type" => {}
                "target" | "dst" | "destination" => m.target = Some(need()?),
                "source" | "src" => m.source = Some(need()?),
                "from" => m.from = Some(need()?),
                "id" => m.id = Some(need()?),
                "ro" | "readonly" => m.readonly = parse_bool(k, v.as_deref())?,
                "rw" | "readwrite" => m.readonly = !parse_bool(k, v.as_deref())?,
                "required" => m.required = parse_bool(k, v.as_deref())?,
                "env" => m.env = Some(need()?),
                "mode" => m.mode = Some(num(k, v, 8)?),
                "uid" => m.uid = Some(num(k, v, 10)?),
                "gid" => m.gid = Some(num(k, v, 10)?),
                "size" => {
                    let s = need()?;
                    m.size = Some(
                        s.parse()
                            .map_err(|_| format!("invalid value {:?} for mount option size", s))?,
                    )
                }
                "sharing" => {
                    m.sharing = match v.as_deref() {
                        Some("shared") => Sharing::Shared,
                        Some("private") => Sharing::Private,
                        Some("locked") => Sharing::Locked,
                        o => {
                            return Err(format!("unsupported sharing value {:?}", o.unwrap_or("")))
                        }
                    }
                }
                other => return Err(format!("unexpected key '{}' in '{}'", other, spec)),
            }
        }
        let needs_target = !matches!(m.kind, MountType::Secret | MountType::Ssh);
        if needs_target && m.target.is_none() {
            return Err(format!("mount {:?} has no target", spec));
        }
        if m.kind == MountType::Secret && m.target.is_none() && m.env.is_none() && m.id.is_none() {
            return Err("secret mount needs an id, a target or an env".into());
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_mount_defaults_to_read_write() {
        let m = Mount::parse("type=cache,target=/root/.cache,sharing=locked,mode=0755,uid=1000")
            .unwrap();
        assert_eq!(m.kind, MountType::Cache);
        assert!(!m.readonly);
        assert_eq!(
            (m.sharing, m.mode, m.uid),
            (Sharing::Locked, Some(0o755), Some(1000))
        );
    }

    #[test]
    fn bind_needs_target_and_rejects_unknown_keys() {
        assert!(Mount::parse("type=bind,source=x").is_err());
        assert!(Mount::parse("type=bind,target=/x,bogus=1").is_err());
        assert!(Mount::parse("type=weird,target=/x").is_err());
        assert!(Mount::parse("target=/x,from=build,rw")
            .is_ok_and(|m| !m.readonly && m.from.as_deref() == Some("build")));
    }
}
