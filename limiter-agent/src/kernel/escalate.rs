//! Escalation: a client that keeps sending after its 429s is banned in the
//! kernel at the API ports, for `ban_seconds`, doubling with each repeat
//! offence up to `max_ban_seconds`.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use ipnet::IpNet;

use super::monotonic_ns;
use crate::{
    config::Config,
    identity::Identity,
    limit::Decision,
    metrics::Metrics,
    net::{self, Networks},
    proxy::RejectionSink,
};

/// Offenders are forgotten this long after their last ban ended.
const FORGET_AFTER_NS: u64 = 3600 * 1_000_000_000;
/// (key, source) pairs whose rejections are counted at most; beyond it a
/// new pair falls back to the bucket's own count.
const MAX_KEYED: usize = 65_536;

/// A keyed client's rejections from one address, in one window.
#[derive(Clone, Copy, Debug)]
struct Strikes {
    rejected: u32,
    window_end_ns: u64,
}

#[derive(Clone, Copy, Debug)]
struct Offender {
    offences: u32,
    banned_until_ns: u64,
}

/// What escalation reads of the config: taken whole at start and on reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscalationSettings {
    /// `[xdp] escalate_after_rejections`; 0 = derived from each bucket's limit.
    pub after_rejections: u32,
    pub ban_seconds: u64,
    pub max_ban_seconds: u64,
    pub ban_keyed_clients: bool,
    pub ipv6_prefix: u8,
    /// Never banned: each carries many clients.
    pub trusted_proxies: Networks,
}

impl EscalationSettings {
    #[must_use]
    pub fn from_config(config: &Config) -> Self {
        let live = &config.live;
        Self {
            after_rejections: live.xdp.escalate_after_rejections,
            ban_seconds: live.xdp.ban_seconds,
            max_ban_seconds: live.xdp.max_ban_seconds,
            ban_keyed_clients: live.xdp.ban_keyed_clients,
            ipv6_prefix: live.ipv6_prefix,
            trusted_proxies: live.trusted_proxies.clone(),
        }
    }

    /// Rejections in one window after which a client is banned:
    /// `escalate_after_rejections`, or when 0 the bucket's own limit (a client
    /// that collected as many 429s as it had requests is not reading them), at
    /// least 10.
    #[must_use]
    pub fn threshold(&self, limit: u32) -> u32 {
        match self.after_rejections {
            0 => limit.max(10),
            set => set,
        }
    }
}

/// Why a ban was made, for the hosts and operators who see it.
#[derive(Debug, Clone)]
pub struct BanCause<'a> {
    pub reason: String,
    /// The tier whose 429s were ignored.
    pub tier: Option<&'a str>,
}

/// Where escalation's bans go: this host's kernel, or the fleet (which
/// puts it in this host's kernel at once and publishes it to the others).
pub trait Banner: Send + Sync {
    /// Bans `net` for `seconds`; the network as banned (IPv6 widened to
    /// `ipv6_prefix`).
    ///
    /// # Errors
    /// The kernel refused the entry.
    fn ban(
        &self,
        net: IpNet,
        seconds: u64,
        ipv6_prefix: u8,
        cause: BanCause<'_>,
    ) -> Result<IpNet, String>;
}

/// The [`RejectionSink`] that bans sources in the kernel.
pub struct Escalation {
    banner: Arc<dyn Banner>,
    metrics: Metrics,
    /// Swapped whole on reload; a rejection takes a reference count.
    /// Swapped whole on reload; read without a lock on every rejection.
    settings: arc_swap::ArcSwap<EscalationSettings>,
    offenders: Mutex<HashMap<IpAddr, Offender>>,
    /// Rejections of keyed clients per (key, sending source, IPv6 grouped
    /// as bans are): a bucket's own count is everyone's who knows the key,
    /// and must not get its owner banned for what another sender did.
    keyed: Mutex<Keyed>,
}

/// The (key, source) strike table.
#[derive(Default)]
struct Keyed {
    strikes: HashMap<(u64, IpAddr), Strikes>,
    /// Keys the table by a hash the clients can't aim collisions at.
    hasher: std::collections::hash_map::RandomState,
    /// When full windows were last swept out (at most once a second).
    swept_ns: u64,
}

impl Escalation {
    #[must_use]
    pub fn new(banner: Arc<dyn Banner>, config: &Config, metrics: Metrics) -> Self {
        Self {
            banner,
            metrics,
            settings: arc_swap::ArcSwap::from_pointee(EscalationSettings::from_config(config)),
            offenders: Mutex::default(),
            keyed: Mutex::default(),
        }
    }

    /// Takes the thresholds and ban lengths of a reloaded config.
    pub fn update(&self, config: &Config) {
        self.settings
            .store(Arc::new(EscalationSettings::from_config(config)));
    }

