//! Flag values parsed into what the solver takes: `--secret` sources and `--allow`
//! entitlements. (The solver receives values, never flag text.)

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::solver::mounts::SecretSource;
use crate::solver::Entitlements;

/// Parse `--secret id=ID,src=FILE` / `id=ID,env=VAR` (a bare `id=ID` reads the env var ID).
pub fn parse_secret(s: &str) -> Result<(String, SecretSource), String> {
    let mut id = None;
    let mut src = None;
    for f in s.split(',') {
        match f.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(SecretSource::File(PathBuf::from(v))),
            Some(("env", v)) => src = Some(SecretSource::Env(v.to_string())),
            Some(("type", "file" | "env")) => {}
            _ => {
                return Err(format!(
                    "invalid --secret {:?}: want id=ID,src=FILE or id=ID,env=VAR",
                    s
                ))
            }
        }
    }
    let id = id.ok_or_else(|| format!("invalid --secret {:?}: id= is required", s))?;
    let src = src.unwrap_or_else(|| SecretSource::Env(id.clone()));
    Ok((id, src))
}

/// Parse every `--secret`, by id.
pub fn parse_secrets(values: &[String]) -> Result<BTreeMap<String, SecretSource>, String> {
    values.iter().map(|s| parse_secret(s)).collect()
}

/// Parse `--add-host HOST:IP` (or `HOST=IP`, as buildx also takes) into (host, address).
pub fn parse_add_host(s: &str) -> Result<(String, String), String> {
    let (host, address) = s
        .split_once('=')
        .or_else(|| s.split_once(':'))
        .ok_or_else(|| format!("invalid --add-host {:?}: want HOST:IP", s))?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
        return Err(format!("invalid --add-host {:?}: no host name", s));
    }
    let ip: std::net::IpAddr = address.parse().map_err(|_| {
        format!(
            "invalid --add-host {:?}: {:?} is not an IP address{}",
            s,
            address,
            if address == "host-gateway" {
                " (host-gateway is a docker daemon setting builder has no equivalent of)"
            } else {
                ""
            }
        )
    })?;
    Ok((host.to_string(), ip.to_string()))
}

/// Parse `--annotation [TYPE[,TYPE][PLATFORM]:]KEY=VALUE` as buildx does: TYPE is
/// `manifest` (the default), `index`, `manifest-descriptor` or `index-descriptor`;
/// `[os/arch]` limits it to one platform's image.
pub fn parse_annotation(s: &str) -> Result<Vec<crate::pipeline::Annotation>, String> {
    use crate::pipeline::{Annotation, AnnotationLevel};
    let bad = |why: &str| format!("invalid --annotation {:?}: {}", s, why);
    let (kv, prefix) = match s.split_once('=') {
        Some((left, value)) => match left.rsplit_once(':') {
            // `manifest:key` or `manifest[linux/amd64]:key`; a key holding `:` without
            // a known level stays a key.
            Some((p, key)) if p.starts_with("manifest") || p.starts_with("index") => {
                ((key, value), Some(p))
            }
            _ => ((left, value), None),
        },
        None => return Err(bad("want KEY=VALUE")),
    };
    if kv.0.is_empty() {
        return Err(bad("no key"));
    }
    let (types, platform) = match prefix {
        None => ("manifest", None),
        Some(p) => match p.split_once('[') {
            Some((t, rest)) => {
                let plat = rest
                    .strip_suffix(']')
                    .ok_or_else(|| bad("an unclosed [platform]"))?;
                crate::oci::platform::Platform::parse(plat).ok_or_else(|| bad("a bad platform"))?;
                (t, Some(plat.to_string()))
            }
            None => (p, None),
        },
    };
    let mut out = Vec::new();
    for t in types.split(',') {
        let level = match t {
            "manifest" => AnnotationLevel::Manifest,
            "index" => AnnotationLevel::Index,
            "manifest-descriptor" => AnnotationLevel::ManifestDescriptor,
            "index-descriptor" => AnnotationLevel::IndexDescriptor,
            _ => {
                return Err(bad(
                    "the level is manifest, index, manifest-descriptor or index-descriptor",
                ))
            }
        };
        out.push(Annotation {
            level,
            platform: platform.clone(),
            key: kv.0.to_string(),
            value: kv.1.to_string(),
        });
    }
    Ok(out)
}

