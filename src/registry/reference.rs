//! Image references, parsed the way docker parses them (distribution/reference's grammar):
//! `alpine` is `docker.io/library/alpine:latest`, the first path component is a registry only
//! when it holds a `.` or `:` or is `localhost`, and `@sha256:…` pins a digest. Pure: no I/O.

use std::fmt;

use crate::oci::digest::Digest;

pub const DOCKER_HUB: &str = "docker.io";
/// Where docker.io's API actually lives.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The key docker's config.json uses for Docker Hub credentials.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// A fully qualified reference: registry, repository, and a tag and/or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `docker.io`, `quay.io`, `127.0.0.1:5000`, `localhost`.
    pub registry: String,
    /// `library/alpine`, `team/app`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct BadReference {
    pub input: String,
    pub reason: String,
}

fn is_alnum_lower(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let dashes = sep.bytes().all(|x| x == b'-');
        if !(sep == "." || sep == "_" || sep == "__" || dashes) {
            return false;
        }
    }
    true
}

/// A registry host: DNS labels (letters, digits, `-`) joined by `.`, or a bracketed IPv6
/// address, with an optional `:port`.
fn valid_registry(d: &str) -> bool {
    let (host, port) = if let Some(bracketed) = d.strip_prefix('[') {
        let Some(end) = bracketed.find(']') else {
            return false;
        };
        let ip = &bracketed[..end];
        if ip.is_empty() || !ip.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return false;
        }
        ("ipv6", &bracketed[end + 1..])
    } else {
        match d.find(':') {
            Some(i) => (&d[..i], &d[i..]),
            None => (d, ""),
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()));
    port_ok
        && !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

impl Reference {
    pub fn parse(input: &str) -> Result<Reference, BadReference> {
        let bad = |reason: &str| BadReference {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(bad("it is empty"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                let digest: Digest = d
                    .parse()
                    .map_err(|_| bad("the digest is not sha256: followed by 64 hex digits"))?;
                (r, Some(digest))
            }
            None => (input, None),
        };
        // A tag follows the last ':' after the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                if !valid_tag(t) {
                    return Err(bad(
                        "a tag is letters, digits, '_', '.' and '-' (at most 128, not starting with '.' or '-')",
                    ));
                }
                (&rest[..last_slash + i], Some(t.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(bad("the repository name is empty"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.bytes().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), remainder.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        if !valid_registry(&registry) {
            return Err(bad(
                "the registry part is not a host name with an optional :port",
            ));
        }
        if path.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(bad("repository names must be lowercase"));
        }
        if !path.split('/').all(valid_component) {
            return Err(bad(
                "repository path components are lowercase letters and digits, joined by '.', '_', '__' or '-'",
            ));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{}", path)
        } else {
            path
        };
        if registry.len() + 1 + repository.len() > 255 {
            return Err(bad("the name is longer than 255 characters"));
        }
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The same reference with `:latest` when it names neither a tag nor a digest.
    pub fn with_default_tag(mut self) -> Reference {
        if self.tag.is_none() && self.digest.is_none() {
            self.tag = Some("latest".into());
        }
        self
    }

    /// The name without tag or digest, in docker's short form (`alpine`, `quay.io/x/y`).
    pub fn familiar_name(&self) -> String {
        if self.registry == DOCKER_HUB {
            match self.repository.strip_prefix("library/") {
                Some(short) if !short.contains('/') => short.to_string(),
                _ => self.repository.clone(),
            }
        } else {
            format!("{}/{}", self.registry, self.repository)
        }
    }

    /// Docker's short form of the whole reference: `alpine:3`, `quay.io/x/y@sha256:…`.
    pub fn familiar(&self) -> String {
        let mut s = self.familiar_name();
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(&d.to_string());
        }
        s
    }

    /// What the manifest endpoint is asked for: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// The host that serves the registry API.
    pub fn api_host(&self) -> &str {
        registry_api_host(&self.registry)
    }

    /// The repository on the same registry (`name` is a path, or a full reference).
    pub fn in_repository(&self, repository: &str) -> Reference {
        Reference {
            registry: self.registry.clone(),
            repository: repository.to_string(),
            tag: None,
            digest: None,
        }
    }
}

/// `docker.io` is served by `registry-1.docker.io`; every other registry by itself.
pub fn registry_api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API
    } else {
        registry
    }
}

/// Whether the host is this machine (plain HTTP is always allowed there).
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(r) => r.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{}", t)?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{}", d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    const D: &str = "sha256:6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b";

    #[test]
    fn docker_hub_names() {
        let r = p("alpine").with_default_tag();
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(r.familiar(), "alpine:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(p("user/app:1").to_string(), "docker.io/user/app:1");
        assert_eq!(p("docker.io/library/alpine:3").familiar(), "alpine:3");
        assert_eq!(p("index.docker.io/library/alpine").familiar(), "alpine");
        assert_eq!(p("docker.io/user/app").familiar(), "user/app");
    }

    #[test]
    fn hosts_ports_tags_digests() {
        let r = p("127.0.0.1:5000/base");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("127.0.0.1:5000", "base")
        );
        assert_eq!(r.tag, None);
        assert_eq!(
            r.clone().with_default_tag().familiar(),
            "127.0.0.1:5000/base:latest"
        );
        let r = p("localhost/a/b:v1.2");
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        let r = p(&format!("quay.io/x/y:1@{}", D));
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(
            r.digest.as_ref().map(|d| d.to_string()),
            Some(D.to_string())
        );
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(
            p(&format!("alpine@{}", D)).familiar(),
            format!("alpine@{}", D)
        );
        assert_eq!(p("[::1]:5000/x").registry, "[::1]:5000");
        assert_eq!(p("Registry/x").registry, "Registry");
    }

    #[test]
    fn rejects_what_docker_rejects() {
        for bad in [
            "",
            "Alpine",
            "alpine:",
            "alpine:-x",
            "a//b",
            "a/-b",
            "a__-b",
            "alpine@sha256:abc",
            "host:port/x",
            ":tag",
            "a b",
        ] {
            assert!(
                Reference::parse(bad).is_err(),
                "{:?} should be rejected",
                bad
            );
        }
        assert!(Reference::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("127.0.0.1:4000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("example.com"));
    }
}
