//! What the API port accepts from web browsers. A page the user happens to
//! visit can make the browser send requests to any address it reaches,
//! loopback included, so two checks run before any route:
//!
//! - **Host** (plaintext HTTP/1 only): DNS rebinding points an attacker's
//!   name at this node, making its pages same-origin with it; their requests
//!   still name the attacker's host. A request naming a host this node is not
//!   known by is refused. IP addresses always pass (a page can only be
//!   same-origin with an address it was served from), as do `localhost` and
//!   `*.localhost` (browsers resolve those to loopback themselves) and the
//!   names in `api.allowed_hosts`. Under TLS a rebound name fails the
//!   certificate check instead; plaintext HTTP/2 never comes from a browser.
//! - **Origin** (methods other than GET, HEAD and OPTIONS): a cross-origin
//!   page can send a POST without asking (a form, or `fetch` with a text
//!   body); it is refused unless its origin is in `api.allowed_origins`.
//!   `Sec-Fetch-Site` decides when the browser sends it, else `Origin`
//!   against `Host`; a request with neither is not from a browser.
//!
//! Pure decisions over a request's method, version and headers; `http`
//! applies them to every route, gRPC's included (tonic serves gRPC over
//! HTTP/1 on this port, whatever the content type).

use crate::scheduler::ErrorKind;
use axum::http::{HeaderMap, Method, Version, header};
use std::net::IpAddr;

/// A configured origin or host that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrowserError {
    #[error("{0:?} is not an origin: expected http:// or https://, a host and an optional port, nothing else")]
    BadOrigin(String),
    #[error("{0:?} is not a host name with an optional :port")]
    BadHost(String),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request names a host this node does not answer for.
    Host(String),
    /// A page of another origin sent a request that could change something.
    CrossOrigin(String),
}

impl Refusal {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Refusal::Host(_) => ErrorKind::HostNotAllowed,
            Refusal::CrossOrigin(_) => ErrorKind::CrossOrigin,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::Host(host) => format!(
                "this node does not answer for host {host:?} (a DNS rebinding attack looks like this); \
                 use its IP address or localhost, or add the name to api.allowed_hosts"
            ),
            Refusal::CrossOrigin(origin) => {
                format!("a page from {origin} may not call this node; add the origin to api.allowed_origins to let it")
            }
        }
    }
}

