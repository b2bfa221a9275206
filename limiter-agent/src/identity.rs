//! Who a request counts against: its API key (hashed, never kept raw) or its
//! client IP (IPv6 grouped by prefix), with the client address taken from the
//! one forwarding header the operator's proxy writes, believed only from
//! trusted proxies. Ambiguous identities are errors, never a fresh bucket.

use std::net::IpAddr;

use http::{HeaderName, header};
use sha2::{Digest, Sha256};

pub use self::syntax::ClientIpHeader;
use self::syntax::{Credential, authorization, forwarded_for, parse_hop, plain_key};
use crate::{
    fields::Fields,
    net::{self, Networks},
};

mod syntax;

/// The client a request is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// Lowercase hex SHA-256 of the API key.
    Key(String),
    /// The client address, IPv6 masked to the grouping prefix.
    Ip(IpAddr),
}

/// What a request says about its sender, before key verification picks the
/// bucket: the client address (grouped) and the hashed API key, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requester {
    /// The client address, IPv6 masked to the grouping prefix.
    pub ip: IpAddr,
    /// Lowercase hex SHA-256 of the API key.
    pub key: Option<String>,
}

/// Why a request's identity could not be settled (answered 400, before the
/// upstream sees the request).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// Two key headers, or two lines of one, carry different keys, or a key
    /// comes with another credential: the upstream might authenticate one
    /// while we count the other.
    #[error("the request carries more than one API key or credential")]
    ConflictingKeys,
    /// A key header that is not one well-formed key (`Bearer <token68>`, or one
    /// token of visible ASCII for other headers).
    #[error("malformed API key in {0}")]
    MalformedKey(HeaderName),
    /// The client-address header from a trusted proxy has a hop that is not an
    /// address where the walk needs one (`unknown`, obfuscated, garbage).
    #[error("unparsable client address in {0}")]
    BadClientAddress(HeaderName),
    /// A field spelled as one identity reads, with `_` for `-`: servers
    /// that fold `_` into `-` would read a key or address the limiter did
    /// not count.
    #[error("{0} is spelled with an underscore")]
    Underscored(String),
}

/// Resolves identities with the configured headers, proxies and IPv6 prefix.
#[derive(Clone, Debug)]
pub struct IdentityResolver {
    key_headers: Vec<HeaderName>,
    client_ip_header: ClientIpHeader,
    trusted: Networks,
    ipv6_prefix: u8,
}

impl IdentityResolver {
    #[must_use]
    pub fn new(
        key_headers: Vec<HeaderName>,
        client_ip_header: ClientIpHeader,
        trusted: Networks,
        ipv6_prefix: u8,
    ) -> Self {
        Self {
            key_headers,
            client_ip_header,
            trusted,
            ipv6_prefix,
        }
    }

    /// The client behind a request from `peer` carrying `headers`.
    ///
    /// # Errors
    /// [`IdentityError`] when the key headers or the client-address header are
    /// ambiguous or malformed.
    pub fn resolve<F: Fields>(
        &self,
        headers: &F,
        peer: IpAddr,
    ) -> Result<Requester, IdentityError> {
        if let Some(name) = self.underscored(headers) {
            return Err(IdentityError::Underscored(name.to_owned()));
        }
        let key = self.api_key(headers)?.map(sha256_hex);
        let ip = net::group(self.client_ip(headers, peer)?, self.ipv6_prefix);
        Ok(Requester { ip, key })
    }

