//! Credentials, where docker and podman keep them: the auth file (`$REGISTRY_AUTH_FILE`, else
//! `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`) with base64 `auths`, and the
//! `docker-credential-<helper>` programs named by `credHelpers` (per registry) or `credsStore`.
//! Also the `WWW-Authenticate` challenge grammar (RFC 7235), which is pure.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde_json::{json, Value};

use super::reference::{DOCKER_HUB, DOCKER_HUB_AUTH_KEY};
use super::RegistryError;
use crate::oci::blobs::write_atomic;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub secret: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, ***)", self.username)
    }
}

impl Credential {
    /// docker's convention: user `<token>` means the secret is an OAuth2 refresh token.
    pub fn is_identity_token(&self) -> bool {
        self.username == "<token>"
    }

    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.secret);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// builder's own configuration directory: `$XDG_CONFIG_HOME/builder` or `~/.config/builder`.
pub fn config_dir() -> PathBuf {
    match std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        Some(x) => PathBuf::from(x).join("builder"),
        None => home().join(".config/builder"),
    }
}

/// The auth file builder reads and `builder login` writes.
pub fn auth_file() -> PathBuf {
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|f| !f.is_empty()) {
        return PathBuf::from(f);
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("config.json");
    }
    home().join(".docker/config.json")
}

/// The registry an `auths` key names: keys may carry a scheme and a path
/// (`https://index.docker.io/v1/`).
fn key_registry(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        h => h.to_string(),
    }
}

/// What helpers and `auths` call a registry.
fn server_url(registry: &str) -> String {
    if registry == DOCKER_HUB {
        DOCKER_HUB_AUTH_KEY.to_string()
    } else {
        registry.to_string()
    }
}

fn read_auth_file(path: &Path) -> Result<Value, RegistryError> {
    match std::fs::read(path) {
        Ok(b) if b.iter().all(|c| c.is_ascii_whitespace()) => Ok(json!({})),
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            RegistryError::Config(format!("{}: not valid JSON: {}", path.display(), e))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(json!({})),
        Err(e) => Err(RegistryError::Config(format!("{}: {}", path.display(), e))),
    }
}

/// The helper that holds `registry`'s credentials, if one is configured.
fn helper_for(config: &Value, registry: &str) -> Option<String> {
    if let Some(helpers) = config["credHelpers"].as_object() {
        for (k, v) in helpers {
            if key_registry(k) == registry {
                return v.as_str().map(str::to_string);
            }
        }
    }
    config["credsStore"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn run_helper(helper: &str, action: &str, input: &[u8]) -> Result<Vec<u8>, RegistryError> {
    let program = format!("docker-credential-{}", helper);
    let mut child = Command::new(&program)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RegistryError::Config(format!("cannot run {}: {}", program, e)))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| RegistryError::Config(format!("{} {}: {}", program, action, e)))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string()
            + String::from_utf8_lossy(&out.stderr).trim();
        return Err(RegistryError::Helper {
            program,
            action: action.to_string(),
            message: msg,
        });
    }
    Ok(out.stdout)
}

/// The credentials configured for `registry`, if any.
pub fn lookup(registry: &str) -> Result<Option<Credential>, RegistryError> {
    let path = auth_file();
    let config = read_auth_file(&path)?;
    if let Some(helper) = helper_for(&config, registry) {
        return match run_helper(&helper, "get", server_url(registry).as_bytes()) {
            Ok(out) => {
                let v: Value = serde_json::from_slice(&out).map_err(|e| {
                    RegistryError::Config(format!(
                        "docker-credential-{} get: not JSON: {}",
                        helper, e
                    ))
                })?;
                let username = v["Username"].as_str().unwrap_or("").to_string();
                let secret = v["Secret"].as_str().unwrap_or("").to_string();
                Ok((!secret.is_empty()).then_some(Credential { username, secret }))
            }
            // The protocol's "not found" is a failing `get`; anonymous access may still work.
            Err(RegistryError::Helper { message, .. })
                if message.to_lowercase().contains("not found") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        };
    }
    let Some(auths) = config["auths"].as_object() else {
        return Ok(None);
    };
    for (k, entry) in auths {
        if key_registry(k) != registry {
            continue;
        }
        if let Some(token) = entry["identitytoken"].as_str().filter(|t| !t.is_empty()) {
            return Ok(Some(Credential {
                username: "<token>".into(),
                secret: token.to_string(),
            }));
        }
        if let Some(encoded) = entry["auth"].as_str().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| {
                    RegistryError::Config(format!(
                        "{}: auths[{:?}].auth is not base64: {}",
                        path.display(),
                        k,
                        e
                    ))
                })?;
            let text = String::from_utf8_lossy(&raw);
            let (username, secret) = text.split_once(':').ok_or_else(|| {
                RegistryError::Config(format!(
                    "{}: auths[{:?}].auth is not user:password",
                    path.display(),
                    k
                ))
            })?;
            return Ok(Some(Credential {
                username: username.to_string(),
                secret: secret.to_string(),
            }));
        }
        if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
            return Ok(Some(Credential {
                username: u.into(),
                secret: p.into(),
            }));
        }
    }
    Ok(None)
}