/// `host[:port]` split, the host as compared (lower case, without IPv6
/// brackets or a final dot); `None` unless the host is an IP address or a
/// DNS name and the port a number.
fn host_port(raw: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = match raw.strip_prefix('[') {
        Some(rest) => {
            let (v6, after) = rest.split_once(']')?;
            (v6, after)
        }
        None => match raw.split_once(':') {
            Some((host, _)) => (host, &raw[host.len()..]),
            None => (raw, ""),
        },
    };
    let port = match port {
        "" => None,
        p => Some(p.strip_prefix(':')?.parse::<u16>().ok()?),
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let name = !host.is_empty()
        && host.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    (name || host.parse::<IpAddr>().is_ok()).then_some((host, port))
}

/// `scheme://host[:port]` as a browser serialises it: lower case, without
/// the scheme's default port.
pub fn parse_origin(raw: &str) -> Result<String, BrowserError> {
    let bad = || BrowserError::BadOrigin(raw.to_owned());
    let (scheme, rest) = raw.split_once("://").ok_or_else(bad)?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return Err(bad()),
    };
    let (host, port) = host_port(rest.strip_suffix('/').unwrap_or(rest)).ok_or_else(bad)?;
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    Ok(match port {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// An `api.allowed_hosts` entry: a name, and the one port it is allowed
/// on if it names one.
pub fn parse_host_entry(raw: &str) -> Result<(String, Option<u16>), BrowserError> {
    host_port(raw).ok_or_else(|| BrowserError::BadHost(raw.to_owned()))
}

/// The browser checks of one listener, from its configuration.
#[derive(Debug, Clone)]
pub struct BrowserPolicy {
    /// Normalised as [`parse_origin`] makes them.
    origins: Vec<String>,
    hosts: Vec<(String, Option<u16>)>,
    /// The listener speaks plaintext: the Host check applies.
    check_host: bool,
}

impl BrowserPolicy {
    /// From validated configuration (entries that do not parse are skipped;
    /// validation has refused them already).
    pub fn new(allowed_origins: &[String], allowed_hosts: &[String], tls: bool) -> Self {
        Self {
            origins: allowed_origins.iter().filter_map(|o| parse_origin(o).ok()).collect(),
            hosts: allowed_hosts.iter().filter_map(|h| parse_host_entry(h).ok()).collect(),
            check_host: !tls,
        }
    }

    /// The configured origins, for CORS.
    pub fn allowed_origins(&self) -> &[String] {
        &self.origins
    }

    /// Whether a request may go on to its route.
    pub fn check(&self, method: &Method, version: Version, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers.get(header::HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
        if self.check_host
            && version < Version::HTTP_2
            && let Some(host) = &host
            && !self.host_allowed(host)
        {
            return Err(Refusal::Host(host.clone()));
        }
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            return Ok(());
        }
        let origin = headers.get(header::ORIGIN).map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned());
        let allowed = origin.as_deref().and_then(|o| parse_origin(o).ok()).is_some_and(|o| self.origins.contains(&o));
        let refused = || Err(Refusal::CrossOrigin(origin.clone().unwrap_or_else(|| "another site".to_owned())));
        if let Some(site) = headers.get("sec-fetch-site") {
            return match site.as_bytes() {
                b"same-origin" | b"none" => Ok(()),
                _ if allowed => Ok(()),
                _ => refused(),
            };
        }
        match (&origin, &host) {
            (None, _) => Ok(()),
            _ if allowed => Ok(()),
            // Same origin: the page's own host and port are the request's.
            (Some(o), Some(h)) if o.split_once("://").is_some_and(|(_, a)| a.eq_ignore_ascii_case(h)) => Ok(()),
            _ => refused(),
        }
    }

    fn host_allowed(&self, raw: &str) -> bool {
        let Some((host, port)) = host_port(raw) else {
            return false;
        };
        host.parse::<IpAddr>().is_ok()
            || host == "localhost"
            || host.ends_with(".localhost")
            || self.hosts.iter().any(|(h, p)| *h == host && p.is_none_or(|p| Some(p) == port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn policy() -> BrowserPolicy {
        BrowserPolicy::new(
            &["https://App.Example.com:443/".into()],
            &["conflux.internal".into(), "pinned:7070".into()],
            false,
        )
    }

    fn check(p: &BrowserPolicy, method: Method, pairs: &[(&'static str, &str)]) -> Result<(), Refusal> {
        p.check(&method, Version::HTTP_11, &headers(pairs))
    }

    #[test]
    fn origins_and_hosts_parse_as_browsers_write_them() {
        assert_eq!(parse_origin("HTTPS://App.Example.com:443/").unwrap(), "https://app.example.com");
        assert_eq!(parse_origin("http://localhost:3000").unwrap(), "http://localhost:3000");
        assert_eq!(parse_origin("http://[::1]:80").unwrap(), "http://[::1]");
        for bad in ["app.example.com", "ftp://x", "https://", "https://x/path", "https://u@x", "*"] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_host_entry("Conflux.Internal.").unwrap(), ("conflux.internal".into(), None));
        assert_eq!(parse_host_entry("h:7070").unwrap(), ("h".into(), Some(7070)));
        assert_eq!(parse_host_entry("[::1]:7070").unwrap(), ("::1".into(), Some(7070)));
        for bad in ["", "http://h", "h/x", "u@h", "h:port", "h:", "a..b", "::1", "[::1"] {
            assert!(parse_host_entry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rebound_names_are_refused_and_addresses_pass() {
        let p = policy();
        for host in [
            "127.0.0.1:7070",
            "localhost:7070",
            "LOCALHOST",
            "[::1]:7070",
            "10.1.2.3:7070",
            "app.localhost:7070",
            "conflux.internal:9999",
            "Conflux.Internal.",
            "pinned:7070",
        ] {
            assert_eq!(check(&p, Method::GET, &[("host", host)]), Ok(()), "{host}");
        }
        for host in ["evil.example:7070", "localhost.evil.example", "pinned:7071", "127.0.0.1.nip.io:7070", "a b"] {
            assert_eq!(check(&p, Method::GET, &[("host", host)]), Err(Refusal::Host(host.into())), "{host}");
        }
        // Under TLS a rebound name fails the certificate instead; plaintext
        // HTTP/2 is never a browser's; no Host at all names nothing.
        let tls = BrowserPolicy::new(&[], &[], true);
        assert_eq!(check(&tls, Method::GET, &[("host", "evil.example")]), Ok(()));
        assert_eq!(p.check(&Method::POST, Version::HTTP_2, &headers(&[("host", "evil.example")])), Ok(()));
        assert_eq!(check(&p, Method::GET, &[]), Ok(()));
    }

    #[test]
    fn cross_origin_writes_are_refused_unless_allowed() {
        let p = policy();
        let h = ("host", "localhost:7070");
        // Not a browser: no Origin, no Sec-Fetch-Site.
        assert_eq!(check(&p, Method::POST, &[h]), Ok(()));
        // The dashboard itself, and a browser that says so.
        assert_eq!(check(&p, Method::POST, &[h, ("origin", "http://localhost:7070")]), Ok(()));
        assert_eq!(check(&p, Method::POST, &[h, ("sec-fetch-site", "same-origin"), ("origin", "http://x")]), Ok(()));
        assert_eq!(check(&p, Method::POST, &[h, ("sec-fetch-site", "none")]), Ok(()));
        // Another page, even on the same machine (another port is same-site, not same-origin).
        let evil = Err(Refusal::CrossOrigin("https://evil.example".into()));
        assert_eq!(check(&p, Method::POST, &[h, ("origin", "https://evil.example")]), evil);
        let dev = [h, ("origin", "http://localhost:3000"), ("sec-fetch-site", "same-site")];
        assert!(matches!(check(&p, Method::POST, &dev), Err(Refusal::CrossOrigin(_))));
        assert!(matches!(
            check(&p, Method::DELETE, &[h, ("sec-fetch-site", "cross-site")]),
            Err(Refusal::CrossOrigin(_))
        ));
        assert!(matches!(check(&p, Method::POST, &[h, ("origin", "null")]), Err(Refusal::CrossOrigin(_))));
        // Reading is not refused here (without CORS the page cannot read the answer).
        assert_eq!(
            check(&p, Method::GET, &[h, ("origin", "https://evil.example"), ("sec-fetch-site", "cross-site")]),
            Ok(())
        );
        // A configured origin may, with or without Sec-Fetch-Site.
        let app = ("origin", "https://app.example.com");
        assert_eq!(check(&p, Method::POST, &[h, app]), Ok(()));
        assert_eq!(check(&p, Method::POST, &[h, app, ("sec-fetch-site", "cross-site")]), Ok(()));
    }
}
