//! HTTP to registries: endpoint discovery (HTTPS, or plain HTTP where allowed), TLS trust (the
//! system roots plus per-registry `certs.d` directories), Basic and Bearer auth driven by the
//! registry's `WWW-Authenticate` challenge with tokens cached per scope set, and bounded retries
//! with exponential backoff for transient failures (resets, stalls, 5xx, 429).

// ureq's own `Error` is large; the closures here return it as ureq does.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;

use super::auth::{self, Challenge, Credential};
use super::reference::{is_loopback, registry_api_host};
use super::{RegistryError, Settings};

/// A request body that can be sent again on retry.
#[derive(Clone, Copy)]
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// `len` bytes of a file from `offset`.
    File {
        path: &'a Path,
        offset: u64,
        len: u64,
    },
}

/// One registry host as discovered: base URL, TLS agent, auth challenge, credentials.
pub struct Endpoint {
    /// The registry's name (`docker.io`, `127.0.0.1:5000`): credentials and messages use it.
    pub registry: String,
    /// `https://registry-1.docker.io`, `http://127.0.0.1:5000`.
    pub base: String,
    agent: ureq::Agent,
    challenge: Mutex<Option<Challenge>>,
    credential: Option<Credential>,
}

impl Endpoint {
    /// A 401: `realm` is the challenge's, `who` says who refused.
    fn unauthorized(&self, realm: Option<&str>, who: &str) -> RegistryError {
        RegistryError::Unauthorized {
            host: self.registry.clone(),
            realm: realm
                .map(|r| format!(" (realm {:?})", r))
                .unwrap_or_default(),
            why: if self.credential.is_some() {
                format!(
                    "{} rejected the credentials stored for {}",
                    who, self.registry
                )
            } else {
                format!(
                    "no credentials for {}; run `builder login {}`",
                    self.registry, self.registry
                )
            },
        }
    }

    /// An error for an unexpected status (`what` names the thing asked for).
    pub fn status_error(
        &self,
        method: &str,
        target: &str,
        what: &str,
        response: ureq::Response,
    ) -> RegistryError {
        let status = response.status();
        let challenge = response
            .header("www-authenticate")
            .and_then(Challenge::parse);
        let body = response.into_string().unwrap_or_default();
        let body = body.trim().chars().take(400).collect::<String>();
        match status {
            401 => self.unauthorized(challenge.as_ref().map(Challenge::realm), "the registry"),
            403 => RegistryError::Forbidden {
                host: self.registry.clone(),
                what: format!("{} ({})", what, body),
            },
            404 => RegistryError::NotFound {
                what: what.to_string(),
                detail: format!("{} answered 404 {}", self.registry, body),
            },
            _ => RegistryError::Status {
                host: self.registry.clone(),
                method: method.to_string(),
                path: target.to_string(),
                status,
                body,
            },
        }
    }
}

/// The registry client. Cheap to share between threads.
pub struct Client {
    pub settings: Settings,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    /// Bearer tokens by "registry scope scope…".
    tokens: Mutex<HashMap<String, String>>,
    /// Where retries and resumptions are told.
    notice: Box<dyn Fn(&str) + Send + Sync>,
    /// The layer blobs this client downloaded, and their bytes.
    layers_downloaded: AtomicU64,
    layer_bytes_downloaded: AtomicU64,
    /// The blob bytes this client uploaded.
    bytes_uploaded: AtomicU64,
    /// Where blob transfers report their bytes as they go.
    on_transfer: Box<dyn Fn(&Transfer) + Send + Sync>,
}

/// A blob transfer's progress: `done` of `total` bytes of blob `digest`.
#[derive(Debug, Clone, Copy)]
pub struct Transfer<'a> {
    pub direction: Direction,
    pub digest: &'a crate::oci::digest::Digest,
    pub done: u64,
    pub total: u64,
}

/// Which way a blob goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Pull,
    Push,
}

/// Whether a descriptor's media type is a layer's (OCI or docker), not a config's or a
/// manifest's.
pub fn is_layer_media_type(media_type: &str) -> bool {
    media_type.contains(".layer.") || media_type.contains(".rootfs.diff.")
}

/// A `repository:NAME:ACTIONS` token scope.
pub fn scope(repository: &str, actions: &str) -> String {
    format!("repository:{}:{}", repository, actions)
}

static NATIVE_ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();

