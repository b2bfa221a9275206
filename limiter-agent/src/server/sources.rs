//! Open connections per source, so that one source (an IPv4 address, an IPv6
//! prefix, or one trusted proxy) cannot hold every connection slot.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use crate::net;

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

/// Open connections by source key. Holds only sources with a connection open,
/// so it never outgrows `max_connections`.
#[derive(Debug, Default)]
pub struct Sources {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl Sources {
    /// One more connection for `source`, or `None` when it holds its limit.
    pub fn acquire(self: &Arc<Self>, source: Source) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(source.key).or_insert(0);
        if *count >= source.limit {
            if *count == 0 {
                open.remove(&source.key);
            }
            return None;
        }
        *count += 1;
        Some(Slot {
            sources: self.clone(),
            key: source.key,
        })
    }

    /// Connections `key` holds now.
    #[cfg(test)]
    fn open(&self, key: IpAddr) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .copied()
            .unwrap_or(0)
    }
}

/// One open connection of a source; released when dropped.
#[derive(Debug)]
pub struct Slot {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .sources
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
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

    #[test]
    fn a_source_holds_at_most_its_limit_and_slots_come_back() {
        let sources = Arc::new(Sources::default());
        let caps = Caps {
            per_source: 2,
            per_proxy: 10,
        };
        let a = Source::of(ip("192.0.2.1"), false, 64, caps);
        let b = Source::of(ip("192.0.2.2"), false, 64, caps);
        let first = sources.acquire(a).expect("first");
        let second = sources.acquire(a).expect("second");
        assert!(sources.acquire(a).is_none(), "over the cap");
        let other = sources.acquire(b).expect("another source is not affected");
        assert_eq!(sources.open(a.key), 2);
        drop(first);
        assert_eq!(sources.open(a.key), 1);
        let third = sources.acquire(a).expect("a slot came back");
        drop((second, third, other));
        assert_eq!(sources.open(a.key), 0);
        assert!(
            sources.open.lock().unwrap().is_empty(),
            "no entry kept for idle sources"
        );
    }
}
