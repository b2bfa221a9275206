//! What changes at runtime, beside the config: per-key overrides and the
//! bans the proxy enforces itself (clients behind trusted proxies, and every
//! client when XDP is off). Built by the fleet's sync and swapped whole.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;

/// The runtime half of the limits, swapped whole.
#[derive(Debug, Default)]
pub struct Runtime {
    /// By lowercase hex SHA-256 of the key; replaces the key's `[[key]]`.
    pub overrides: HashMap<String, RuntimeOverride>,
    pub bans: BanList,
}

/// A key's runtime limits.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeOverride {
    pub multiplier: Option<f64>,
    /// By the tier's route as configured.
    pub limits: HashMap<String, NonZeroU32>,
    /// Unix ms after which it no longer applies.
    pub until_ms: Option<u64>,
}

impl RuntimeOverride {
    /// Whether it applies now.
    #[must_use]
    pub fn live(&self) -> bool {
        self.until_ms.is_none_or(|until| until > unix_ms())
    }
}

/// Banned networks with their ends (Unix ms), grouped as the kernel groups
/// sources: single addresses (IPv6: their group) found by hash, wider
/// networks by scan.
#[derive(Debug, Default)]
pub struct BanList {
    exact: HashMap<IpAddr, u64>,
    nets: Vec<(IpNet, u64)>,
    ipv6_prefix: u8,
}

impl BanList {
    /// `bans` (networks already widened to `ipv6_prefix`) with their ends.
    #[must_use]
    pub fn new(bans: impl IntoIterator<Item = (IpNet, u64)>, ipv6_prefix: u8) -> Self {
        let mut list = Self {
            ipv6_prefix,
            ..Self::default()
        };
        for (net, until) in bans {
            let single = match net {
                IpNet::V4(n) => n.prefix_len() == 32,
                IpNet::V6(n) => n.prefix_len() >= ipv6_prefix,
            };
            if single {
                list.exact.insert(net.network(), until);
            } else {
                list.nets.push((net, until));
            }
        }
        list
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.nets.is_empty()
    }

    /// How many ms of a ban on `ip` are left, if it is banned.
    #[must_use]
    pub fn left_ms(&self, ip: IpAddr) -> Option<u64> {
        let now = unix_ms();
        let ip = crate::net::group(ip, self.ipv6_prefix);
        let exact = self.exact.get(&ip).copied();
        let wide = self
            .nets
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .map(|(_, until)| *until)
            .max();
        let until = exact.max(wide)?;
        (until > now).then(|| until - now)
    }
}

/// Unix time in ms.
#[must_use]
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_match_addresses_groups_and_networks_until_they_end() {
        let later = unix_ms() + 60_000;
        let list = BanList::new(
            [
                ("192.0.2.7/32".parse().unwrap(), later),
                ("2001:db8:1::/64".parse().unwrap(), later),
                ("198.51.100.0/24".parse().unwrap(), later),
                ("203.0.113.1/32".parse().unwrap(), 1),
            ],
            64,
        );
        assert!(list.left_ms("192.0.2.7".parse().unwrap()).is_some());
        assert!(list.left_ms("192.0.2.8".parse().unwrap()).is_none());
        assert!(
            list.left_ms("2001:db8:1::99".parse().unwrap()).is_some(),
            "an IPv6 address in the banned group"
        );
        assert!(
            list.left_ms("::ffff:198.51.100.77".parse().unwrap())
                .is_some()
        );
        assert!(
            list.left_ms("203.0.113.1".parse().unwrap()).is_none(),
            "ended"
        );
        assert!(!list.is_empty());
        assert!(BanList::default().is_empty());
    }
}
