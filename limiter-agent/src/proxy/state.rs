//! What a reload replaces: the validated config with the route table, the
//! identity rules and each tier made ready for the hot path (its keyed
//! hash, its counters, its policy name), swapped whole.

use std::{collections::hash_map::RandomState, hash::BuildHasher as _, num::NonZeroU32};

use http::HeaderName;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};

use super::{descriptors::EnvoyRules, runtime::Runtime};
use crate::{
    answers::PolicyName,
    config::{Config, ConfigError, LimitMode, Tier, TokenBudget},
    identity::{Identity, IdentityResolver},
    limit::Algorithm,
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
    /// The configured upstream's authority (`host[:port]`), read once.
    pub(super) upstream_authority: Box<str>,
    /// `host:port` to connect to (port 80 when the upstream names none).
    pub(super) connect_to: Box<str>,
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
    /// Requests of one client in flight at once (`max_in_flight`).
    pub(super) max_in_flight: Option<u32>,
    /// This agent's requests in flight on the tier, when it caps them.
    pub(super) in_flight: Gauge,
    pub(super) in_flight_rejected: Counter,
    /// Units one request is charged at admission.
    pub(super) cost: u32,
    /// The answer header the upstream reports a request's cost in.
    pub(super) cost_header: Option<HeaderName>,
    pub(super) tokens: Option<Box<TokenState>>,
    /// How the buckets count, the burst for the tier's own `limit`.
    pub(super) algorithm: Algorithm,
}

/// A tier's token budget, ready for the hot path.
pub(super) struct TokenState {
    /// The budget's buckets' name on every host: the tier's and its window.
    pub(super) id: String,
    /// Keyed hash of `id`.
    pub(super) hash: u64,
    pub(super) window_ms: u64,
    pub(super) budget: TokenBudget,
    /// The IETF fields' second policy item.
    pub(super) policy: Option<PolicyName>,
    pub(super) rejected: Counter,
    pub(super) reserved: Counter,
    pub(super) refunded: Counter,
    pub(super) charged: Counter,
    pub(super) used: Counter,
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
            max_in_flight: None,
            in_flight: Gauge::default(),
            in_flight_rejected: metrics.request_counter(&route, "in_flight_rejected"),
            cost: 1,
            cost_header: None,
            tokens: None,
            algorithm: Algorithm::Fixed,
            id,
            route,
            window_ms,
        }
    }
}

impl TierState {
    /// The algorithm for a client whose limit is `limit`: a GCRA burst
    /// scaled as its limit is from the tier's (a key's override), rounded
    /// up, and never below the tier's cost (a request must fit).
    pub(super) fn algorithm_for(&self, limit: u32) -> Algorithm {
        match self.algorithm {
            Algorithm::Gcra { burst } if limit != self.limit => {
                let scaled =
                    (u64::from(burst) * u64::from(limit)).div_ceil(u64::from(self.limit.max(1)));
                Algorithm::Gcra {
                    burst: u32::try_from(scaled)
                        .unwrap_or(u32::MAX)
                        .max(self.cost.max(1)),
                }
            }
            other => other,
        }
    }

