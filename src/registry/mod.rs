//! The registry client (OCI distribution spec): references, credentials, an HTTP transport
//! with token auth and retries, and pull and push between registries and the store.

pub mod auth;
pub mod client;
pub mod lazy;
pub mod origins;
pub mod pull;
pub mod push;
pub mod redirect;
pub mod reference;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

pub use client::{Client, Direction, Transfer};
pub use reference::Reference;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] reference::BadReference),
    #[error("cannot resolve the registry host {host}: {detail}")]
    UnknownHost { host: String, detail: String },
    #[error("connection to the registry {host} was refused (is a registry listening there?)")]
    Refused { host: String },
    #[error("{host}: {detail} (gave up after {attempts} attempts)")]
    Transport {
        host: String,
        detail: String,
        attempts: u32,
    },
    #[error("TLS with {host} failed: {detail}; trust its CA by putting it in {certs_hint}, or list the host under \"insecure-registries\"")]
    Tls {
        host: String,
        detail: String,
        certs_hint: String,
    },
    #[error("{host}: 401 Unauthorized{realm}: {why}")]
    Unauthorized {
        host: String,
        realm: String,
        why: String,
    },
    #[error("{host}: 403 Forbidden: {what}")]
    Forbidden { host: String, what: String },
    #[error("{what} not found: {detail}")]
    NotFound { what: String, detail: String },
    #[error("{what}: content has digest {got}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: String,
        got: String,
    },
    #[error("{host}: {method} {path} answered {status}: {body}")]
    Status {
        host: String,
        method: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Config(String),
    #[error("{program} {action} failed: {message}")]
    Helper {
        program: String,
        action: String,
        message: String,
    },
    #[error(transparent)]
    Blob(#[from] crate::oci::blobs::BlobError),
    #[error(transparent)]
    Image(#[from] crate::oci::image::ImageError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl RegistryError {
    /// What the user can do about it, when something can be said.
    pub fn hint(&self) -> Option<String> {
        match self {
            RegistryError::Unauthorized { host, .. }
            | RegistryError::Status {
                host, status: 401, ..
            } => Some(format!(
                "the registry wants credentials: builder login {}",
                host
            )),
            RegistryError::Forbidden { host, .. }
            | RegistryError::Status {
                host, status: 403, ..
            } => Some(format!(
                "the credentials for {} may lack access to this repository: builder login {}",
                host, host
            )),
            _ => None,
        }
    }
}

/// The local side of a pull or push: the blob store, and the directory under which the
/// registries each blob came from are remembered (for cross-repository mounts). The store
/// module is what joins a named store to the registry.
pub struct Local<'a> {
    pub blobs: &'a crate::oci::blobs::BlobStore,
    /// Where blobs' registry origins are recorded.
    pub origins: origins::OriginDirs,
}

/// Run `work` on every item with up to `workers` threads; stops taking new items after the
/// first failure, which is returned.
pub fn for_each_parallel<T: Sync>(
    items: &[T],
    workers: usize,
    work: impl Fn(&T) -> Result<(), RegistryError> + Sync,
) -> Result<(), RegistryError> {
    let queue = std::sync::Mutex::new(items.iter());
    let failure: std::sync::Mutex<Option<RegistryError>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.min(items.len()) {
            s.spawn(|| loop {
                if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let Some(item) = queue.lock().ok().and_then(|mut q| q.next()) else {
                    return;
                };
                if let Err(e) = work(item) {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                    return;
                }
            });
        }
    });
    match failure.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Registry settings: `$BUILDER_REGISTRIES_CONFIG`, else `registries.json` in builder's config
/// directory. Keys follow docker's daemon.json: `"insecure-registries": ["host:port"]` (plain
/// HTTP and unverified TLS allowed), `"registry-mirrors": ["https://mirror"]` (for docker.io),
/// and `"mirrors": {"quay.io": ["https://mirror"]}` for any other registry.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub insecure: Vec<String>,
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Attempts per request before a transient failure is reported.
    pub attempts: u32,
    /// Seconds without progress before a connection counts as stalled.
    pub timeout_secs: u64,
}

impl Settings {
    pub fn path() -> PathBuf {
        std::env::var_os("BUILDER_REGISTRIES_CONFIG")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| auth::config_dir().join("registries.json"))
    }

    /// Load the settings file (absent means defaults). `BUILDER_REGISTRY_ATTEMPTS` and
    /// `BUILDER_REGISTRY_TIMEOUT` tune the retry budget.
    pub fn load() -> Result<Settings, RegistryError> {
        let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        let mut s = Settings {
            attempts: env_num("BUILDER_REGISTRY_ATTEMPTS").unwrap_or(5).max(1) as u32,
            timeout_secs: env_num("BUILDER_REGISTRY_TIMEOUT").unwrap_or(60).max(1),
            ..Settings::default()
        };
        let path = Settings::path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(s),
            Err(e) => return Err(RegistryError::Config(format!("{}: {}", path.display(), e))),
        };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            RegistryError::Config(format!("{}: not valid JSON: {}", path.display(), e))
        })?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        s.insecure = strings(&v["insecure-registries"]);
        let hub = strings(&v["registry-mirrors"]);
        if !hub.is_empty() {
            s.mirrors.insert(reference::DOCKER_HUB.into(), hub);
        }
        if let Some(m) = v["mirrors"].as_object() {
            for (registry, list) in m {
                s.mirrors
                    .entry(registry.clone())
                    .or_default()
                    .extend(strings(list));
            }
        }
        Ok(s)
    }

    pub fn is_insecure(&self, registry: &str) -> bool {
        self.insecure.iter().any(|h| {
            h.trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
                == registry
        })
    }
}

/// Where `builder pull`/FROM looks for a named image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PullPolicy {
    /// Pull only when the store does not have the image.
    #[default]
    Missing,
    /// Ask the registry every time (blobs the store has are not downloaded again).
    Always,
    /// Use the store only.
    Never,
}