/// Parse `--allow` values into BuildKit's entitlements.
pub fn parse_entitlements(values: &[String]) -> Result<Entitlements, String> {
    let mut e = Entitlements::default();
    for v in values.iter().flat_map(|v| v.split(',')) {
        match v.trim() {
            "network.host" => e.network_host = true,
            "security.insecure" => e.security_insecure = true,
            other => {
                return Err(format!(
                    "unknown entitlement {:?} (network.host or security.insecure)",
                    other
                ))
            }
        }
    }
    Ok(e)
}

/// `--platform`: `os/arch[/variant]`, this machine's when not given.
pub fn parse_platform(p: Option<&str>) -> Result<crate::oci::platform::Platform, super::CliError> {
    match p {
        Some(p) => crate::oci::platform::Platform::parse(p).ok_or_else(|| {
            super::CliError::msg(format!(
                "invalid --platform {:?}: want os/arch[/variant]",
                p
            ))
        }),
        None => Ok(crate::oci::platform::Platform::host()),
    }
}

/// `--format text|json`: whether it is JSON.
pub fn json_format(format: &str) -> Result<bool, super::CliError> {
    match format {
        "json" => Ok(true),
        "text" => Ok(false),
        other => Err(super::CliError::msg(format!(
            "invalid --format {:?}: text or json",
            other
        ))),
    }
}

/// The `--build-context`s of a build.
#[derive(Default)]
pub struct BuildContexts {
    /// What each name stands for, by the name as the frontend looks it up.
    pub contexts: BTreeMap<String, crate::frontend::graph::NamedContext>,
    /// The local directories among them (absolute).
    pub dirs: BTreeMap<String, PathBuf>,
    /// What the provenance records of each: `docker-image://REF`, `oci-layout://DIR…`, a
    /// git checkout's `URL#COMMIT[:SUBDIR]`, or `local` (a host path is no record).
    pub recorded: BTreeMap<String, String>,
    /// The git checkouts, kept for the build.
    pub checkouts: Vec<std::sync::Arc<tempfile::TempDir>>,
}

