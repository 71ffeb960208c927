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

#[cfg(test)]
mod tests {
    use super::*;

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
