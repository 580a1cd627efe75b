//! Which browser origins may use the gateway (`cors.allowed_origins`): the list's grammar (an
//! origin, `*`, any port `:*`, any subdomain `*.`) and whether an `Origin` is on it.
//!
//! Owns: reading and matching the list. Must not: touch requests (`server/origins.rs` applies
//! it to CORS and WebSocket upgrades).

use std::time::Duration;

/// One entry of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// `scheme://host[:port]`, compared whole.
    Exact(String),
    /// `scheme://host:*`: that host on any port (or none).
    AnyPort(String),
    /// `scheme://*.domain[:port]`: any host under `domain`, on that port.
    Subdomain { scheme: String, domain: String, port: Option<String> },
}

/// The allow-list. Empty: no other origin may use the gateway from a browser.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins {
    any: bool,
    patterns: Vec<Pattern>,
    credentials: bool,
    max_age: Duration,
}

impl Origins {
    /// The list as configured. `*` may not be combined with credentials (a browser refuses it,
    /// and it would hand every site the user's cookie).
    pub fn parse(list: &[String], credentials: bool, max_age: Duration) -> Result<Origins, String> {
        let mut origins = Origins { credentials, max_age, ..Origins::default() };
        for entry in list.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if entry == "*" {
                if credentials {
                    return Err("`*` cannot be combined with cors.allow_credentials".into());
                }
                origins.any = true;
                continue;
            }
            origins.patterns.push(pattern(entry)?);
        }
        Ok(origins)
    }

    /// Whether every origin is allowed (`*`).
    pub fn any(&self) -> bool {
        self.any
    }

    /// Whether pages may send cookies along.
    pub fn credentials(&self) -> bool {
        self.credentials
    }

    /// How long a browser may keep a preflight's answer.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Whether the list names any origin.
    pub fn configured(&self) -> bool {
        self.any || !self.patterns.is_empty()
    }

    /// Whether a page from `origin` (the `Origin` header's value) may use the gateway.
    pub fn allows(&self, origin: &str) -> bool {
        if self.any {
            return true;
        }
        let origin = origin.to_ascii_lowercase();
        let Some((scheme, host_port)) = origin.split_once("://") else { return false };
        let (host, port) = split_port(host_port);
        self.patterns.iter().any(|p| match p {
            Pattern::Exact(o) => *o == origin,
            Pattern::AnyPort(o) => o.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) == Some(host),
            Pattern::Subdomain { scheme: s, domain, port: want } => {
                s == scheme
                    && host.strip_suffix(domain.as_str()).is_some_and(|label| !label.is_empty())
                    && want.as_deref() == port
            }
        })
    }
}

/// `host:port` → (`host`, `port`); IPv6 hosts keep their brackets.
fn split_port(host_port: &str) -> (&str, Option<&str>) {
    match host_port.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (host_port, None),
    }
}

fn pattern(entry: &str) -> Result<Pattern, String> {
    let bad = |why: &str| Err(format!("{entry:?}: {why}"));
    let lower = entry.trim_end_matches('/').to_ascii_lowercase();
    let Some((scheme, host_port)) = lower.split_once("://") else {
        return bad("expected scheme://host[:port], `*`, a port `:*` or a subdomain `*.`");
    };
    if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
        return bad("expected a scheme such as https");
    }
    if host_port.is_empty() || host_port.contains(['/', '?', '#', '@']) {
        return bad("an origin has no path, query or user");
    }
    let (host, port) = split_port(host_port);
    if port == Some("*") {
        if host.contains('*') {
            return bad("a wildcard is either the port or the first label, not both");
        }
        return Ok(Pattern::AnyPort(format!("{scheme}://{host}")));
    }
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return bad("expected a port number or `*`");
    }
    match host.strip_prefix("*.") {
        Some(domain) if !domain.is_empty() && !domain.contains('*') => Ok(Pattern::Subdomain {
            scheme: scheme.to_owned(),
            domain: format!(".{domain}"),
            port: port.map(str::to_owned),
        }),
        _ if host.contains('*') => bad("`*` may only be the first label (`*.example.com`) or the port"),
        _ => Ok(Pattern::Exact(lower)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Origins {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        Origins::parse(&list, false, Duration::from_secs(60)).expect("a valid list")
    }

    #[test]
    fn origins_match_exactly_by_port_or_by_subdomain() {
        let o = origins(&["https://app.example.com/", "http://localhost:*", "https://*.example.org:8443"]);
        assert!(o.configured());
        for yes in [
            "https://app.example.com",
            "HTTPS://APP.example.com",
            "http://localhost:3000",
            "http://localhost",
            "https://a.b.example.org:8443",
        ] {
            assert!(o.allows(yes), "{yes}");
        }
        for no in [
            "http://app.example.com",
            "https://app.example.com:444",
            "https://evil-app.example.com",
            "http://localhost.evil.com:3000",
            "https://localhost:3000",
            "https://example.org:8443",
            "https://xexample.org:8443",
            "https://a.example.org",
            "null",
            "",
        ] {
            assert!(!o.allows(no), "{no}");
        }
        assert!(origins(&["*"]).allows("https://anything.test"));
        assert!(!Origins::default().configured());
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry() {
        for (entry, says) in [
            ("example.com", "expected scheme://host"),
            ("https://example.com/app", "no path"),
            ("https://*.*.example.com", "first label"),
            ("https://ex*ample.com", "first label"),
            ("https://*.example.com:*", "either the port"),
            ("https://example.com:80a", "port number"),
            ("://example.com", "scheme"),
        ] {
            let err = Origins::parse(&[entry.to_owned()], false, Duration::ZERO).unwrap_err();
            assert!(err.contains(says) && err.contains(entry), "{entry}: {err}");
        }
        let err = Origins::parse(&["*".to_owned()], true, Duration::ZERO).unwrap_err();
        assert!(err.contains("allow_credentials"), "{err}");
    }
}