/// `--build-context NAME=VALUE`s. VALUE is a directory, `docker-image://REF`,
/// `oci-layout://DIR[:TAG|@DIGEST]`, a git repository (`URL#REF[:SUBDIR]`, checked out now
/// with `auth`), or an http(s) URL of a tarball (downloaded and unpacked now).
pub fn parse_build_contexts(
    values: &[String],
    auth: &crate::git::GitAuth,
) -> Result<BuildContexts, super::CliError> {
    use crate::frontend::graph::{context_name, NamedContext};
    let mut out = BuildContexts::default();
    for v in values {
        let bad =
            |why: &str| super::CliError::msg(format!("invalid --build-context {:?}: {}", v, why));
        let (name, value) = v
            .split_once('=')
            .filter(|(n, val)| !n.trim().is_empty() && !val.is_empty())
            .ok_or_else(|| bad("want NAME=VALUE"))?;
        let key = context_name(name.trim());
        if key == "scratch" || key == "context" {
            return Err(bad("the name is reserved"));
        }
        let context = if let Some(r) = value.strip_prefix("docker-image://") {
            crate::registry::Reference::parse(r).map_err(|e| bad(&e.to_string()))?;
            out.recorded.insert(key.clone(), value.to_string());
            NamedContext::Image(r.to_string())
        } else if let Some(l) = value.strip_prefix("oci-layout://") {
            // DIR, DIR:TAG or DIR@DIGEST, split as FROM oci: splits it; the directory made
            // absolute.
            use crate::store::sources::ImageSource;
            if let Some((_, digest)) = l.rsplit_once('@').filter(|(_, d)| d.starts_with("sha256:"))
            {
                digest
                    .parse::<crate::oci::digest::Digest>()
                    .map_err(|e| bad(&format!("{}: {}", digest, e)))?;
            }
            let ImageSource::OciDir { dir, tag } = ImageSource::parse(&format!("oci:{}", l)) else {
                return Err(bad("want oci-layout://DIR[:TAG|@DIGEST]"));
            };
            let pin = match tag {
                Some(d) if d.parse::<crate::oci::digest::Digest>().is_ok() => format!("@{}", d),
                Some(t) => format!(":{}", t),
                None => String::new(),
            };
            let abs = dir
                .canonicalize()
                .map_err(|e| bad(&format!("{}: {}", dir.display(), e)))?;
            if !abs.join("index.json").is_file() {
                return Err(bad(&format!(
                    "{}: not an OCI layout (no index.json)",
                    abs.display()
                )));
            }
            out.recorded.insert(
                key.clone(),
                format!("oci-layout://{}{}", abs.display(), pin),
            );
            NamedContext::Image(format!("oci:{}{}", abs.display(), pin))
        } else if crate::git::is_git(value) {
            let source = crate::git::GitSource::parse(value).map_err(|e| bad(&e))?;
            let commit = crate::git::resolve(&source, auth).map_err(|e| bad(&e))?;
            let holder = tempfile::tempdir().map_err(|e| bad(&e.to_string()))?;
            let tree = holder.path().join("tree");
            crate::git::checkout(&source, &commit, &tree, false, auth).map_err(|e| bad(&e))?;
            let dir = match &source.subdir {
                Some(s) => crate::oci::unpack::resolve_in_root(&tree, std::path::Path::new(s))
                    .map_err(|e| bad(&e.to_string()))?,
                None => tree,
            };
            if !dir.is_dir() {
                return Err(bad(&format!(
                    "{}: no such directory in the commit",
                    dir.display()
                )));
            }
            out.dirs.insert(key.clone(), dir);
            // Pinned to the commit: what `builder verify` can check out again.
            let pinned = match &source.subdir {
                Some(s) => format!("{}#{}:{}", source.remote, commit, s),
                None => format!("{}#{}", source.remote, commit),
            };
            out.recorded.insert(key.clone(), pinned);
            out.checkouts.push(std::sync::Arc::new(holder));
            NamedContext::Local
        } else if value.starts_with("http://") || value.starts_with("https://") {
            // As BuildKit: a URL that is not a git repository is a tarball of the context
            // (plain or compressed), unpacked here for the build.
            let holder = tempfile::tempdir().map_err(|e| bad(&e.to_string()))?;
            let what = format!("--build-context {}=", name.trim());
            let (_, body, _, _) =
                crate::solver::staging::download(value, None, holder.path(), &what)
                    .map_err(super::CliError::msg)?;
            if !crate::oci::unpack::is_archive(&body) {
                return Err(bad(
                    "the URL does not give a tar archive (plain, gzip, bzip2, xz or zstd)",
                ));
            }
            let tree = holder.path().join("tree");
            std::fs::create_dir(&tree).map_err(|e| bad(&e.to_string()))?;
            crate::oci::unpack::unpack_layer(
                &body,
                value,
                &tree,
                crate::oci::unpack::UnpackOptions::default(),
            )
            .map_err(|e| bad(&e.to_string()))?;
            let _ = std::fs::remove_file(&body);
            out.dirs.insert(key.clone(), tree);
            // The URL (what `builder verify` downloads again); the provenance lists the
            // files it gave, as a directory's.
            out.recorded.insert(key.clone(), value.to_string());
            out.checkouts.push(std::sync::Arc::new(holder));
            NamedContext::Local
        } else if value.contains("://") {
            return Err(bad(
                "a directory, docker-image://REF, oci-layout://DIR[:TAG|@DIGEST], a git repository or an http(s) tarball",
            ));
        } else {
            let dir = PathBuf::from(value);
            let abs = dir
                .canonicalize()
                .map_err(|e| bad(&format!("{}: {}", dir.display(), e)))?;
            if !abs.is_dir() {
                return Err(bad(&format!("{}: not a directory", abs.display())));
            }
            out.dirs.insert(key.clone(), abs);
            out.recorded.insert(key.clone(), "local".into());
            NamedContext::Local
        };
        if out.contexts.insert(key.clone(), context).is_some() {
            return Err(bad(&format!("{} is given twice", key)));
        }
    }
    Ok(out)
}

/// A memory size as docker's `--shm-size` takes it: a number with an optional binary unit
/// (`b`, `k`, `m`, `g`, `t`; `64m` is 64 MiB, `kb` and `kib` read as `k`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = crate::cache::gc::parse_size_in(s, 1024)?;
    if !(1..=1 << 50).contains(&bytes) {
        return Err("out of range".into());
    }
    Ok(bytes)
}