    /// The one API key of the request, as raw bytes, from every configured
    /// header and every line of each. `Authorization` counts only with the
    /// `Bearer` scheme; a credential of another scheme beside a key (or any
    /// `Authorization` beside a key when it is not a configured key header)
    /// is ambiguous: the upstream may authenticate it while we count the key.
    fn api_key<'h, F: Fields>(&self, headers: &'h F) -> Result<Option<&'h [u8]>, IdentityError> {
        let malformed = |name: &HeaderName| IdentityError::MalformedKey(name.clone());
        let mut found: Option<&[u8]> = None;
        let mut other_credential = false;
        for name in &self.key_headers {
            for value in headers.values(name) {
                let key = if *name == header::AUTHORIZATION {
                    match authorization(value).map_err(|()| malformed(name))? {
                        Some(Credential::Bearer(token)) => Some(token),
                        Some(Credential::Other) => {
                            other_credential = true;
                            None
                        }
                        None => None,
                    }
                } else {
                    plain_key(value).map_err(|()| malformed(name))?
                };
                match (found, key) {
                    (Some(a), Some(b)) if a != b => return Err(IdentityError::ConflictingKeys),
                    (None, Some(b)) => found = Some(b),
                    _ => {}
                }
            }
        }
        if !self.key_headers.contains(&header::AUTHORIZATION) {
            other_credential |= headers
                .values(&header::AUTHORIZATION)
                .any(|v| !matches!(authorization(v), Ok(None)));
        }
        if other_credential && found.is_some() {
            return Err(IdentityError::ConflictingKeys);
        }
        Ok(found)
    }

    /// Whether the field `name` is one identity reads (a key header,
    /// `Authorization`, the client-address header): a field the upstream
    /// must get as the limiter read it, never one a `Connection` option may
    /// strip on the way.
    #[must_use]
    pub fn reads(&self, name: &[u8]) -> bool {
        name.eq_ignore_ascii_case(b"authorization")
            || name.eq_ignore_ascii_case(self.client_ip_header.name().as_str().as_bytes())
            || self
                .key_headers
                .iter()
                .any(|key| name.eq_ignore_ascii_case(key.as_str().as_bytes()))
    }

    /// The first field whose name is one identity reads spelled with `_`
    /// for `-` (`X_Api_Key`): invisible here, read as the key by servers
    /// that fold `_` into `-` (CGI, WSGI).
    fn underscored<'h, F: Fields>(&self, headers: &'h F) -> Option<&'h str> {
        headers
            .each()
            .map(|(name, _)| name)
            .filter(|name| name.contains('_'))
            .find(|name| {
                let folded: Vec<u8> = name
                    .bytes()
                    .map(|b| if b == b'_' { b'-' } else { b })
                    .collect();
                self.reads(&folded)
            })
    }

    /// Whether `peer` is a trusted proxy (its connections carry many clients).
    #[must_use]
    pub fn is_trusted_peer(&self, peer: IpAddr) -> bool {
        self.trusted.contains(peer)
    }

    /// The client address: the peer, unless the peer is a trusted proxy, in
    /// which case the configured header is walked from the right and the first
    /// untrusted hop is the client. No header from a trusted peer: the peer
    /// itself (a request of the proxy's own).
    ///
    /// # Errors
    /// [`IdentityError::BadClientAddress`] when the walk meets a hop that is
    /// not an address: what is left of it cannot be trusted, and the proxy's
    /// address would put every client behind it in one bucket.
    pub fn client_ip<F: Fields>(&self, headers: &F, peer: IpAddr) -> Result<IpAddr, IdentityError> {
        let peer = peer.to_canonical();
        if !self.trusted.contains(peer) {
            return Ok(peer);
        }
        let name = self.client_ip_header.name();
        let hops: Vec<&[u8]> = headers
            .values(&name)
            .flat_map(|v| v.split(|b| *b == b','))
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let parsed = match self.client_ip_header {
                ClientIpHeader::List(_) => parse_hop(hop),
                ClientIpHeader::Forwarded => forwarded_for(hop),
            };
            let ip = parsed
                .ok_or_else(|| IdentityError::BadClientAddress(self.client_ip_header.name()))?
                .to_canonical();
            client = ip;
            if !self.trusted.contains(ip) {
                break;
            }
        }
        Ok(client)
    }

    /// IPv6 addresses masked to the grouping prefix; IPv4 as is.
    #[must_use]
    pub fn group(&self, ip: IpAddr) -> IpAddr {
        net::group(ip, self.ipv6_prefix)
    }
}