fn native_roots() -> &'static [CertificateDer<'static>] {
    NATIVE_ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// The per-registry certificate directories, most specific first.
pub fn cert_dirs(registry: &str) -> Vec<PathBuf> {
    vec![
        auth::config_dir().join("certs.d").join(registry),
        PathBuf::from("/etc/containers/certs.d").join(registry),
        PathBuf::from("/etc/docker/certs.d").join(registry),
    ]
}

/// Accepts any certificate: only for registries the user listed as insecure.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// TLS settings for `registry`: system roots plus `*.crt` from its certs.d directories, a
/// client certificate from `*.cert` + `*.key` there, or no verification when insecure.
fn tls_config(registry: &str, verify: bool) -> Result<Arc<rustls::ClientConfig>, RegistryError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Config(format!("TLS setup: {}", e)))?;
    let builder = if verify {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(native_roots().iter().cloned());
        for dir in cert_dirs(registry) {
            for crt in files_with_suffix(&dir, ".crt") {
                let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(&crt)
                    .and_then(|it| it.collect::<Result<_, _>>())
                    .map_err(|e| RegistryError::Config(format!("{}: {}", crt.display(), e)))?;
                roots.add_parsable_certificates(certs);
            }
        }
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    };
    for dir in cert_dirs(registry) {
        for cert in files_with_suffix(&dir, ".cert") {
            let key = cert.with_extension("key");
            if !key.is_file() {
                continue;
            }
            let bad = |e: &dyn std::fmt::Display, p: &Path| {
                RegistryError::Config(format!("{}: {}", p.display(), e))
            };
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| bad(&e, &cert))?;
            let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|e| bad(&e, &key))?;
            return builder
                .with_client_auth_cert(chain, key_der)
                .map(Arc::new)
                .map_err(|e| bad(&e, &cert));
        }
    }
    Ok(Arc::new(builder.with_no_client_auth()))
}

/// A TLS failure that another attempt cannot fix: an untrusted certificate, or a peer that
/// does not speak TLS. (A connection cut during the handshake is transient.)
fn is_tls_failure(detail: &str) -> bool {
    let d = detail.to_lowercase();
    d.contains("certificate") || d.contains("corrupt message") || d.contains("alert")
}

/// What went wrong below HTTP, and whether another attempt may help.
enum Failure {
    Final(RegistryError),
    Refused,
    Transient(String),
}

