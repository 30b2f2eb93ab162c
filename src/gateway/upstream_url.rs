//! Limits on upstream URLs, shared by config validation (`upstreams[i].url`, `fallback.url`)
//! and the runtime admin route (`POST /balancer/upstreams`), and the optional
//! `upstream_admin_allow` allowlist of the admin route.
//!
//! [`validate_upstream_url`] refuses what `http::Uri` lets through but no upstream can be:
//!
//! * a port outside 1..=65535 (`http::Uri` accepts `http://h:99999` and `http://h:0`);
//! * a host longer than 253 characters (the DNS limit);
//! * userinfo (`http://user:pw@host`): the proxy would ignore the credentials and they would
//!   be shown in clear in `/balancer/stats`, `/metrics` and the log.
//!
//! [`AdminAllowlist`] resolves an admin-added URL's host and accepts it only when every
//! address it resolves to lies inside one of the configured CIDRs. The check is made once,
//! when the replica is added: the proxy resolves the name again on each new connection, so
//! a name whose DNS answer changes later (DNS rebinding) is not re-checked. Use IP literals
//! in admin-added URLs where that matters.

use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// The longest host name accepted (RFC 1035's 253 characters of a full domain name).
pub const MAX_HOST_LEN: usize = 253;

/// How long [`AdminAllowlist::check`] waits for the host's DNS answer.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// An upstream URL over the limits (see the [module docs](self)); the message names the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUpstreamUrl(pub String);

impl fmt::Display for InvalidUpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidUpstreamUrl {}

/// The authority part of `url` (between `scheme://` and the first `/`, `?` or `#`), or the
/// whole text after the scheme when there is no path.
fn authority_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// Splits an authority (no userinfo) into host and optional port text; an IPv6 literal
/// keeps its brackets off (`[::1]:80` -> `::1`, `80`).
fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => (rest, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

/// Checks the limits that `http::Uri` does not: port 1..=65535, host at most
/// [`MAX_HOST_LEN`] characters, no userinfo. The rest (scheme, syntax) is
/// [`Upstream::parse`](super::proxy::Upstream::parse)'s.
pub fn validate_upstream_url(url: &str) -> Result<(), InvalidUpstreamUrl> {
    let authority = authority_of(url);
    if authority.contains('@') {
        return Err(InvalidUpstreamUrl(
            "an upstream URL must not contain credentials (user:password@): they would be ignored and shown in the stats".into(),
        ));
    }
    let (host, port) = split_host_port(authority);
    if host.len() > MAX_HOST_LEN {
        return Err(InvalidUpstreamUrl(format!(
            "the host is {} characters long; at most {MAX_HOST_LEN} are allowed",
            host.len()
        )));
    }
    if let Some(port) = port {
        match port.parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => {}
            _ => {
                return Err(InvalidUpstreamUrl(format!(
                    "`{}`: port `{port}` is not in 1..=65535",
                    truncated(url)
                )))
            }
        }
    }
    Ok(())
}

/// `url` cut to 100 characters for an error message (an over-long host is not echoed whole).
fn truncated(url: &str) -> String {
    if url.chars().count() <= 100 {
        url.to_owned()
    } else {
        let head: String = url.chars().take(100).collect();
        format!("{head}...")
    }
}

/// Parses one `upstream_admin_allow` entry: a CIDR (`10.0.0.0/8`, `fd00::/8`) or a bare
/// address (one host: `/32` or `/128`).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "`{text}` is not a CIDR like 10.0.0.0/8 or fd00::/8 (or a single address)"
    ))
}

/// Why [`AdminAllowlist::check`] refused a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowlistError {
    /// The host did not resolve (or not within [`RESOLVE_TIMEOUT`]).
    Unresolvable(String),
    /// An address the host resolves to is outside every CIDR.
    NotAllowed(String),
}

impl fmt::Display for AllowlistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unresolvable(m) | Self::NotAllowed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for AllowlistError {}

