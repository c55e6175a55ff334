//! The SSRF guard: where a webhook may be sent. Checked when an endpoint
//! is registered or changed (its URL, and every address its host resolves
//! to) and again on every attempt, on the addresses actually connected to
//! (the sender's resolver filters them), so a name that later resolves to
//! a private address (DNS rebinding) is refused too. Refused: loopback,
//! private, link-local (with the cloud metadata addresses), CGNAT,
//! multicast, unspecified, reserved and documentation ranges, and the IPv6
//! forms that carry one of those (IPv4-mapped, IPv4-compatible, NAT64,
//! 6to4, Teredo); schemes other than https (and http when allowed). An
//! operator allow-list (`BSS_WEBHOOK_ALLOW`) opens chosen ranges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use url::Url;

/// How long a registration waits for its host to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a URL or an address is refused; the text is shown to the tenant.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Url(String),
    /// The address itself is not shown: a tenant learns that a name is
    /// refused and why, not what the operator's DNS says about it.
    #[error("{host} is (or resolves to) {why}: webhooks are not sent there")]
    Address { host: String, why: &'static str },
    #[error("{host} does not resolve: {error}")]
    Resolve { host: String, error: String },
}

#[derive(Debug, Clone)]
pub struct Guard {
    allow: Vec<IpNet>,
    allow_http: bool,
}

impl Guard {
    /// `allow`: comma-separated CIDRs or addresses opened despite the rules.
    pub fn new(allow: &str, allow_http: bool) -> anyhow::Result<Self> {
        let allow = allow
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .ok()
                    .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
                    .ok_or_else(|| {
                        anyhow::anyhow!("BSS_WEBHOOK_ALLOW: {s:?} is not a CIDR or an address")
                    })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { allow, allow_http })
    }

    /// The URL's form: scheme, host, no credentials; an address written as
    /// the host is checked here (no resolver sees it).
    pub fn check_url(&self, text: &str) -> Result<Url, Refused> {
        let url = Url::parse(text).map_err(|e| Refused::Url(format!("not a URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(Refused::Url(
                    "only https URLs are allowed (the operator has not allowed http)".into(),
                ));
            }
            other => {
                return Err(Refused::Url(format!(
                    "the scheme {other:?} is not allowed: use https"
                )));
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused::Url(
                "credentials in the URL are not allowed; a transformer may add headers".into(),
            ));
        }
        if url.fragment().is_some() {
            return Err(Refused::Url("a webhook URL has no fragment (#…)".into()));
        }
        match url.host() {
            None => return Err(Refused::Url("the URL names no host".into())),
            Some(url::Host::Ipv4(ip)) => self.check_ip(&ip.to_string(), IpAddr::V4(ip))?,
            Some(url::Host::Ipv6(ip)) => self.check_ip(&ip.to_string(), IpAddr::V6(ip))?,
            // Names are checked on what they resolve to.
            Some(url::Host::Domain(_)) => {}
        }
        Ok(url)
    }

    /// At registration: the URL, and every address its host resolves to now.
    pub async fn check_registration(&self, text: &str) -> Result<Url, Refused> {
        let url = self.check_url(text)?;
        if let Some(url::Host::Domain(host)) = url.host() {
            let port = url.port_or_known_default().unwrap_or(443);
            let found =
                tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
                    .await
                    .map_err(|_| Refused::Resolve {
                        host: host.to_owned(),
                        error: "no answer in time".into(),
                    })?
                    .map_err(|e| Refused::Resolve {
                        host: host.to_owned(),
                        error: e.to_string(),
                    })?;
            for addr in found {
                self.check_ip(host, addr.ip())?;
            }
        }
        Ok(url)
    }

    /// Whether webhooks may go to this address (`host` names it in the error).
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), Refused> {
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match forbidden(ip) {
            None => Ok(()),
            Some(why) => Err(Refused::Address {
                host: host.to_owned(),
                why,
            }),
        }
    }
}

