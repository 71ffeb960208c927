//! Redirects followed by builder's own policy, not the HTTP library's: only `http` and
//! `https` targets (anything else, `file://` included, is an error naming the URL), at most
//! [`MAX_REDIRECTS`] hops, and credentials only for the host they were given for. Registries
//! send blob downloads to a CDN this way; `ADD URL` follows them too.

use url::Url;

/// Hops before giving up, as browsers and curl default to about.
pub const MAX_REDIRECTS: usize = 10;

/// Where a 3xx response points: the next URL, or why it may not be followed.
pub fn next_url(current: &str, response: &ureq::Response) -> Option<Result<String, String>> {
    if !matches!(response.status(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let Some(location) = response.header("location") else {
        return Some(Err(format!(
            "{}: redirect ({}) without a Location",
            current,
            response.status()
        )));
    };
    Some(resolve(current, location))
}

/// `location` resolved against `current`, refused unless it is http or https.
pub fn resolve(current: &str, location: &str) -> Result<String, String> {
    let base = Url::parse(current).map_err(|e| format!("{}: {}", current, e))?;
    let next = base
        .join(location)
        .map_err(|e| format!("{}: redirect to {:?}: {}", current, location, e))?;
    match next.scheme() {
        "http" | "https" => Ok(next.to_string()),
        other => Err(format!(
            "{}: refusing a redirect to a {} URL ({}): only http and https are followed",
            current, other, next
        )),
    }
}

/// Whether credentials given for `original` may be sent to `next` (same scheme, host, port).
pub fn same_origin(original: &str, next: &str) -> bool {
    match (Url::parse(original), Url::parse(next)) {
        (Ok(a), Ok(b)) => {
            a.scheme() == b.scheme()
                && a.host_str() == b.host_str()
                && a.port_or_known_default() == b.port_or_known_default()
        }
        _ => false,
    }
}

/// GET `url` with `agent` (built with `.redirects(0)`), following redirects by this policy.
pub fn get(agent: &ureq::Agent, url: &str) -> Result<ureq::Response, String> {
    let mut current = url.to_string();
    for _ in 0..=MAX_REDIRECTS {
        let response = match agent.get(&current).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(format!("{}: {}", current, e)),
        };
        match next_url(&current, &response) {
            None => return Ok(response),
            Some(Ok(next)) => current = next,
            Some(Err(e)) => return Err(e),
        }
    }
    Err(format!("{}: more than {} redirects", url, MAX_REDIRECTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_are_followed() {
        assert_eq!(
            resolve("http://a/x/y", "/z").unwrap(),
            "http://a/z".to_string()
        );
        assert_eq!(resolve("https://a/x/y", "z").unwrap(), "https://a/x/z");
        assert!(resolve("http://a/", "file:///etc/passwd")
            .unwrap_err()
            .contains("file"));
        assert!(resolve("http://a/", "ftp://b/").is_err());
    }

    #[test]
    fn credentials_stay_with_their_host() {
        assert!(same_origin("https://r.io/v2/x", "https://r.io/v2/y"));
        assert!(same_origin("https://r.io:443/a", "https://r.io/b"));
        assert!(!same_origin("https://r.io/a", "https://cdn.r.io/b"));
        assert!(!same_origin("https://r.io/a", "http://r.io/b"));
        assert!(!same_origin(
            "http://127.0.0.1:5000/a",
            "http://127.0.0.1:5001/a"
        ));
    }
}