/// Remember `cred` for `registry`: in its helper when one is configured, else in the auth file
/// (mode 0600, replaced atomically). Returns where it went.
pub fn store(registry: &str, cred: &Credential) -> Result<String, RegistryError> {
    let path = auth_file();
    let mut config = read_auth_file(&path)?;
    if let Some(helper) = helper_for(&config, registry) {
        let input = json!({"ServerURL": server_url(registry), "Username": cred.username, "Secret": cred.secret});
        run_helper(&helper, "store", input.to_string().as_bytes())?;
        return Ok(format!("docker-credential-{}", helper));
    }
    if !config.is_object() {
        config = json!({});
    }
    if !config["auths"].is_object() {
        config["auths"] = json!({});
    }
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", cred.username, cred.secret));
    if let Some(auths) = config["auths"].as_object_mut() {
        auths.retain(|k, _| key_registry(k) != registry);
        auths.insert(server_url(registry), json!({ "auth": encoded }));
    }
    write_private(&path, &config)?;
    Ok(path.display().to_string())
}

/// Forget `registry`'s credentials; false when there were none.
pub fn erase(registry: &str) -> Result<bool, RegistryError> {
    let path = auth_file();
    let mut config = read_auth_file(&path)?;
    if let Some(helper) = helper_for(&config, registry) {
        return match run_helper(&helper, "erase", server_url(registry).as_bytes()) {
            Ok(_) => Ok(true),
            Err(RegistryError::Helper { message, .. })
                if message.to_lowercase().contains("not found") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        };
    }
    let Some(auths) = config["auths"].as_object_mut() else {
        return Ok(false);
    };
    let before = auths.len();
    auths.retain(|k, _| key_registry(k) != registry);
    if auths.len() == before {
        return Ok(false);
    }
    write_private(&path, &config)?;
    Ok(true)
}

fn write_private(path: &Path, config: &Value) -> Result<(), RegistryError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| RegistryError::Config(format!("{}: {}", path.display(), e));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let bytes = serde_json::to_vec_pretty(config).unwrap_or_default();
    write_atomic(path, &bytes).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
}

/// A parsed `WWW-Authenticate` challenge: `Bearer realm="…",service="…",scope="…"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased: `basic` or `bearer`.
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = match header.split_once(char::is_whitespace) {
            Some((s, r)) => (s, r),
            None => (header, ""),
        };
        if scheme.is_empty() {
            return None;
        }
        let mut params = BTreeMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            while matches!(chars.peek(), Some(c) if c.is_whitespace() || *c == ',') {
                chars.next();
            }
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if c == '=' || c == ',' || c.is_whitespace() {
                    break;
                }
                name.push(c);
                chars.next();
            }
            if name.is_empty() {
                break;
            }
            while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
                chars.next();
            }
            if chars.peek() != Some(&'=') {
                break;
            }
            chars.next();
            while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
                chars.next();
            }
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                value = value.trim().to_string();
            }
            params.insert(name.to_lowercase(), value);
        }
        Some(Challenge {
            scheme: scheme.to_lowercase(),
            params,
        })
    }

    pub fn realm(&self) -> &str {
        self.params.get("realm").map(String::as_str).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.realm(), "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull,push");
        let c = Challenge::parse(r#"Basic realm="a \"quoted\" realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.realm(), r#"a "quoted" realm"#);
        let c = Challenge::parse("Basic realm=plain, charset=UTF-8").unwrap();
        assert_eq!(c.realm(), "plain");
        assert_eq!(c.params["charset"], "UTF-8");
    }

    #[test]
    fn auth_keys_name_registries() {
        assert_eq!(key_registry("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(key_registry("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(key_registry("http://localhost:5000/v2/"), "localhost:5000");
    }

    #[test]
    fn basic_header_is_base64() {
        let c = Credential {
            username: "user".into(),
            secret: "pass".into(),
        };
        assert_eq!(c.basic_header(), "Basic dXNlcjpwYXNz");
    }
}
