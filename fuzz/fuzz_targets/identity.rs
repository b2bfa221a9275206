//! Identity extraction on arbitrary headers: never a panic; a key only from
//! a key header; an untrusted peer is never replaced by what its headers
//! claim; IPv6 identities are always grouped.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use limiter_agent::identity::{ClientIpHeader, IdentityResolver};

const NAMES: [&str; 5] = [
    "authorization",
    "x-api-key",
    "x-forwarded-for",
    "forwarded",
    "x-other",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let resolver = IdentityResolver::new(
        vec![
            HeaderName::from_static("authorization"),
            HeaderName::from_static("x-api-key"),
        ],
        ClientIpHeader::new(HeaderName::from_static("x-forwarded-for")),
        ["10.0.0.0/8", "2001:db8::/32"]
            .iter()
            .map(|t| limiter_agent::net::parse_net(t).unwrap())
            .collect(),
        64,
    );
    let mut headers = HeaderMap::new();
    for (i, part) in rest.split(|b| *b == b'\n').enumerate() {
        let name = NAMES[(usize::from(selector) + i) % NAMES.len()];
        if let Ok(value) = HeaderValue::from_bytes(part) {
            headers.append(HeaderName::from_static(name), value);
        }
    }
    let peers = [
        IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 3, 4, 5, 6)),
        IpAddr::V6(Ipv6Addr::new(0x2a00, 1, 2, 3, 4, 5, 6, 7)),
    ];
    let has_key = headers.contains_key("authorization") || headers.contains_key("x-api-key");
    for peer in peers {
        let trusted = match peer {
            IpAddr::V4(v4) => v4.octets()[0] == 10,
            IpAddr::V6(v6) => v6.segments()[..2] == [0x2001, 0xdb8],
        };
        let client = resolver.client_ip(&headers, peer);
        if !trusted {
            assert_eq!(client, Ok(peer), "an untrusted peer's headers were believed");
        }
        let Ok(requester) = resolver.resolve(&headers, peer) else {
            continue;
        };
        if let Some(hash) = &requester.key {
            assert!(has_key);
            assert_eq!(hash.len(), 64);
            assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_eq!(Ok(requester.ip), client.map(|c| resolver.group(c)));
        if let IpAddr::V6(v6) = requester.ip {
            assert_eq!(u128::from(v6) & ((1u128 << 64) - 1), 0, "not grouped");
        }
    }
});