/// The `upstream_admin_allow` CIDRs: where an admin-added upstream may point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminAllowlist {
    nets: Vec<IpNet>,
}

impl AdminAllowlist {
    /// An allowlist of `nets` (an empty list allows nothing).
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self { nets }
    }

    /// `true` when `ip` lies inside one of the CIDRs (an IPv4-mapped IPv6 address is
    /// checked as the IPv4 address it carries).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Resolves `host` (an IP literal is taken as is, brackets allowed) and accepts it when
    /// every address lies inside the allowlist. The DNS wait is bounded by
    /// [`RESOLVE_TIMEOUT`].
    pub async fn check(&self, host: &str, port: u16) -> Result<(), AllowlistError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<IpAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                let lookup = tokio::net::lookup_host((bare, port));
                match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                    Ok(Ok(it)) => it.map(|a| a.ip()).collect(),
                    Ok(Err(e)) => {
                        return Err(AllowlistError::Unresolvable(format!(
                            "cannot resolve `{}`: {e}",
                            truncated(bare)
                        )))
                    }
                    Err(_) => {
                        return Err(AllowlistError::Unresolvable(format!(
                            "resolving `{}` took longer than {RESOLVE_TIMEOUT:?}",
                            truncated(bare)
                        )))
                    }
                }
            }
        };
        if addrs.is_empty() {
            return Err(AllowlistError::Unresolvable(format!(
                "`{}` resolves to no address",
                truncated(bare)
            )));
        }
        match addrs.iter().find(|ip| !self.contains(**ip)) {
            Some(ip) => Err(AllowlistError::NotAllowed(format!(
                "`{}` resolves to {ip}, which is outside upstream_admin_allow",
                truncated(bare)
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_hosts_and_userinfo() {
        for ok in [
            "http://127.0.0.1:9001",
            "http://a:1/",
            "http://a:65535/x",
            "http://[::1]:8080",
            "http://example.com",
            "http://[::1]",
        ] {
            assert_eq!(validate_upstream_url(ok), Ok(()), "{ok}");
        }
        let long = format!("http://{}:80", "a".repeat(254));
        for bad in [
            "http://127.0.0.1:99999",
            "http://127.0.0.1:0",
            "http://127.0.0.1:65536/p",
            "http://[::1]:70000",
            "http://user:pw@host:80",
            "http://user@host",
            long.as_str(),
        ] {
            assert!(validate_upstream_url(bad).is_err(), "{bad}");
        }
        assert!(validate_upstream_url(&format!("http://{}:80", "a".repeat(253))).is_ok());
        // `http::Uri` itself lets the out-of-range port through: this check is needed.
        assert!("http://127.0.0.1:99999".parse::<http::Uri>().is_ok());
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nope").is_err());
        let allow = AdminAllowlist::new(vec![parse_cidr("127.0.0.0/8").unwrap()]);
        assert!(allow.contains("127.0.0.5".parse().unwrap()));
        assert!(allow.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!allow.contains("169.254.169.254".parse().unwrap()));
        assert!(!allow.contains("::1".parse().unwrap()));
    }

    #[tokio::test]
    async fn allowlist_resolves_names() {
        let allow = AdminAllowlist::new(vec![parse_cidr("127.0.0.0/8").unwrap()]);
        assert_eq!(allow.check("127.0.0.1", 80).await, Ok(()));
        assert!(matches!(
            allow.check("169.254.169.254", 80).await,
            Err(AllowlistError::NotAllowed(_))
        ));
        // `localhost` may also resolve to ::1, which is outside 127.0.0.0/8.
        let both = AdminAllowlist::new(vec![
            parse_cidr("127.0.0.0/8").unwrap(),
            parse_cidr("::1").unwrap(),
        ]);
        assert_eq!(both.check("localhost", 80).await, Ok(()));
        assert!(matches!(
            both.check("no-such-host.invalid", 80).await,
            Err(AllowlistError::Unresolvable(_))
        ));
    }
}