    /// Forgets offenders whose last ban ended long ago.
    pub fn housekeeping(&self) {
        let now = monotonic_ns();
        self.offenders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, o| o.banned_until_ns.saturating_add(FORGET_AFTER_NS) > now);
        self.keyed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .strikes
            .retain(|_, s| s.window_end_ns > now);
    }

    /// The rejections `key` has had from `source` (grouped) in the current
    /// window, this one counted; `None` when the table is full of live
    /// windows.
    fn keyed_rejections(&self, key: &str, source: IpAddr, window_ms: u64, now: u64) -> Option<u32> {
        use std::hash::BuildHasher as _;
        let mut keyed = self.keyed.lock().unwrap_or_else(PoisonError::into_inner);
        let pair = (keyed.hasher.hash_one(key), source);
        if !keyed.strikes.contains_key(&pair) && keyed.strikes.len() >= MAX_KEYED {
            if now.saturating_sub(keyed.swept_ns) >= 1_000_000_000 {
                keyed.swept_ns = now;
                keyed.strikes.retain(|_, s| s.window_end_ns > now);
            }
            if keyed.strikes.len() >= MAX_KEYED {
                return None;
            }
        }
        let strikes = keyed.strikes.entry(pair).or_insert(Strikes {
            rejected: 0,
            window_end_ns: 0,
        });
        if strikes.window_end_ns <= now {
            *strikes = Strikes {
                rejected: 0,
                window_end_ns: now.saturating_add(window_ms.saturating_mul(1_000_000)),
            };
        }
        strikes.rejected = strikes.rejected.saturating_add(1);
        Some(strikes.rejected)
    }

    /// The address to ban for this client, if banning it at L3 is right: the
    /// client must be the TCP peer (behind a trusted proxy the kernel sees only
    /// the proxy), and keyed clients only when `ban_keyed_clients` is set.
    fn target(settings: &EscalationSettings, peer: IpAddr, identity: &Identity) -> Option<IpAddr> {
        let peer = peer.to_canonical();
        // A trusted proxy carries many clients: banning it would ban them all,
        // even when the client it names is itself.
        if settings.trusted_proxies.contains(peer) {
            return None;
        }
        match identity {
            // IPv6 identities are grouped by prefix; compare the peer's group.
            Identity::Ip(ip) => (net::group(peer, settings.ipv6_prefix) == *ip).then_some(peer),
            Identity::Key(_) => settings.ban_keyed_clients.then_some(peer),
        }
    }
}

impl RejectionSink for Escalation {
    fn rejected(
        &self,
        peer: IpAddr,
        identity: &Identity,
        decision: &Decision,
        window_ms: u64,
        tier: &str,
    ) {
        let settings = self.settings.load();
        let threshold = settings.threshold(decision.limit);
        // Most rejections of an address are under the threshold: nothing
        // more to do, and no lock taken. A key's are counted per sender
        // below (its own count starts with its first rejection), so they
        // go on.
        if matches!(identity, Identity::Ip(_)) && decision.rejected <= threshold {
            return;
        }
        let Some(addr) = Self::target(&settings, peer, identity) else {
            return;
        };
        let now = monotonic_ns();
        // A key's bucket counts every sender's rejections: the address is
        // banned only for the rejections it sent itself.
        let rejected = match identity {
            Identity::Key(key) => {
                let source = net::group(addr, settings.ipv6_prefix);
                // A table full of live windows (an attack of its own) falls
                // back to the bucket's count, as before the table existed.
                self.keyed_rejections(key, source, window_ms, now)
                    .map_or(decision.rejected, |own| own.min(decision.rejected))
            }
            Identity::Ip(_) => decision.rejected,
        };
        if rejected <= threshold {
            return;
        }
        let seconds = {
            let mut offenders = self
                .offenders
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let offender = offenders.entry(addr).or_insert(Offender {
                offences: 0,
                banned_until_ns: 0,
            });
            if offender.banned_until_ns > now {
                // Requests already in flight when the ban began.
                return;
            }
            offender.offences = offender.offences.saturating_add(1);
            let doubling = 1u64 << (offender.offences - 1).min(20);
            let seconds = settings
                .ban_seconds
                .saturating_mul(doubling)
                .min(settings.max_ban_seconds);
            offender.banned_until_ns = now.saturating_add(seconds.saturating_mul(1_000_000_000));
            seconds
        };
        let cause = BanCause {
            reason: format!("{rejected} requests after 429s in one window"),
            tier: Some(tier),
        };
        match self
            .banner
            .ban(IpNet::from(addr), seconds, settings.ipv6_prefix, cause)
        {
            Ok(net) => {
                self.metrics.escalations.inc();
                tracing::warn!(%net, seconds, rejected, tier, "banned in the kernel for ignoring 429s");
            }
            Err(e) => tracing::error!(%addr, "escalation ban failed: {e}"),
        }
    }
}
