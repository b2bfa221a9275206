//! Typed access to the program's maps, from a freshly loaded object or from
//! the pins under `/sys/fs/bpf/limiter/<instance>/`. Nothing else in the agent
//! touches raw map handles.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use ipnet::IpNet;
use limiter_common::{
    Ban, ProgramConfig, SourceKey, SourceState, V4_MAPPED_PREFIX_LEN, map_names, reason,
    stat_index, verdict,
};

use crate::net::{group, widen};

/// A map could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// No pinned map at the path: no agent ever ran with this instance.
    #[error(
        "no pinned map at {0} (is the agent running, or was it ever started with this instance?)"
    )]
    NotPinned(PathBuf),
    /// The object lacks a map the agent needs (a build mismatch).
    #[error("the XDP object has no `{0}` map")]
    Missing(&'static str),
    /// A map syscall failed.
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// The seven pinned maps of one instance.
pub struct Maps {
    config: Array<MapData, ProgramConfig>,
    sources: HashMap<MapData, SourceKey, SourceState>,
    probation: HashMap<MapData, SourceKey, SourceState>,
    local: LpmTrie<MapData, SourceKey, u8>,
    allow: LpmTrie<MapData, SourceKey, u8>,
    bans: LpmTrie<MapData, SourceKey, Ban>,
    stats: PerCpuArray<MapData, u64>,
}

/// One source's current window, as `status` shows it.
#[derive(Clone, Copy, Debug)]
pub struct SourceView {
    pub addr: IpAddr,
    pub state: SourceState,
}

/// One entry of the ban trie.
#[derive(Clone, Copy, Debug)]
pub struct BanView {
    pub net: IpNet,
    pub until_ns: u64,
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing(name));
        Self::from_maps(
            take(map_names::CONFIG)?,
            take(map_names::SOURCES)?,
            take(map_names::ALLOW)?,
            take(map_names::BANS)?,
            take(map_names::STATS)?,
            take(map_names::PROBATION)?,
            take(map_names::LOCAL)?,
        )
    }

    /// Opens the maps pinned in `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self, MapsError> {
        let open = |name: &'static str| {
            let path = dir.join(name);
            if !path.exists() {
                return Err(MapsError::NotPinned(path));
            }
            MapData::from_pin(&path).map_err(map_err(name))
        };
        Self::from_maps(
            Map::Array(open(map_names::CONFIG)?),
            Map::LruHashMap(open(map_names::SOURCES)?),
            Map::LpmTrie(open(map_names::ALLOW)?),
            Map::LpmTrie(open(map_names::BANS)?),
            Map::PerCpuArray(open(map_names::STATS)?),
            Map::LruHashMap(open(map_names::PROBATION)?),
            Map::LpmTrie(open(map_names::LOCAL)?),
        )
    }

    fn from_maps(
        config: Map,
        sources: Map,
        allow: Map,
        bans: Map,
        stats: Map,
        probation: Map,
        local: Map,
    ) -> Result<Self, MapsError> {
        Ok(Self {
            config: Array::try_from(config).map_err(map_err(map_names::CONFIG))?,
            sources: HashMap::try_from(sources).map_err(map_err(map_names::SOURCES))?,
            probation: HashMap::try_from(probation).map_err(map_err(map_names::PROBATION))?,
            local: LpmTrie::try_from(local).map_err(map_err(map_names::LOCAL))?,
            allow: LpmTrie::try_from(allow).map_err(map_err(map_names::ALLOW))?,
            bans: LpmTrie::try_from(bans).map_err(map_err(map_names::BANS))?,
            stats: PerCpuArray::try_from(stats).map_err(map_err(map_names::STATS))?,
        })
    }

    pub fn config(&self) -> Result<ProgramConfig, MapsError> {
        self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Writes `config`, first bumping `policy_gen` past the one in the map so
    /// every source re-reads the tries (a `ban` from another process may have
    /// bumped it meanwhile). A zero `challenge_key` keeps the map's (cookies
    /// sent before a reload or a restart stay valid), or draws a new one.
    pub fn write_config(&mut self, config: &ProgramConfig) -> Result<(), MapsError> {
        let current = self.config()?;
        let challenge_key = match (config.challenge_key, current.challenge_key) {
            ([0, 0], [0, 0]) => random_key(),
            ([0, 0], kept) => kept,
            (given, _) => given,
        };
        self.put_config(&ProgramConfig {
            policy_gen: current
                .policy_gen
                .max(config.policy_gen)
                .wrapping_add(1)
                .max(1),
            challenge_key,
            ..*config
        })
    }

    fn put_config(&mut self, config: &ProgramConfig) -> Result<(), MapsError> {
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    fn bump_policy(&mut self) -> Result<(), MapsError> {
        let config = self.config()?;
        self.write_config(&config)
    }

    /// Bans `net` until `until_ns` (`CLOCK_MONOTONIC`). IPv6 bans are widened
    /// to `ipv6_prefix`: the program looks sources up at that grouping.
    pub fn ban(&mut self, net: IpNet, until_ns: u64, ipv6_prefix: u8) -> Result<IpNet, MapsError> {
        let net = widen(net, ipv6_prefix);
        self.bans
            .insert(&trie_key(net), Ban { until_ns }, 0)
            .map_err(map_err(map_names::BANS))?;
        self.bump_policy()?;
        Ok(net)
    }

    /// Lifts the ban on exactly `net` (as widened by [`Maps::ban`]); false if none.
    pub fn unban(&mut self, net: IpNet, ipv6_prefix: u8) -> Result<bool, MapsError> {
        let net = widen(net, ipv6_prefix);
        match self.bans.remove(&trie_key(net)) {
            Ok(()) => {
                self.bump_policy()?;
                Ok(true)
            }
            Err(MapError::KeyNotFound) => Ok(false),
            // A trie's missing key comes back as the system call's ENOENT:
            // a ban that expired and was swept, or was never written.
            Err(MapError::SyscallError(aya::sys::SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(map_err(map_names::BANS)(e)),
        }
    }

    /// Every ban entry, expired ones included.
    pub fn bans(&self) -> Vec<BanView> {
        self.bans
            .iter()
            .filter_map(Result::ok)
            .map(|(key, ban)| BanView {
                net: from_trie_key(&key),
                until_ns: ban.until_ns,
            })
            .collect()
    }

    /// Removes the ban on exactly `net` if it ended before `now_ns` (read
    /// again here: a ban renewed since it was listed stays); whether it did.
    pub fn remove_ban_if_expired(&mut self, net: IpNet, now_ns: u64) -> bool {
        let key = trie_key(net);
        match self.bans.get(&key, 0) {
            Ok(ban) if ban.until_ns <= now_ns => self.bans.remove(&key).is_ok(),
            _ => false,
        }
    }

    /// Replaces the allow list with `nets` (IPv6 entries widened like bans),
    /// bumping the policy generation after a change, as [`Maps::ban`] does: a
    /// source that re-read the tries in the middle of the change is told to
    /// read them again.
    pub fn set_allow(&mut self, nets: &[IpNet], ipv6_prefix: u8) -> Result<(), MapsError> {
        let wanted: Vec<IpNet> = nets.iter().map(|n| widen(*n, ipv6_prefix)).collect();
        let present = self.allow_list();
        let mut changed = false;
        for net in present.iter().filter(|n| !wanted.contains(n)) {
            changed |= self.allow.remove(&trie_key(*net)).is_ok();
        }
        for net in wanted.iter().filter(|n| !present.contains(n)) {
            self.allow
                .insert(&trie_key(*net), 1, 0)
                .map_err(map_err(map_names::ALLOW))?;
            changed = true;
        }
        if changed {
            self.bump_policy()?;
        }
        Ok(())
    }

    /// Replaces the host's own addresses, which the SYN challenge never
    /// answers, with `addrs` (at most [`limiter_common::LOCAL_CAPACITY`];
    /// the rest are left out).
    pub fn set_local(&mut self, addrs: &[IpAddr]) -> Result<(), MapsError> {
        let wanted: Vec<IpNet> = addrs
            .iter()
            .map(|a| IpNet::from(a.to_canonical()))
            .take(limiter_common::LOCAL_CAPACITY as usize)
            .collect();
        let present: Vec<IpNet> = self
            .local
            .keys()
            .filter_map(Result::ok)
            .map(|k| from_trie_key(&k))
            .collect();
        for net in present.iter().filter(|n| !wanted.contains(n)) {
            let _ = self.local.remove(&trie_key(*net));
        }
        for net in wanted.iter().filter(|n| !present.contains(n)) {
            self.local
                .insert(&trie_key(*net), 1, 0)
                .map_err(map_err(map_names::LOCAL))?;
        }
        Ok(())
    }

    /// The allow list.
    pub fn allow_list(&self) -> Vec<IpNet> {
        self.allow
            .keys()
            .filter_map(Result::ok)
            .map(|k| from_trie_key(&k))
            .collect()
    }

    /// Live source entries (LRU order is the kernel's; sort as needed).
    #[must_use]
    pub fn sources(&self) -> Vec<SourceView> {
        views(&self.sources)
    }

    /// Sources admitted by the SYN challenge and not yet promoted.
    #[must_use]
    pub fn probation(&self) -> Vec<SourceView> {
        views(&self.probation)
    }

    /// The probation entry of exactly `key`.
    #[must_use]
    pub fn probation_at(&self, key: &SourceKey) -> Option<SourceState> {
        self.probation.get(key, 0).ok()
    }

    /// Puts `key` in probation, as a valid cookie does.
    #[cfg(feature = "test-util")]
    pub fn put_probation(&mut self, key: &SourceKey, state: &SourceState) -> Result<(), MapsError> {
        self.probation
            .insert(key, state, 0)
            .map_err(map_err(map_names::PROBATION))
    }

    /// The state of one source (as the program keys it).
    #[must_use]
    pub fn source(&self, addr: IpAddr, ipv6_prefix: u8) -> Option<SourceState> {
        self.source_at(&source_key(addr, ipv6_prefix))
    }

    /// The entry of exactly `key`.
    #[must_use]
    pub fn source_at(&self, key: &SourceKey) -> Option<SourceState> {
        self.sources.get(key, 0).ok()
    }

    /// Overwrites the entry of `key`: the tests move windows and deadlines
    /// instead of waiting for them.
    #[cfg(feature = "test-util")]
    pub fn put_source(&mut self, key: &SourceKey, state: &SourceState) -> Result<(), MapsError> {
        self.sources
            .insert(key, state, 0)
            .map_err(map_err(map_names::SOURCES))
    }

    /// Writes `config` exactly, `policy_gen` included: the tests set
    /// generations by hand to show when the program re-reads the tries.
    #[cfg(feature = "test-util")]
    pub fn put_config_exact(&mut self, config: &ProgramConfig) -> Result<(), MapsError> {
        self.put_config(config)
    }

    /// Packets with `verdict` for `reason`, summed over CPUs.
    #[must_use]
    pub fn stat(&self, verdict: u32, reason: u32) -> u64 {
        self.stats
            .get(&stat_index(verdict, reason), 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Every (verdict, reason, packets) counter, summed over CPUs; zero rows included.
    #[must_use]
    pub fn counters(&self) -> Vec<(u32, u32, u64)> {
        (0..verdict::COUNT)
            .flat_map(|v| (0..reason::COUNT).map(move |r| (v, r)))
            .map(|(v, r)| (v, r, self.stat(v, r)))
            .collect()
    }

    /// [`Maps::counters`] by name.
    #[must_use]
    pub fn stats(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.counters()
            .into_iter()
            .map(|(v, r, n)| (verdict::NAMES[v as usize], reason::NAMES[r as usize], n))
            .collect()
    }
}

/// A secret key for the SYN challenge cookies, from the kernel's CSPRNG.
fn random_key() -> [u64; 2] {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the pointer and length describe the unfilled tail of
        // `bytes`, which we own and which outlives the call.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        // Interrupted by a signal, it has written nothing: try again.
        if let Ok(n) = usize::try_from(n) {
            filled += n;
        }
    }
    let (a, b) = bytes.split_at(8);
    [
        u64::from_ne_bytes(a.try_into().expect("8 bytes")),
        u64::from_ne_bytes(b.try_into().expect("8 bytes")),
    ]
}

/// The per-source key the program looks `addr` up by: IPv6 grouped to
/// `ipv6_prefix`, IPv4 (and IPv4-mapped IPv6) as IPv4.
#[must_use]
pub fn source_key(addr: IpAddr, ipv6_prefix: u8) -> SourceKey {
    match group(addr, ipv6_prefix) {
        IpAddr::V4(v4) => SourceKey::from_v4(v4.octets()),
        IpAddr::V6(v6) => SourceKey::from_v6(v6.octets()),
    }
}

fn trie_key(net: IpNet) -> Key<SourceKey> {
    match net {
        IpNet::V4(n) => Key::new(
            V4_MAPPED_PREFIX_LEN + u32::from(n.prefix_len()),
            SourceKey::from_v4(n.network().octets()),
        ),
        IpNet::V6(n) => Key::new(
            u32::from(n.prefix_len()),
            SourceKey::from_v6(n.network().octets()),
        ),
    }
}

/// Every entry of a per-source map, as addresses.
fn views(map: &HashMap<MapData, SourceKey, SourceState>) -> Vec<SourceView> {
    map.iter()
        .filter_map(Result::ok)
        .map(|(key, state)| SourceView {
            addr: source_addr(&key),
            state,
        })
        .collect()
}

fn source_addr(key: &SourceKey) -> IpAddr {
    key.as_v4()
        .map_or_else(|| IpAddr::from(key.addr), IpAddr::from)
}

fn from_trie_key(key: &Key<SourceKey>) -> IpNet {
    let data = key.data();
    let len = key.prefix_len();
    match data.as_v4() {
        Some(v4) if len >= V4_MAPPED_PREFIX_LEN => {
            IpNet::new(IpAddr::from(v4), (len - V4_MAPPED_PREFIX_LEN) as u8)
        }
        _ => IpNet::new(IpAddr::from(data.addr), len.min(128) as u8),
    }
    .unwrap_or_else(|_| IpNet::from(IpAddr::from(data.addr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trie_keys_round_trip_and_v6_is_widened() {
        for text in ["10.1.2.3/32", "10.1.0.0/16", "2001:db8::/48", "0.0.0.0/0"] {
            let net: IpNet = text.parse().unwrap();
            assert_eq!(from_trie_key(&trie_key(widen(net, 64))), net, "{text}");
        }
        let host: IpNet = "2001:db8:1:2:3:4:5:6/128".parse().unwrap();
        assert_eq!(
            widen(host, 64),
            "2001:db8:1:2::/64".parse::<IpNet>().unwrap()
        );
        let v4: IpNet = "10.1.2.3/24".parse().unwrap();
        assert_eq!(widen(v4, 64), "10.1.2.0/24".parse::<IpNet>().unwrap());
    }

    #[test]
    fn source_keys_group_ipv6_and_unmap_ipv4_like_the_program() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let v6 = |text: &str| text.parse::<std::net::Ipv6Addr>().unwrap().octets();
        let v4_key = SourceKey::from_v4([192, 0, 2, 9]);
        assert_eq!(source_key(ip("192.0.2.9"), 64), v4_key);
        assert_eq!(
            source_key(ip("::ffff:192.0.2.9"), 64),
            v4_key,
            "a client seen on a dual-stack socket is keyed as its IPv4 packets are"
        );
        let grouped = source_key(ip("2001:db8:1:2:3:4:5:6"), 64);
        assert_eq!(grouped, SourceKey::from_v6(v6("2001:db8:1:2::")));
        assert_eq!(
            grouped,
            SourceKey::from_v6(v6("2001:db8:1:2:3:4:5:6")).masked(&limiter_common::ipv6_mask(64)),
            "the agent's grouping is the program's mask"
        );
    }
}