    /// Takes a configured tier's in-flight cap, cost and token budget.
    fn weighed(mut self, tier: &Tier, hasher: &RandomState, metrics: &Metrics, ietf: bool) -> Self {
        self.algorithm = tier.algorithm;
        self.max_in_flight = tier.max_in_flight.map(NonZeroU32::get);
        if self.max_in_flight.is_some() {
            self.in_flight = metrics.in_flight_gauge(&self.route);
        }
        self.cost = tier.cost.get();
        self.cost_header.clone_from(&tier.cost_header);
        self.tokens = tier.tokens.as_ref().map(|budget| {
            let window_ms = u64::try_from(budget.window.as_millis()).unwrap_or(u64::MAX);
            let id = format!("{}|tokens|{window_ms}", self.id);
            let route = &self.route;
            Box::new(TokenState {
                hash: hasher.hash_one(&id),
                id,
                window_ms,
                budget: budget.clone(),
                policy: ietf.then(|| PolicyName::from_route(&format!("{route}/tokens"))),
                rejected: metrics.request_counter(route, "tokens_rejected"),
                reserved: metrics.token_counter(route, "reserved"),
                refunded: metrics.token_counter(route, "refunded"),
                charged: metrics.token_counter(route, "charged"),
                used: metrics.token_counter(route, "used"),
            })
        });
        self
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
                // Buckets of another algorithm hold another state: another name.
                let algorithm = match tier.algorithm {
                    Algorithm::Fixed => String::new(),
                    Algorithm::Sliding => "|sliding".into(),
                    // Not the burst: a changed burst (or limit, which it
                    // defaults to) keeps the buckets, their TATs held
                    // within the new burst when read.
                    Algorithm::Gcra { .. } => "|gcra".into(),
                };
                TierState::new(
                    format!("{}|{window_ms}{algorithm}", tier.route),
                    tier.route.clone(),
                    tier.limit.get(),
                    window_ms,
                    tier.mode,
                    hasher,
                    metrics,
                    ietf,
                )
                .weighed(tier, hasher, metrics, ietf)
            })
            .collect();
        let envoy = config
            .live
            .rls
            .envoy
            .iter()
            .map(|domain| EnvoyRules::new(domain, hasher, metrics, ietf))
            .collect();
        let upstream = &config.live.upstream;
        let upstream_authority: Box<str> = upstream
            .authority()
            .map_or("127.0.0.1", http::uri::Authority::as_str)
            .into();
        let connect_to = match (upstream.port(), upstream.host()) {
            (None, Some(host)) => format!("{host}:80").into(),
            _ => upstream_authority.clone(),
        };
        Ok(Self {
            unlimited: metrics.request_counter("none", "unlimited"),
            upstream_authority,
            connect_to,
            config,
            routes,
            identity,
            tiers,
            envoy,
        })
    }

    /// The tier's limit, or the key's override of it, never below the
    /// tier's cost (a request must fit).
    pub(super) fn effective_limit(
        &self,
        runtime: &Runtime,
        identity: &Identity,
        tier: usize,
    ) -> u32 {
        let t = &self.config.live.tiers[tier];
        self.override_limit(runtime, identity, tier)
            .map_or(t.limit.get(), |limit| limit.max(t.cost.get()))
    }

    /// The key's override of the tier's limit, if it has one: a runtime
    /// override in force replaces the key's `[[key]]` entry.
    fn override_limit(&self, runtime: &Runtime, identity: &Identity, tier: usize) -> Option<u32> {
        let base = self.config.live.tiers[tier].limit.get();
        let Identity::Key(hash) = identity else {
            return None;
        };
        let multiplier = if let Some(o) = runtime.overrides.get(hash).filter(|o| o.live()) {
            if let Some(limit) = o.limits.get(&self.tiers[tier].route) {
                return Some(limit.get());
            }
            o.multiplier
        } else {
            let o = self.config.live.keys.get(hash)?;
            if let Some(limit) = o.limits.get(&tier) {
                return Some(limit.get());
            }
            o.multiplier
        };
        multiplier.map(|m| {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(limit: u32, algorithm: Algorithm) -> TierState {
        let mut tier = TierState::new(
            "/api|60000".into(),
            "/api".into(),
            limit,
            60_000,
            LimitMode::Enforce,
            &RandomState::new(),
            &Metrics::default(),
            false,
        );
        tier.algorithm = algorithm;
        tier
    }

    #[test]
    fn a_keys_override_scales_the_gcra_burst_with_its_limit() {
        let gcra = tier(60, Algorithm::Gcra { burst: 10 });
        assert_eq!(gcra.algorithm_for(60), Algorithm::Gcra { burst: 10 });
        assert_eq!(gcra.algorithm_for(600), Algorithm::Gcra { burst: 100 });
        assert_eq!(
            gcra.algorithm_for(57),
            Algorithm::Gcra { burst: 10 },
            "rounded up"
        );
        assert_eq!(
            gcra.algorithm_for(3),
            Algorithm::Gcra { burst: 1 },
            "at least 1"
        );
        let mut costly = tier(100, Algorithm::Gcra { burst: 10 });
        costly.cost = 10;
        assert_eq!(
            costly.algorithm_for(50),
            Algorithm::Gcra { burst: 10 },
            "never below the cost"
        );
        let huge = tier(1, Algorithm::Gcra { burst: u32::MAX });
        assert_eq!(
            huge.algorithm_for(u32::MAX),
            Algorithm::Gcra { burst: u32::MAX }
        );
        let sliding = tier(60, Algorithm::Sliding);
        assert_eq!(sliding.algorithm_for(600), Algorithm::Sliding);
    }
}
