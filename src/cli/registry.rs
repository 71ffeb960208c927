//! `builder pull`, `builder push`, `builder login` and `builder logout`.

use std::io::Read;
use std::sync::Arc;

use clap::Args;

use super::images::RootArg;
use super::CliError;
use crate::registry::auth::{self, Credential};
use crate::registry::{Client, Reference};

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image: `alpine`, `alpine:3`, `host:port/repo:tag`, `repo@sha256:…`.
    pub reference: String,
    /// The platform to pick from a multi-platform image (default: this machine's).
    #[arg(long)]
    pub platform: Option<String>,
    #[command(flatten)]
    pub root: RootArg,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// An image in the store (name or digest).
    pub source: String,
    /// Where to push it (default: the source's own name, which must then name a registry).
    pub destination: Option<String>,
    #[command(flatten)]
    pub root: RootArg,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The registry (`host[:port]`; default docker.io).
    pub registry: Option<String>,
    #[arg(short = 'u', long)]
    pub username: Option<String>,
    /// The password (prefer --password-stdin: arguments are visible to other users).
    #[arg(short = 'p', long)]
    pub password: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// The registry (`host[:port]`; default docker.io).
    pub registry: Option<String>,
}

/// The registry a login names: a bare host, a URL, or docker.io by default.
fn registry_of(arg: Option<&str>) -> String {
    let raw = arg.unwrap_or("docker.io");
    let host = raw
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or(raw);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        h => h.to_string(),
    }
}

pub fn pull(a: PullArgs) -> Result<(), CliError> {
    let store = a.root.open()?;
    // What a killed pull (or build) left half-downloaded goes before this one starts.
    let freed = store.clean_stale_scratch();
    if freed > 0 {
        eprintln!(
            "removed {} bytes of scratch that killed pulls and builds left",
            freed
        );
    }
    let platform = super::flags::parse_platform(a.platform.as_deref())?;
    let reference = Reference::parse(&a.reference)?;
    let client = Client::from_config()?.with_notices(|m| eprintln!("warning: {}", m));
    let (p, name) = crate::store::sources::pull_named(
        &client,
        &store,
        &reference,
        &platform,
        crate::registry::pull::Layers::Download,
    )
    .map_err(|e| match e {
        crate::store::sources::PullError::Registry(e) => CliError::from(e),
        crate::store::sources::PullError::Store(e) => CliError::from(e),
    })?;
    eprintln!(
        "pulled {} as {}: {} of {} blobs downloaded",
        reference, name, p.blobs_fetched, p.blobs_total
    );
    // The name's digest: the index's when the registry has one (as docker pull shows it).
    println!("{}", p.index.as_ref().unwrap_or(&p.image.manifest_digest));
    Ok(())
}

pub fn push(a: PushArgs) -> Result<(), CliError> {
    let store = a.root.open()?;
    let dest = Reference::parse(a.destination.as_deref().unwrap_or(&a.source))?.with_default_tag();
    let client = Client::from_config()?.with_notices(|m| eprintln!("warning: {}", m));
    let p = crate::pipeline::push_image(&store, &client, &a.source, &dest)?;
    eprintln!("{}", crate::pipeline::pushed_line(&dest, &p));
    println!("{}", p.digest);
    Ok(())
}

pub fn login(a: LoginArgs) -> Result<(), CliError> {
    let registry = registry_of(a.registry.as_deref());
    let username = a
        .username
        .ok_or_else(|| CliError::msg("builder login needs -u USER"))?;
    let password = match (a.password, a.password_stdin) {
        (Some(_), true) => {
            return Err(CliError::msg(
                "give either --password or --password-stdin, not both",
            ))
        }
        (Some(p), false) => p,
        (None, true) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CliError::msg(format!("reading the password from stdin: {}", e)))?;
            s.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => {
            return Err(CliError::msg(
                "builder login needs -p PASSWORD or --password-stdin",
            ))
        }
    };
    let cred = Credential {
        username,
        secret: password,
    };
    let client = Arc::new(Client::from_config()?.with_notices(|m| eprintln!("warning: {}", m)));
    client.check_login(&registry, cred.clone())?;
    let place = auth::store(&registry, &cred)?;
    eprintln!(
        "Login Succeeded ({}; credentials saved in {})",
        registry, place
    );
    Ok(())
}

pub fn logout(a: LogoutArgs) -> Result<(), CliError> {
    let registry = registry_of(a.registry.as_deref());
    if auth::erase(&registry)? {
        eprintln!("Removed login credentials for {}", registry);
        Ok(())
    } else {
        Err(CliError::msg(format!("not logged in to {}", registry)))
    }
}
