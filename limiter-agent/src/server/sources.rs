//! Open connections per source, so that one source (an IPv4 address, an IPv6
//! prefix, or one trusted proxy) cannot hold every connection slot.

use std::{net::IpAddr, sync::Arc};

use crate::{
    net,
    tally::{Held, Tally},
};

/// Which connection cap refused a connection (the `cap` label of
/// `limiter_connections_refused_total`: the setting's name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    /// `[server] max_connections`: every source together.
    Total,
    /// `[server] max_connections_per_source`.
    PerSource,
    /// `[server] max_connections_per_proxy`: one trusted proxy.
    PerProxy,
}

impl Cap {
    #[must_use]
    pub fn setting(self) -> &'static str {
        match self {
            Self::Total => "max_connections",
            Self::PerSource => "max_connections_per_source",
            Self::PerProxy => "max_connections_per_proxy",
        }
    }
}

/// The per-source caps in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// `[server] max_connections_per_source`.
    pub per_source: usize,
    /// `[server] max_connections_per_proxy`.
    pub per_proxy: usize,
}

/// What a connection from one peer counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    /// The peer address as the limits see it: IPv4-mapped IPv6 as IPv4, IPv6
    /// masked to `[identity] ipv6_prefix`; a trusted proxy's own address.
    pub key: IpAddr,
    pub cap: Cap,
    pub limit: usize,
}

impl Source {
    /// The source of a connection from `peer`. A trusted proxy carries many
    /// clients, so it has a cap of its own instead of the per-source one.
    #[must_use]
    pub fn of(peer: IpAddr, trusted_proxy: bool, ipv6_prefix: u8, caps: Caps) -> Self {
        let peer = peer.to_canonical();
        if trusted_proxy {
            Self {
                key: peer,
                cap: Cap::PerProxy,
                limit: caps.per_proxy,
            }
        } else {
            Self {
                key: net::group(peer, ipv6_prefix),
                cap: Cap::PerSource,
                limit: caps.per_source,
            }
        }
    }
}

/// Open connections by source key.
pub type Sources = Tally<IpAddr>;

/// One open connection of a source; released when dropped.
pub type Slot = Held<IpAddr>;

impl Source {
    /// One more connection for this source in `sources`, or `None` when it
    /// holds its limit.
    pub fn acquire(self, sources: &Arc<Sources>) -> Option<Slot> {
        sources.acquire(self.key, self.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps {
        per_source: 100,
        per_proxy: 1000,
    };

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv6_sources_are_grouped_by_the_identity_prefix() {
        let a = Source::of(ip("2001:db8:1:2::1"), false, 64, CAPS);
        let b = Source::of(ip("2001:db8:1:2:ffff::9"), false, 64, CAPS);
        let other = Source::of(ip("2001:db8:1:3::1"), false, 64, CAPS);
        assert_eq!(a.key, b.key);
        assert_eq!(a.key, ip("2001:db8:1:2::"));
        assert_ne!(a.key, other.key);
        assert_eq!((a.cap, a.limit), (Cap::PerSource, 100));
        let wide = Source::of(ip("2001:db8:1:3::1"), false, 48, CAPS);
        assert_eq!(wide.key, ip("2001:db8:1::"));
    }

    #[test]
    fn ipv4_mapped_peers_are_their_ipv4_address() {
        // Not masked to a /64 with every other IPv4 client of a dual-stack listener.
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.7"), false, 64, CAPS).key,
            ip("192.0.2.7")
        );
        assert_ne!(
            Source::of(ip("::ffff:192.0.2.7"), false, 64, CAPS).key,
            Source::of(ip("::ffff:192.0.2.8"), false, 64, CAPS).key
        );
    }

    #[test]
    fn trusted_proxies_have_their_own_cap_per_address() {
        let proxy = Source::of(ip("::ffff:10.1.2.3"), true, 64, CAPS);
        assert_eq!(
            (proxy.key, proxy.cap, proxy.limit),
            (ip("10.1.2.3"), Cap::PerProxy, 1000)
        );
        // Two proxies in one /64 are two proxies.
        let p1 = Source::of(ip("2001:db8::1"), true, 64, CAPS);
        let p2 = Source::of(ip("2001:db8::2"), true, 64, CAPS);
        assert_ne!(p1.key, p2.key);
    }
}