/// `--ssh default|ID[=SOCKET|KEY[,KEY...]]`s: each id's agent socket, and the agents started
/// for keys (kept for the build). An id alone, or `default`, is $SSH_AUTH_SOCK's agent.
#[allow(clippy::type_complexity)]
pub fn parse_ssh(
    values: &[String],
) -> Result<
    (
        BTreeMap<String, PathBuf>,
        Vec<std::sync::Arc<crate::solver::ssh::KeyAgent>>,
    ),
    String,
> {
    use std::os::unix::fs::FileTypeExt;
    let mut sockets = BTreeMap::new();
    let mut agents = Vec::new();
    for v in values {
        let (id, paths) = match v.split_once('=') {
            Some((id, p)) => (id.trim(), Some(p)),
            None => (v.trim(), None),
        };
        if id.is_empty() {
            return Err(format!(
                "invalid --ssh {:?}: want default or ID[=SOCKET|KEY]",
                v
            ));
        }
        let socket = match paths.filter(|p| !p.is_empty()) {
            None => match std::env::var_os("SSH_AUTH_SOCK") {
                Some(s) if !s.is_empty() => PathBuf::from(s),
                _ => {
                    return Err(format!(
                        "--ssh {}: SSH_AUTH_SOCK is not set; start an agent (eval $(ssh-agent); ssh-add) or give --ssh {}=SOCKET",
                        v, id
                    ))
                }
            },
            Some(list) => {
                let paths: Vec<PathBuf> = list.split(',').map(PathBuf::from).collect();
                let kind = |p: &PathBuf| {
                    std::fs::metadata(p)
                        .map(|m| m.file_type())
                        .map_err(|e| format!("--ssh {}: {}: {}", id, p.display(), e))
                };
                if paths.len() == 1 && kind(&paths[0])?.is_socket() {
                    paths[0].clone()
                } else {
                    for p in &paths {
                        if !kind(p)?.is_file() {
                            return Err(format!(
                                "--ssh {}: {}: neither an agent socket nor a key file",
                                id,
                                p.display()
                            ));
                        }
                    }
                    let agent = crate::solver::ssh::KeyAgent::start(&paths)
                        .map_err(|e| format!("--ssh {}: {}", id, e))?;
                    let s = agent.socket().to_path_buf();
                    agents.push(std::sync::Arc::new(agent));
                    s
                }
            }
        };
        if sockets.insert(id.to_string(), socket).is_some() {
            return Err(format!("--ssh {}: the id is given twice", id));
        }
    }
    Ok((sockets, agents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_take_buildx_prefixes() {
        let a = parse_annotation("org.opencontainers.image.title=app").unwrap();
        assert_eq!(a[0].level, crate::pipeline::AnnotationLevel::Manifest);
        assert_eq!(a[0].key, "org.opencontainers.image.title");
        let b = parse_annotation("index,manifest[linux/arm64]:k=v=w").unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].level, crate::pipeline::AnnotationLevel::Index);
        assert_eq!(b[1].platform.as_deref(), Some("linux/arm64"));
        assert_eq!(b[1].value, "v=w");
        assert!(parse_annotation("novalue").is_err());
        assert!(
            parse_annotation("bogus:k=v").is_ok(),
            "an unknown prefix is part of the key"
        );
        assert!(parse_annotation("manifest[linux:k=v").is_err());
    }

    #[test]
    fn extra_hosts() {
        assert_eq!(
            parse_add_host("db:10.0.0.5").unwrap(),
            ("db".into(), "10.0.0.5".into())
        );
        assert_eq!(
            parse_add_host("v6=::1").unwrap(),
            ("v6".into(), "::1".into())
        );
        assert_eq!(
            parse_add_host("v6:::1").unwrap(),
            ("v6".into(), "::1".into())
        );
        assert!(parse_add_host("db").is_err());
        assert!(parse_add_host("db:host-gateway")
            .unwrap_err()
            .contains("host-gateway"));
    }

    #[test]
    fn secrets_and_entitlements() {
        assert_eq!(
            parse_secret("id=a,src=/f").unwrap(),
            ("a".into(), SecretSource::File("/f".into()))
        );
        assert_eq!(
            parse_secret("id=TOKEN").unwrap(),
            ("TOKEN".into(), SecretSource::Env("TOKEN".into()))
        );
        assert!(parse_secret("src=/f").is_err());
        let e = parse_entitlements(&["network.host,security.insecure".into()]).unwrap();
        assert!(e.network_host && e.security_insecure);
        assert!(parse_entitlements(&["root".into()]).is_err());
    }
}