fn classify(host: &str, e: &ureq::Transport) -> Failure {
    let detail = e.to_string();
    match e.kind() {
        ureq::ErrorKind::Dns => Failure::Final(RegistryError::UnknownHost {
            host: host.to_string(),
            detail,
        }),
        ureq::ErrorKind::ConnectionFailed if detail.to_lowercase().contains("refused") => {
            Failure::Refused
        }
        _ if is_tls_failure(&detail) => Failure::Final(RegistryError::Tls {
            host: host.to_string(),
            detail,
            certs_hint: format!(
                "{}/",
                cert_dirs(host)
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        }),
        _ => Failure::Transient(detail),
    }
}

/// Tokens are cached per registry and set of scopes.
fn token_key(ep: &Endpoint, scopes: &[String]) -> String {
    format!("{} {}", ep.registry, scopes.join(" "))
}

/// Delay before attempt `n` (1-based): 0.25 s, 0.5 s, 1 s, 2 s, then 4 s.
pub(crate) fn backoff(n: u32) -> Duration {
    Duration::from_millis(250u64 << n.saturating_sub(1).min(4))
}

impl Client {
    pub fn new(settings: Settings) -> Client {
        Client {
            settings,
            endpoints: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            notice: Box::new(|_| {}),
            on_transfer: Box::new(|_| {}),
            bytes_uploaded: AtomicU64::new(0),
            layers_downloaded: AtomicU64::new(0),
            layer_bytes_downloaded: AtomicU64::new(0),
        }
    }

    /// Count a layer blob downloaded whole.
    pub fn count_layer_download(&self, bytes: u64) {
        self.layers_downloaded.fetch_add(1, Ordering::Relaxed);
        self.layer_bytes_downloaded
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// How many layer blobs this client downloaded, and their bytes.
    pub fn layer_downloads(&self) -> (u64, u64) {
        (
            self.layers_downloaded.load(Ordering::Relaxed),
            self.layer_bytes_downloaded.load(Ordering::Relaxed),
        )
    }

    /// Report retries and resumed downloads through `notice`.
    pub fn with_notices(mut self, notice: impl Fn(&str) + Send + Sync + 'static) -> Client {
        self.notice = Box::new(notice);
        self
    }

    pub fn notice(&self, msg: &str) {
        (self.notice)(msg)
    }

    /// Report blob transfers' bytes to `on_transfer` as they go.
    pub fn with_transfers(
        mut self,
        on_transfer: impl Fn(&Transfer) + Send + Sync + 'static,
    ) -> Client {
        self.on_transfer = Box::new(on_transfer);
        self
    }

    pub fn transfer(&self, t: &Transfer) {
        if t.direction == Direction::Push && t.done == t.total {
            self.bytes_uploaded.fetch_add(t.total, Ordering::Relaxed);
        }
        (self.on_transfer)(t)
    }

    /// The blob bytes this client uploaded.
    pub fn uploads(&self) -> u64 {
        self.bytes_uploaded.load(Ordering::Relaxed)
    }

    /// A client with the user's settings file; retries and resumes go to `with_notices`.
    pub fn from_config() -> Result<Client, RegistryError> {
        Ok(Client::new(Settings::load()?))
    }

    fn agent(&self, registry: &str, verify: bool) -> Result<ureq::Agent, RegistryError> {
        let t = Duration::from_secs(self.settings.timeout_secs);
        Ok(ureq::AgentBuilder::new()
            .tls_config(tls_config(registry, verify)?)
            .timeout_connect(Duration::from_secs(10).min(t))
            .timeout_read(t)
            .timeout_write(t)
            // Redirects are followed by super::redirect's policy, never the library's.
            .redirects(0)
            .user_agent(concat!("builder/", env!("CARGO_PKG_VERSION")))
            .build())
    }

    /// Run `call` until it gives an HTTP response, retrying transient failures.
    fn with_retries(
        &self,
        host: &str,
        call: impl FnMut() -> Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, RegistryError> {
        self.with_attempts(host, self.settings.attempts, call)
    }

    fn with_attempts(
        &self,
        host: &str,
        attempts: u32,
        mut call: impl FnMut() -> Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, RegistryError> {
        let mut last = String::new();
        let mut refused = false;
        for n in 1..=attempts {
            if n > 1 {
                self.notice(&format!(
                    "{}: {}; retrying (attempt {} of {})",
                    host, last, n, attempts
                ));
                std::thread::sleep(backoff(n - 1));
            }
            match call() {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(code, r)) => {
                    if (code >= 500 || code == 429) && n < attempts {
                        last = format!("HTTP {}", code);
                        continue;
                    }
                    return Ok(r);
                }
                Err(ureq::Error::Transport(t)) => {
                    let failure = classify(host, &t);
                    refused = matches!(failure, Failure::Refused);
                    match failure {
                        Failure::Final(e) => return Err(e),
                        Failure::Refused => last = "connection refused".into(),
                        Failure::Transient(d) => last = d,
                    }
                }
            }
        }
        if refused {
            return Err(RegistryError::Refused {
                host: host.to_string(),
            });
        }
        Err(RegistryError::Transport {
            host: host.to_string(),
            detail: last,
            attempts,
        })
    }

    /// The endpoint serving `registry`, discovered (and its `/v2/` pinged) on first use.
    pub fn endpoint(&self, registry: &str) -> Result<Arc<Endpoint>, RegistryError> {
        if let Some(e) = self
            .endpoints
            .lock()
            .ok()
            .and_then(|m| m.get(registry).cloned())
        {
            return Ok(e);
        }
        let endpoint = Arc::new(self.discover(registry, None)?);
        if let Ok(mut m) = self.endpoints.lock() {
            m.insert(registry.to_string(), endpoint.clone());
        }
        Ok(endpoint)
    }

    /// Check that `credential` opens `registry` (what `builder login` does before saving it).
    pub fn check_login(&self, registry: &str, credential: Credential) -> Result<(), RegistryError> {
        let ep = self.discover(registry, Some(credential))?;
        let response = self.send(&ep, "GET", "/v2/", &[], Body::Empty, &[])?;
        match response.status() {
            200 => Ok(()),
            _ => Err(ep.status_error("GET", "/v2/", "the registry's API root", response)),
        }
    }

    fn discover(
        &self,
        registry: &str,
        credential: Option<Credential>,
    ) -> Result<Endpoint, RegistryError> {
        let (registry, forced_scheme) = match registry.split_once("://") {
            Some((scheme, rest)) => (rest.trim_end_matches('/'), Some(scheme)),
            None => (registry, None),
        };
        let host = registry_api_host(registry);
        let insecure = self.settings.is_insecure(registry);
        let http_allowed = insecure || is_loopback(registry) || forced_scheme == Some("http");
        let agent = self.agent(registry, !insecure)?;
        let ping = |base: &str, attempts: u32| {
            let url = format!("{}/v2/", base);
            self.with_attempts(host, attempts, || agent.get(&url).call())
        };
        let all = self.settings.attempts;
        let https = format!("https://{}", host);
        let http = format!("http://{}", host);
        let (base, response) = if forced_scheme == Some("http") {
            (http.clone(), ping(&http, all)?)
        } else if http_allowed {
            // HTTPS first, once; then plain HTTP, which only counts when the host answers
            // like a registry there; then HTTPS again with the whole retry budget.
            match ping(&https, 1) {
                Ok(r) => (https, r),
                Err(e @ RegistryError::UnknownHost { .. }) => return Err(e),
                Err(_) => match ping(&http, all) {
                    Ok(r) if r.status() == 200 || r.status() == 401 => (http, r),
                    _ => (https.clone(), ping(&https, all)?),
                },
            }
        } else {
            (https.clone(), ping(&https, all)?)
        };
        if response.status() != 200 && response.status() != 401 {
            return Err(RegistryError::Protocol(format!(
                "{} does not look like a registry: GET /v2/ answered {}",
                host,
                response.status()
            )));
        }
        let challenge = response
            .header("www-authenticate")
            .and_then(Challenge::parse);
        let credential = match credential {
            Some(c) => Some(c),
            None => auth::lookup(registry)?,
        };
        Ok(Endpoint {
            registry: registry.to_string(),
            base,
            agent,
            challenge: Mutex::new(challenge),
            credential,
        })
    }

    /// The Authorization header for a request needing `scopes`, per the endpoint's challenge.
    fn authorization(
        &self,
        ep: &Endpoint,
        scopes: &[String],
    ) -> Result<Option<String>, RegistryError> {
        let challenge = ep.challenge.lock().ok().and_then(|c| c.clone());
        match challenge {
            None => Ok(None),
            Some(c) if c.scheme == "basic" => {
                Ok(ep.credential.as_ref().map(Credential::basic_header))
            }
            Some(c) if c.scheme == "bearer" => {
                let key = token_key(ep, scopes);
                if let Some(t) = self.tokens.lock().ok().and_then(|t| t.get(&key).cloned()) {
                    return Ok(Some(format!("Bearer {}", t)));
                }
                let token = self.fetch_token(ep, &c, scopes)?;
                if let Ok(mut t) = self.tokens.lock() {
                    t.insert(key, token.clone());
                }
                Ok(Some(format!("Bearer {}", token)))
            }
            Some(_) => Ok(None),
        }
    }

    /// The token flow: ask the challenge's realm for a token covering `scopes`.
    fn fetch_token(
        &self,
        ep: &Endpoint,
        c: &Challenge,
        scopes: &[String],
    ) -> Result<String, RegistryError> {
        let realm = c.realm();
        if !(realm.starts_with("https://") || realm.starts_with("http://")) {
            return Err(RegistryError::Protocol(format!(
                "{}: the Bearer challenge's realm {:?} is not a URL",
                ep.registry, realm
            )));
        }
        let service = c.params.get("service").cloned().unwrap_or_default();
        let response = match &ep.credential {
            Some(cred) if cred.is_identity_token() => {
                let mut form: Vec<(&str, &str)> = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &cred.secret),
                    ("service", &service),
                    ("client_id", "builder"),
                ];
                let joined = scopes.join(" ");
                if !scopes.is_empty() {
                    form.push(("scope", &joined));
                }
                self.with_retries(&ep.registry, || ep.agent.post(realm).send_form(&form))?
            }
            cred => self.with_retries(&ep.registry, || {
                let mut req = ep.agent.get(realm);
                if !service.is_empty() {
                    req = req.query("service", &service);
                }
                for s in scopes {
                    req = req.query("scope", s);
                }
                if let Some(cred) = cred {
                    req = req.set("Authorization", &cred.basic_header());
                }
                req.call()
            })?,
        };
        match response.status() {
            200 => {}
            401 | 403 => return Err(ep.unauthorized(Some(realm), "the token service")),
            s => {
                return Err(RegistryError::Protocol(format!(
                    "{}: token service {} answered {}",
                    ep.registry, realm, s
                )))
            }
        }
        let v: Value = serde_json::from_reader(response.into_reader().take(1 << 20))
            .map_err(|e| RegistryError::Protocol(format!("{}: token reply: {}", realm, e)))?;
        v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                RegistryError::Protocol(format!("{}: token reply holds no token", realm))
            })
    }

    /// Send a request to `ep` (`target` is a path under the base URL, or a full URL a
    /// registry gave, such as an upload location). Transient failures are retried; a 401 with
    /// a fresh challenge is answered once. Any HTTP status comes back as a response.
    pub fn send(
        &self,
        ep: &Endpoint,
        method: &str,
        target: &str,
        headers: &[(&str, String)],
        body: Body,
        scopes: &[String],
    ) -> Result<ureq::Response, RegistryError> {
        let attempts = self.settings.attempts;
        self.send_attempts(ep, method, target, headers, body, scopes, attempts)
    }

    /// [`Client::send`] without retrying a failed connection: for requests that move an
    /// upload session, which a blind resend would only find stale.
    pub fn send_once(
        &self,
        ep: &Endpoint,
        method: &str,
        target: &str,
        headers: &[(&str, String)],
        body: Body,
        scopes: &[String],
    ) -> Result<ureq::Response, RegistryError> {
        self.send_attempts(ep, method, target, headers, body, scopes, 1)
    }

    #[allow(clippy::too_many_arguments)]
    fn send_attempts(
        &self,
        ep: &Endpoint,
        method: &str,
        target: &str,
        headers: &[(&str, String)],
        body: Body,
        scopes: &[String],
        attempts: u32,
    ) -> Result<ureq::Response, RegistryError> {
        let first_url = if target.starts_with("http://") || target.starts_with("https://") {
            target.to_string()
        } else {
            format!("{}{}", ep.base, target)
        };
        let mut url = first_url.clone();
        let mut redirects = 0;
        let mut answered_challenge = false;
        loop {
            // Credentials go only to the registry itself, never to where it redirects.
            let authorization = if super::redirect::same_origin(&first_url, &url) {
                self.authorization(ep, scopes)?
            } else {
                None
            };
            let response = self.with_attempts(&ep.registry, attempts, || {
                let mut req = ep.agent.request(method, &url);
                for (k, v) in headers {
                    req = req.set(k, v);
                }
                if let Some(a) = &authorization {
                    req = req.set("Authorization", a);
                }
                match body {
                    Body::Empty => req.call(),
                    Body::Bytes(b) => req.send_bytes(b),
                    Body::File { path, offset, len } => {
                        let mut f = std::fs::File::open(path).map_err(ureq::Error::from)?;
                        f.seek(SeekFrom::Start(offset)).map_err(ureq::Error::from)?;
                        // A buffer of 1 MiB: the body is copied a buffer at a time, and the
                        // default 8 KiB costs a read and a send per 8 KiB.
                        req.set("Content-Length", &len.to_string())
                            .send(std::io::BufReader::with_capacity(1 << 20, f.take(len)))
                    }
                }
            })?;
            if response.status() == 401 && !answered_challenge {
                answered_challenge = true;
                if let Some(c) = response
                    .header("www-authenticate")
                    .and_then(Challenge::parse)
                {
                    if let Ok(mut t) = self.tokens.lock() {
                        t.remove(&token_key(ep, scopes));
                    }
                    let had = ep.challenge.lock().ok().and_then(|c| c.clone());
                    // Retrying only helps when there is something new to present.
                    let useful = c.scheme == "bearer"
                        || (c.scheme == "basic"
                            && ep.credential.is_some()
                            && had.as_ref().map(|h| h.scheme.as_str()) != Some("basic"));
                    if let Ok(mut slot) = ep.challenge.lock() {
                        *slot = Some(c);
                    }
                    if useful {
                        continue;
                    }
                }
            }
            if method == "GET" || method == "HEAD" {
                match super::redirect::next_url(&url, &response) {
                    Some(Ok(next)) if redirects < super::redirect::MAX_REDIRECTS => {
                        redirects += 1;
                        url = next;
                        continue;
                    }
                    Some(Ok(_)) => {
                        return Err(RegistryError::Protocol(format!(
                            "{}: more than {} redirects",
                            first_url,
                            super::redirect::MAX_REDIRECTS
                        )))
                    }
                    Some(Err(e)) => return Err(RegistryError::Protocol(e)),
                    None => {}
                }
            }
            return Ok(response);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(9), Duration::from_millis(4000));
    }
}