/// Why an address is not a public destination, if it is not.
fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], len: u32) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const RANGES: [([u8; 4], u32, &str); 17] = [
        ([0, 0, 0, 0], 8, "an unspecified (\"this network\") address"),
        ([127, 0, 0, 0], 8, "a loopback address"),
        ([10, 0, 0, 0], 8, "a private address"),
        ([172, 16, 0, 0], 12, "a private address"),
        ([192, 168, 0, 0], 16, "a private address"),
        ([169, 254, 169, 254], 32, "the cloud metadata address"),
        ([169, 254, 0, 0], 16, "a link-local address"),
        ([100, 100, 100, 200], 32, "a cloud metadata address"),
        ([100, 64, 0, 0], 10, "a carrier-grade NAT (shared) address"),
        ([168, 63, 129, 16], 32, "a cloud metadata address"),
        ([192, 0, 0, 0], 24, "an IETF protocol address"),
        ([192, 0, 2, 0], 24, "a documentation address"),
        ([198, 51, 100, 0], 24, "a documentation address"),
        ([203, 0, 113, 0], 24, "a documentation address"),
        ([198, 18, 0, 0], 15, "a benchmarking address"),
        ([224, 0, 0, 0], 4, "a multicast address"),
        ([240, 0, 0, 0], 4, "a reserved (or broadcast) address"),
    ];
    RANGES
        .iter()
        .find(|(net, len, _)| in_v4(ip, *net, *len))
        .map(|(_, _, why)| *why)
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if ip.is_unspecified() {
        return Some("an unspecified address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    // ::ffff:a.b.c.d (IPv4-mapped) and ::a.b.c.d (IPv4-compatible).
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        return forbidden_v4(embedded(s[6], s[7])).or(if s[5] == 0 {
            Some("an IPv4-compatible address")
        } else {
            None
        });
    }
    // ::ffff:0:a.b.c.d (IPv4-translated, SIIT).
    if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        return forbidden_v4(embedded(s[6], s[7]));
    }
    // 64:ff9b::/96, NAT64 of an IPv4 address.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return forbidden_v4(embedded(s[6], s[7]));
    }
    // 64:ff9b:1::/48, local-use NAT64.
    if s[..3] == [0x64, 0xff9b, 1] {
        return Some("a local-use NAT64 address");
    }
    // 2002::/16, 6to4 of the IPv4 address in bits 16-48.
    if s[0] == 0x2002 {
        return forbidden_v4(embedded(s[1], s[2]));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Some("a Teredo address");
    }
    if s[0] == 0x2001 && s[1] == 0xdb8 {
        return Some("a documentation address");
    }
    if s[..4] == [0x100, 0, 0, 0] {
        return Some("a discard-only address");
    }
    match s[0] {
        x if x & 0xfe00 == 0xfc00 => Some("a unique local (private) address"),
        x if x & 0xffc0 == 0xfe80 => Some("a link-local address"),
        x if x & 0xffc0 == 0xfec0 => Some("a site-local address"),
        x if x & 0xff00 == 0xff00 => Some("a multicast address"),
        _ => None,
    }
}

/// The sender's resolver: the system's, keeping only the addresses the
/// guard allows (none left: the attempt fails, naming why).
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Arc<Guard>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match guard.check_ip(&host, a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let e = refused.unwrap_or(Refused::Resolve {
                    host,
                    error: "no addresses".into(),
                });
                return Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str) -> bool {
        forbidden(ip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))).is_some()
    }

    #[test]
    fn refuses_what_is_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "168.63.129.16",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
        ] {
            assert!(!refused(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn urls_and_the_allow_list() {
        let strict = Guard::new("", false).unwrap();
        assert!(strict.check_url("https://example.com/hook").is_ok());
        assert!(strict.check_url("http://example.com/hook").is_err());
        assert!(strict.check_url("ftp://example.com/").is_err());
        assert!(strict.check_url("https://user:pw@example.com/").is_err());
        assert!(strict.check_url("https://127.0.0.1/").is_err());
        assert!(strict.check_url("https://[::ffff:7f00:1]/").is_err());
        assert!(strict.check_url("https://2130706433/").is_err());
        let open = Guard::new("127.0.0.1/32, ::1", true).unwrap();
        assert!(open.check_url("http://127.0.0.1:8080/").is_ok());
        assert!(open.check_url("http://127.0.0.2:8080/").is_err());
        assert!(open.check_url("http://[::1]:8080/").is_ok());
        assert!(Guard::new("nonsense", false).is_err());
    }

    #[tokio::test]
    async fn names_are_judged_by_their_addresses() {
        use reqwest::dns::Resolve;
        let strict = Arc::new(Guard::new("", true).unwrap());
        assert!(
            strict
                .check_registration("http://localhost:9/")
                .await
                .is_err()
        );
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let resolved = GuardedResolver(strict).resolve(name).await;
        let error = resolved.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("loopback"), "{error}");
        let open = Arc::new(Guard::new("127.0.0.0/8, ::1/128", true).unwrap());
        assert!(open.check_registration("http://localhost:9/").await.is_ok());
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(GuardedResolver(open).resolve(name).await.is_ok());
    }
}
