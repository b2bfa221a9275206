//! What a reload replaces: the validated config with the route table, the
//! identity rules and each tier made ready for the hot path (its keyed
//! hash, its counters, its policy name), swapped whole.

use std::{collections::hash_map::RandomState, hash::BuildHasher as _};

use prometheus_client::metrics::counter::Counter;

use super::descriptors::EnvoyRules;
use crate::{
    answers::PolicyName,
    config::{Config, ConfigError, LimitMode},
    identity::{Identity, IdentityResolver},
    metrics::Metrics,
    route::RouteTable,
};

/// The part of the proxy a reload replaces, validated as a whole.
pub struct State {
    pub config: Config,
    pub(super) routes: RouteTable,
    pub(super) identity: IdentityResolver,
    pub(super) tiers: Vec<TierState>,
    /// `[rls] envoy_config` domains.
    pub(super) envoy: Vec<EnvoyRules>,
    pub(super) unlimited: Counter,
}

/// A tier ready for the hot path.
pub(super) struct TierState {
    /// Route and window: the same on every host and across reloads.
    pub(super) id: String,
    /// The route as configured.
    pub(super) route: String,
    /// Keyed hash of `id`, mixed into bucket keys.
    pub(super) hash: u64,
    pub(super) window_ms: u64,
    /// The tier's own limit (key overrides aside).
    pub(super) limit: u32,
    /// `id` of the per-address budget of new key verifications.
    pub(super) verify_id: String,
    /// The IETF fields' quota policy name, when `ietf_headers` is on.
    pub(super) policy: Option<PolicyName>,
    /// Entry in the verified-key cache saying the upstream authenticates this
    /// tier (a 401 or 403 was seen within `verified_key_ttl`); also keys the
    /// verification budget's buckets.
    pub(super) authenticates: u64,
    pub(super) allowed: Counter,
    pub(super) rejected: Counter,
    /// Rejections a tier in observe mode did not send.
    pub(super) would_reject: Counter,
    /// `mode = "observe"`: the dry run.
    pub(super) observe: bool,
    pub(super) store_error: Counter,
}

impl TierState {
    /// `id` names the bucket family on every host (route and window); `route`
    /// labels the tier's counters and the offenders board.
    #[expect(
        clippy::too_many_arguments,
        reason = "one constructor for tiers and envoy nodes"
    )]
    pub(super) fn new(
        id: String,
        route: String,
        limit: u32,
        window_ms: u64,
        mode: LimitMode,
        hasher: &RandomState,
        metrics: &Metrics,
        ietf_headers: bool,
    ) -> Self {
        Self {
            hash: hasher.hash_one(&id),
            limit,
            verify_id: format!("{id}|verify"),
            policy: ietf_headers.then(|| PolicyName::from_route(&route)),
            authenticates: hasher.hash_one((&id, "authenticates")),
            allowed: metrics.request_counter(&route, "allowed"),
            rejected: metrics.request_counter(&route, "rejected"),
            would_reject: metrics.request_counter(&route, "would_reject"),
            observe: mode == LimitMode::Observe,
            store_error: metrics.request_counter(&route, "store_error"),
            id,
            route,
            window_ms,
        }
    }
}

impl State {
    /// The identity rules in force (the listener asks which peers are proxies).
    #[must_use]
    pub fn identity(&self) -> &IdentityResolver {
        &self.identity
    }

    pub(super) fn new(
        config: Config,
        hasher: &RandomState,
        metrics: &Metrics,
    ) -> Result<Self, ConfigError> {
        let routes = config.live.route_table()?;
        let identity = IdentityResolver::new(
            config.live.api_key_headers.clone(),
            config.live.client_ip_header.clone(),
            config.live.trusted_proxies.clone(),
            config.live.ipv6_prefix,
        );
        let ietf = config.live.ietf_headers;
        let tiers = config
            .live
            .tiers
            .iter()
            .map(|tier| {
                let window_ms = u64::try_from(tier.window.as_millis()).unwrap_or(u64::MAX);
                TierState::new(
                    format!("{}|{window_ms}", tier.route),
                    tier.route.clone(),
                    tier.limit.get(),
                    window_ms,
                    tier.mode,
                    hasher,
                    metrics,
                    ietf,
                )
            })
            .collect();
        let envoy = config
            .live
            .rls
            .envoy
            .iter()
            .map(|domain| EnvoyRules::new(domain, hasher, metrics, ietf))
            .collect();
        Ok(Self {
            unlimited: metrics.request_counter("none", "unlimited"),
            config,
            routes,
            identity,
            tiers,
            envoy,
        })
    }

    /// The tier's limit, or the key's override of it.
    pub(super) fn effective_limit(&self, identity: &Identity, tier: usize) -> u32 {
        let base = self.config.live.tiers[tier].limit.get();
        let Identity::Key(hash) = identity else {
            return base;
        };
        let Some(o) = self.config.live.keys.get(hash) else {
            return base;
        };
        if let Some(limit) = o.limits.get(&tier) {
            return limit.get();
        }
        o.multiplier.map_or(base, |m| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "clamped to 1..=u32::MAX before the cast"
            )]
            let scaled = (f64::from(base) * m)
                .round()
                .clamp(1.0, f64::from(u32::MAX)) as u32;
            scaled
        })
    }
}
