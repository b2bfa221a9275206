//! Escalation: a client that keeps sending after its 429s is banned in the
//! kernel at the API ports, for `ban_seconds`, doubling with each repeat
//! offence up to `max_ban_seconds`.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use ipnet::IpNet;

use super::{Kernel, monotonic_ns, sync::escalation_threshold};
use crate::{
    config::Config, identity::Identity, limit::Decision, metrics::Metrics, proxy::RejectionSink,
};

/// Offenders are forgotten this long after their last ban ended.
const FORGET_AFTER_NS: u64 = 3600 * 1_000_000_000;

#[derive(Clone, Copy, Debug)]
struct Offender {
    offences: u32,
    banned_until_ns: u64,
}

/// The [`RejectionSink`] that bans sources in the kernel.
pub struct Escalation {
    kernel: Arc<Kernel>,
    metrics: Metrics,
    /// The config a reload can change; shared so a rejection takes a
    /// reference count, not a copy of the whole config.
    settings: Mutex<Arc<Config>>,
    offenders: Mutex<HashMap<IpAddr, Offender>>,
}

impl Escalation {
    #[must_use]
    pub fn new(kernel: Arc<Kernel>, config: &Config, metrics: Metrics) -> Self {
        Self {
            kernel,
            metrics,
            settings: Mutex::new(Arc::new(config.clone())),
            offenders: Mutex::default(),
        }
    }

    /// Takes the thresholds and ban lengths of a reloaded config.
    pub fn update(&self, config: &Config) {
        *self.settings.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(config.clone());
    }

    /// Forgets offenders whose last ban ended long ago.
    pub fn housekeeping(&self) {
        let now = monotonic_ns();
        self.offenders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, o| o.banned_until_ns.saturating_add(FORGET_AFTER_NS) > now);
    }

    /// The address to ban for this client, if banning it at L3 is right: the
    /// client must be the TCP peer (behind a trusted proxy the kernel sees only
    /// the proxy), and keyed clients only when `ban_keyed_clients` is set.
    fn target(config: &Config, peer: IpAddr, identity: &Identity) -> Option<IpAddr> {
        let peer = peer.to_canonical();
        // A trusted proxy carries many clients: banning it would ban them all,
        // even when the client it names is itself.
        if config.trusted_proxies.iter().any(|n| n.contains(&peer)) {
            return None;
        }
        match identity {
            Identity::Ip(ip) => {
                // IPv6 identities are grouped by prefix; compare the peer's group.
                let grouped = match peer {
                    IpAddr::V6(_) => {
                        IpNet::new(peer, config.ipv6_prefix).map_or(peer, |n| n.trunc().addr())
                    }
                    IpAddr::V4(_) => peer,
                };
                (grouped == *ip).then_some(peer)
            }
            Identity::Key(_) => config.xdp.ban_keyed_clients.then_some(peer),
        }
    }
}

impl RejectionSink for Escalation {
    fn rejected(&self, peer: IpAddr, identity: &Identity, decision: &Decision, _window_ms: u64) {
        let config = Arc::clone(&self.settings.lock().unwrap_or_else(PoisonError::into_inner));
        if decision.rejected <= escalation_threshold(&config, decision.limit) {
            return;
        }
        let Some(addr) = Self::target(&config, peer, identity) else {
            return;
        };
        let now = monotonic_ns();
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
            let seconds = config
                .xdp
                .ban_seconds
                .saturating_mul(doubling)
                .min(config.xdp.max_ban_seconds);
            offender.banned_until_ns = now.saturating_add(seconds.saturating_mul(1_000_000_000));
            seconds
        };
        let until = now.saturating_add(seconds.saturating_mul(1_000_000_000));
        match self
            .kernel
            .maps()
            .ban(IpNet::from(addr), until, config.ipv6_prefix)
        {
            Ok(net) => {
                self.metrics.escalations.inc();
                tracing::warn!(%net, seconds, rejected = decision.rejected, "banned in the kernel for ignoring 429s");
            }
            Err(e) => tracing::error!(%addr, "escalation ban failed: {e}"),
        }
    }
}
