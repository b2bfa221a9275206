//! Address logic, once for the whole agent: IPv6 grouping by prefix (buckets,
//! connection caps, kernel entries and bans all group alike), parsing `IP` or
//! `IP/LEN`, and sets of networks such as the trusted proxies.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv6Net};

/// IPv6 addresses masked to `ipv6_prefix` bits; IPv4 (and IPv4-mapped IPv6)
/// as the IPv4 address.
#[must_use]
pub fn group(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(ipv6_prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// A network as the kernel keys it: IPv6 networks longer than the grouping
/// prefix are cut to it (a ban on one address bans its group); host bits
/// cleared.
#[must_use]
pub fn widen(net: IpNet, ipv6_prefix: u8) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() > ipv6_prefix => {
            IpNet::V6(Ipv6Net::new(n.addr(), ipv6_prefix).map_or(n, |w| w.trunc()))
        }
        other => other.trunc(),
    }
}

/// `text` is neither an address nor an `IP/LEN` network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IP address or IP/LEN network")]
pub struct BadNetwork(pub String);

/// Parses `IP` (a host network) or `IP/LEN`, host bits cleared; an
/// IPv4-mapped IPv6 network (`::ffff:192.0.2.0/120`) as the IPv4 network it
/// is, as sources are seen.
///
/// # Errors
/// [`BadNetwork`] when it is neither.
pub fn parse_net(text: &str) -> Result<IpNet, BadNetwork> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map(|n| unmap(n.trunc()))
        .map_err(|_| BadNetwork(text.to_owned()))
}

/// An IPv4-mapped IPv6 network (prefix 96 or more) as its IPv4 network.
fn unmap(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, n.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        other => other,
    }
}

/// A set of networks (trusted proxies, an allow list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Networks(Vec<IpNet>);

impl Networks {
    #[must_use]
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    /// Whether `ip` (IPv4-mapped IPv6 counting as IPv4) is in one of them.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    #[must_use]
    pub fn as_slice(&self) -> &[IpNet] {
        &self.0
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<IpNet> for Networks {
    fn from_iter<I: IntoIterator<Item = IpNet>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn grouping_masks_ipv6_and_unmaps_ipv4() {
        assert_eq!(group(ip("2001:db8:1:2:aaaa::1"), 64), ip("2001:db8:1:2::"));
        assert_eq!(group(ip("2001:db8:1:2:aaaa::1"), 48), ip("2001:db8:1::"));
        assert_eq!(group(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(group(ip("::ffff:192.0.2.9"), 64), ip("192.0.2.9"));
        assert_eq!(group(ip("192.0.2.9"), 1), ip("192.0.2.9"));
    }

    #[test]
    fn widening_cuts_long_ipv6_networks_to_the_group() {
        let net = |t: &str| t.parse::<IpNet>().unwrap();
        assert_eq!(widen(net("2001:db8::1/128"), 64), net("2001:db8::/64"));
        assert_eq!(widen(net("2001:db8::/32"), 64), net("2001:db8::/32"));
        assert_eq!(widen(net("10.1.2.3/24"), 64), net("10.1.2.0/24"));
    }

    #[test]
    fn networks_parse_and_match_canonically() {
        assert_eq!(parse_net("10.1.2.3/8"), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_net("192.0.2.1"), Ok("192.0.2.1/32".parse().unwrap()));
        assert!(parse_net("nope").is_err());
        let trusted: Networks = ["10.0.0.0/8", "2001:db8::/32"]
            .iter()
            .map(|t| parse_net(t).unwrap())
            .collect();
        assert!(trusted.contains(ip("10.9.9.9")));
        assert!(trusted.contains(ip("::ffff:10.1.1.1")));
        assert!(trusted.contains(ip("2001:db8::5")));
        assert!(!trusted.contains(ip("192.0.2.1")));
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn ipv4_mapped_networks_are_read_as_ipv4() {
        assert_eq!(
            parse_net("::ffff:127.0.0.1").unwrap(),
            "127.0.0.1/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_net("::ffff:10.1.0.0/112").unwrap(),
            "10.1.0.0/16".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_net("::ffff:0:0/80").unwrap(),
            "::/80".parse::<IpNet>().unwrap(),
            "wider than the mapped block stays IPv6"
        );
        assert_eq!(
            parse_net("2001:db8::1/64").unwrap(),
            "2001:db8::/64".parse::<IpNet>().unwrap()
        );
    }
}
