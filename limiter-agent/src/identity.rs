//! Who a request counts against: its API key (hashed, never kept raw) or its
//! client IP (IPv6 grouped by prefix), with forwarding headers believed only
//! from trusted proxies.

use std::net::{IpAddr, Ipv6Addr};

use http::{HeaderMap, HeaderName, header};
use ipnet::IpNet;
use sha2::{Digest, Sha256};

/// The client a request is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// Lowercase hex SHA-256 of the API key.
    Key(String),
    /// The client address, IPv6 masked to the grouping prefix.
    Ip(IpAddr),
}

/// Resolves identities with the configured headers, proxies and IPv6 prefix.
#[derive(Clone, Debug)]
pub struct IdentityResolver {
    key_headers: Vec<HeaderName>,
    trusted: Vec<IpNet>,
    ipv6_prefix: u8,
}

impl IdentityResolver {
    #[must_use]
    pub fn new(key_headers: Vec<HeaderName>, trusted: Vec<IpNet>, ipv6_prefix: u8) -> Self {
        Self {
            key_headers,
            trusted,
            ipv6_prefix,
        }
    }

    /// The identity of a request from `peer` carrying `headers`.
    #[must_use]
    pub fn resolve(&self, headers: &HeaderMap, peer: IpAddr) -> Identity {
        match self.api_key(headers) {
            Some(key) => Identity::Key(sha256_hex(key)),
            None => Identity::Ip(self.group(self.client_ip(headers, peer))),
        }
    }

    /// The first configured header that carries a key, as raw bytes (keys with
    /// bytes outside visible ASCII are keys too, hashed like any other).
    /// `Authorization` counts only with the `Bearer` scheme.
    fn api_key<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        self.key_headers.iter().find_map(|name| {
            let value = headers.get(name)?.as_bytes().trim_ascii();
            let key = if *name == header::AUTHORIZATION {
                let space = value.iter().position(|b| *b == b' ')?;
                let (scheme, token) = value.split_at(space);
                scheme
                    .eq_ignore_ascii_case(b"bearer")
                    .then_some(token.trim_ascii())?
            } else {
                value
            };
            (!key.is_empty()).then_some(key)
        })
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client address: the peer, unless the peer is a trusted proxy, in
    /// which case the forwarding chain is walked from the right and the first
    /// untrusted hop is the client. `Forwarded` wins over `X-Forwarded-For`.
    #[must_use]
    pub fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let hops: Vec<Option<IpAddr>> = if headers.contains_key(header::FORWARDED) {
            forwarded_for(headers)
        } else {
            headers
                .get_all("x-forwarded-for")
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
                .map(|hop| parse_hop(hop.trim()))
                .collect()
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            // An unparsable hop ends the walk: nothing left of it can be trusted.
            let Some(ip) = *hop else { break };
            let ip = ip.to_canonical();
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }

    /// IPv6 addresses masked to the grouping prefix; IPv4 as is.
    #[must_use]
    pub fn group(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.ipv6_prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
        }
    }
}

/// Lowercase hex SHA-256 of `bytes`: how API keys appear in config, logs and maps.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// One hop of `X-Forwarded-For` or a `for=` value: an address, optionally
/// bracketed and with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"');
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse().ok()
}

/// The `for=` hops of every `Forwarded` element (RFC 7239), left to right.
/// Obfuscated identifiers and `unknown` parse as `None`.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(header::FORWARDED)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("for=invalid").split(','))
        .map(|element| {
            element.split(';').find_map(|pair| {
                let (name, value) = pair.trim().split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_hop(value))
            })?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn resolver(trusted: &[&str]) -> IdentityResolver {
        IdentityResolver::new(
            vec![header::AUTHORIZATION, HeaderName::from_static("x-api-key")],
            trusted.iter().map(|t| t.parse().unwrap()).collect(),
            64,
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn bearer_and_header_keys_are_hashed() {
        let r = resolver(&[]);
        let expected = Identity::Key(sha256_hex(b"secret"));
        let peer = ip("192.0.2.1");
        assert_eq!(
            r.resolve(&headers(&[("authorization", "Bearer secret")]), peer),
            expected
        );
        assert_eq!(
            r.resolve(&headers(&[("authorization", "bearer  secret ")]), peer),
            expected
        );
        assert_eq!(
            r.resolve(&headers(&[("x-api-key", "secret")]), peer),
            expected
        );
        // Basic auth is not an API key; an empty key is no key.
        assert_eq!(
            r.resolve(&headers(&[("authorization", "Basic c2VjcmV0")]), peer),
            Identity::Ip(peer)
        );
        assert_eq!(
            r.resolve(&headers(&[("x-api-key", "  ")]), peer),
            Identity::Ip(peer)
        );
        assert_eq!(
            sha256_hex(b"secret"),
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
    }

    #[test]
    fn keys_with_bytes_beyond_ascii_are_keys_hashed_as_bytes() {
        let r = resolver(&[]);
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_bytes(b"k\xff\xfe").unwrap());
        assert_eq!(
            r.resolve(&h, ip("192.0.2.1")),
            Identity::Key(sha256_hex(b"k\xff\xfe"))
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer  \xe9t\xe9 ").unwrap(),
        );
        assert_eq!(
            r.resolve(&h, ip("192.0.2.1")),
            Identity::Key(sha256_hex(b"\xe9t\xe9"))
        );
    }

    #[test]
    fn ipv6_is_grouped_by_prefix() {
        let r = resolver(&[]);
        let a = r.resolve(&HeaderMap::new(), ip("2001:db8:1:2:aaaa::1"));
        let b = r.resolve(&HeaderMap::new(), ip("2001:db8:1:2:bbbb::2"));
        let c = r.resolve(&HeaderMap::new(), ip("2001:db8:1:3::1"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, Identity::Ip(ip("2001:db8:1:2::")));
        // IPv4-mapped peers count as IPv4.
        assert_eq!(
            r.resolve(&HeaderMap::new(), ip("::ffff:192.0.2.9")),
            Identity::Ip(ip("192.0.2.9"))
        );
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let r = resolver(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "203.0.113.7")]);
        assert_eq!(r.client_ip(&h, ip("198.51.100.1")), ip("198.51.100.1"));
    }

    #[test]
    fn chain_is_walked_from_the_right() {
        let r = resolver(&["10.0.0.0/8"]);
        // A client-supplied spoof on the left is skipped: the first untrusted hop
        // from the right is the client.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.7, 10.0.0.2")]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), ip("203.0.113.7"));
        // Several header lines form one list.
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.8"),
        ]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), ip("203.0.113.8"));
        // Garbage stops the walk at the last trusted hop.
        let h = headers(&[("x-forwarded-for", "203.0.113.7, garbage, 10.0.0.3")]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), ip("10.0.0.3"));
        // No header: the proxy itself.
        assert_eq!(
            r.client_ip(&HeaderMap::new(), ip("10.0.0.1")),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn forwarded_header_wins_and_parses_rfc7239() {
        let r = resolver(&["10.0.0.0/8"]);
        let h = headers(&[
            (
                "forwarded",
                "for=1.1.1.1, for=\"[2001:db8::7]:4711\";proto=https",
            ),
            ("x-forwarded-for", "203.0.113.7"),
        ]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), ip("2001:db8::7"));
        let h = headers(&[("forwarded", "for=192.0.2.60:8080;by=10.0.0.1")]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), ip("192.0.2.60"));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), ip("10.0.0.1"));
    }
}