/// The API key in one header value as a rate limit descriptor carries it
/// (Envoy copies one header's value): a value with a scheme is read by the
/// `Authorization` grammar (`Bearer <token68>` is the key, another scheme is
/// no key), any other by the key-header grammar (one token of visible ASCII,
/// no commas); the key's lowercase hex SHA-256.
///
/// # Errors
/// [`IdentityError::MalformedKey`] (named `descriptor`): not one well-formed
/// key, by the grammar the proxy applies to the header.
pub fn hashed_key_in(value: &str) -> Result<Option<String>, IdentityError> {
    let malformed = |()| IdentityError::MalformedKey(HeaderName::from_static("descriptor"));
    let header = http::HeaderValue::from_str(value).map_err(|_| malformed(()))?;
    if header
        .as_bytes()
        .trim_ascii()
        .iter()
        .any(u8::is_ascii_whitespace)
    {
        return Ok(match authorization(header.as_bytes()).map_err(malformed)? {
            Some(Credential::Bearer(token)) => Some(sha256_hex(token)),
            Some(Credential::Other) | None => None,
        });
    }
    Ok(plain_key(header.as_bytes())
        .map_err(malformed)?
        .map(sha256_hex))
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

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::*;

    fn resolver(trusted: &[&str]) -> IdentityResolver {
        resolver_with(trusted, "x-forwarded-for")
    }

    fn resolver_with(trusted: &[&str], client_ip_header: &'static str) -> IdentityResolver {
        IdentityResolver::new(
            vec![header::AUTHORIZATION, HeaderName::from_static("x-api-key")],
            ClientIpHeader::new(HeaderName::from_static(client_ip_header)),
            trusted.iter().map(|t| net::parse_net(t).unwrap()).collect(),
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

    fn key_of(
        r: &IdentityResolver,
        pairs: &[(&str, &str)],
    ) -> Result<Option<String>, IdentityError> {
        r.resolve(&headers(pairs), ip("192.0.2.1")).map(|c| c.key)
    }

    #[test]
    fn bearer_and_header_keys_are_hashed() {
        let r = resolver(&[]);
        let expected = Ok(Some(sha256_hex(b"secret")));
        assert_eq!(key_of(&r, &[("authorization", "Bearer secret")]), expected);
        assert_eq!(key_of(&r, &[("authorization", "bEaReR secret")]), expected);
        assert_eq!(key_of(&r, &[("x-api-key", "secret")]), expected);
        // The same key in both headers, or twice, is one key.
        assert_eq!(
            key_of(
                &r,
                &[("authorization", "Bearer secret"), ("x-api-key", "secret")]
            ),
            expected
        );
        assert_eq!(
            key_of(&r, &[("x-api-key", "secret"), ("x-api-key", "secret")]),
            expected
        );
        // Basic auth is not an API key; an empty key is no key.
        assert_eq!(key_of(&r, &[("authorization", "Basic c2VjcmV0")]), Ok(None));
        assert_eq!(key_of(&r, &[("x-api-key", "  ")]), Ok(None));
        assert_eq!(
            sha256_hex(b"secret"),
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
    }

    #[test]
    fn keys_that_disagree_are_refused() {
        let r = resolver(&[]);
        assert_eq!(
            key_of(
                &r,
                &[("authorization", "Bearer junk1"), ("x-api-key", "real")]
            ),
            Err(IdentityError::ConflictingKeys)
        );
        assert_eq!(
            key_of(&r, &[("x-api-key", "real"), ("x-api-key", "other")]),
            Err(IdentityError::ConflictingKeys)
        );
        assert_eq!(
            key_of(
                &r,
                &[("authorization", "Bearer a"), ("authorization", "Bearer b")]
            ),
            Err(IdentityError::ConflictingKeys)
        );
    }

    #[test]
    fn a_key_beside_another_credential_is_refused() {
        let r = resolver(&[]);
        for auth in ["Token real", "Basic cmVhbDo=", "ApiKey real"] {
            assert_eq!(
                key_of(&r, &[("authorization", auth), ("x-api-key", "random")]),
                Err(IdentityError::ConflictingKeys),
                "{auth}"
            );
            // Alone, another scheme is no key: the address decides.
            assert_eq!(key_of(&r, &[("authorization", auth)]), Ok(None));
        }
        // Authorization not configured as a key header still counts as a credential.
        let r = IdentityResolver::new(
            vec![HeaderName::from_static("x-api-key")],
            ClientIpHeader::new(HeaderName::from_static("x-forwarded-for")),
            Networks::default(),
            64,
        );
        assert_eq!(
            r.resolve(
                &headers(&[("authorization", "Bearer real"), ("x-api-key", "random")]),
                ip("192.0.2.1")
            )
            .map(|c| c.key),
            Err(IdentityError::ConflictingKeys)
        );
        assert_eq!(
            r.resolve(&headers(&[("x-api-key", "k")]), ip("192.0.2.1"))
                .map(|c| c.key),
            Ok(Some(sha256_hex(b"k")))
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        let r = resolver(&[]);
        let bad_auth = Err(IdentityError::MalformedKey(header::AUTHORIZATION));
        for value in [
            "Bearer real junk",
            "Bearer\treal",
            "bearer\t real",
            "Bearer  real",
            "Bearer",
            "Bearer ",
            "Bearer a,b",
            "Bearer =abc",
            "Bearer a=b",
            "Bearer é",
        ] {
            assert_eq!(
                key_of(&r, &[("authorization", value)]),
                bad_auth,
                "{value:?}"
            );
        }
        // token68 padding is part of the token.
        assert_eq!(
            key_of(&r, &[("authorization", "Bearer ab+/c==")]),
            Ok(Some(sha256_hex(b"ab+/c==")))
        );
        let bad_key = Err(IdentityError::MalformedKey(HeaderName::from_static(
            "x-api-key",
        )));
        for value in ["real junk", "real,junk", "a\tb"] {
            assert_eq!(key_of(&r, &[("x-api-key", value)]), bad_key, "{value:?}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_bytes(b"k\xff\xfe").unwrap());
        assert_eq!(r.resolve(&h, ip("192.0.2.1")).map(|c| c.key), bad_key);
    }

    #[test]
    fn ipv6_is_grouped_by_prefix() {
        let r = resolver(&[]);
        let client = |a: &str| r.resolve(&HeaderMap::new(), ip(a)).unwrap().ip;
        assert_eq!(
            client("2001:db8:1:2:aaaa::1"),
            client("2001:db8:1:2:bbbb::2")
        );
        assert_ne!(client("2001:db8:1:2:aaaa::1"), client("2001:db8:1:3::1"));
        assert_eq!(client("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2::"));
        // IPv4-mapped peers count as IPv4.
        assert_eq!(client("::ffff:192.0.2.9"), ip("192.0.2.9"));
    }

    #[test]
    fn forwarding_headers_are_ignored_from_untrusted_peers() {
        let r = resolver(&["10.0.0.0/8"]);
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        assert_eq!(r.client_ip(&h, ip("198.51.100.1")), Ok(ip("198.51.100.1")));
        let h = headers(&[("x-forwarded-for", "garbage")]);
        assert_eq!(r.client_ip(&h, ip("198.51.100.1")), Ok(ip("198.51.100.1")));
    }

    #[test]
    fn chain_is_walked_from_the_right() {
        let r = resolver(&["10.0.0.0/8"]);
        // A client-supplied spoof on the left is skipped: the first untrusted hop
        // from the right is the client.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.7, 10.0.0.2")]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), Ok(ip("203.0.113.7")));
        // Several header lines form one list.
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.8"),
        ]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), Ok(ip("203.0.113.8")));
        // Garbage left of the client is never read.
        let h = headers(&[("x-forwarded-for", "garbage, 203.0.113.9")]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), Ok(ip("203.0.113.9")));
        // No header: the proxy itself.
        assert_eq!(
            r.client_ip(&HeaderMap::new(), ip("10.0.0.1")),
            Ok(ip("10.0.0.1"))
        );
    }

    #[test]
    fn an_unparsable_hop_the_walk_reaches_is_an_error_not_the_proxy() {
        let r = resolver(&["10.0.0.0/8"]);
        let bad = Err(IdentityError::BadClientAddress(HeaderName::from_static(
            "x-forwarded-for",
        )));
        for value in ["garbage, 10.0.0.3", "unknown", "", "10.0.0.2,"] {
            let h = headers(&[("x-forwarded-for", value)]);
            assert_eq!(r.client_ip(&h, ip("10.0.0.1")), bad, "{value:?}");
        }
    }

    #[test]
    fn only_the_configured_header_is_believed() {
        // Behind a proxy that appends X-Forwarded-For, a client's own Forwarded
        // header is ignored whatever it says.
        let r = resolver(&["127.0.0.1"]);
        for forwarded in [
            "for=198.51.100.1",
            "for=unknown",
            "for=127.0.0.1",
            "for=_hidden",
        ] {
            let h = headers(&[("x-forwarded-for", "203.0.113.7"), ("forwarded", forwarded)]);
            assert_eq!(r.client_ip(&h, ip("127.0.0.1")), Ok(ip("203.0.113.7")));
        }
        // Configured for Forwarded, X-Forwarded-For is ignored and RFC 7239 parsed.
        let r = resolver_with(&["10.0.0.0/8"], "forwarded");
        let h = headers(&[
            (
                "forwarded",
                "for=1.1.1.1, for=\"[2001:db8::7]:4711\";proto=https",
            ),
            ("x-forwarded-for", "203.0.113.7"),
        ]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), Ok(ip("2001:db8::7")));
        let h = headers(&[("forwarded", "for=192.0.2.60:8080;by=10.0.0.1")]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), Ok(ip("192.0.2.60")));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(
            r.client_ip(&h, ip("10.0.0.1")),
            Err(IdentityError::BadClientAddress(header::FORWARDED))
        );
        // A single-address header such as X-Real-IP.
        let r = resolver_with(&["10.0.0.0/8"], "x-real-ip");
        let h = headers(&[("x-real-ip", "203.0.113.5"), ("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(r.client_ip(&h, ip("10.0.0.1")), Ok(ip("203.0.113.5")));
    }
}
