//! Prometheus metrics: request decisions per tier, latency histograms, store
//! health, reloads, and (when the kernel side is attached) the XDP counters,
//! read from the maps at scrape time.

use std::sync::{Arc, OnceLock};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of `limiter_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The tier's route, or `none` for unmatched paths.
    pub tier: String,
    /// `allowed`, `rejected` (429), `unlimited` (no tier), `store_error`
    /// (503), `in_flight_rejected` (429, `max_in_flight`) or
    /// `tokens_rejected` (429, the token budget); `would_reject` in a dry run.
    pub decision: &'static str,
}

/// Labels of `limiter_tier_in_flight`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: String,
}

/// Labels of `limiter_tokens_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub tier: String,
    /// `reserved` at admission; `refunded` or `charged` when settled (what
    /// the answer's usage came to below or above the reservation); `used`,
    /// the usage answers reported.
    pub kind: &'static str,
}

/// Labels of `limiter_requests_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `path` (a spelling routers disagree on), `api_key` (conflicting or
    /// malformed key headers), `client_address` (a forwarding hop that is not an
    /// address), `store_full` (no room for a new bucket), `descriptor` (an
    /// Envoy descriptor entry that is not UTF-8), or a cap on what clients
    /// hold: `max_requests_in_flight_per_source`, `max_requests_in_flight`,
    /// `max_upstream_connections` (503, no upstream connection freed within
    /// `upstream_wait`).
    pub reason: &'static str,
}

/// Labels of `limiter_rls_calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RlsCallLabels {
    /// The overall code answered (`ok`, `over_limit`, `no_limit` when no
    /// descriptor matched a limit), or the gRPC error
    /// (`invalid_argument`, `unavailable`, `permission_denied`).
    pub code: &'static str,
}

/// Labels of `limiter_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of `limiter_connections_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionRefusedLabels {
    /// The setting whose cap was reached: `max_connections`,
    /// `max_connections_per_source` or `max_connections_per_proxy`.
    pub cap: &'static str,
}

/// Labels of `limiter_answers_cut_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CutLabels {
    /// The setting whose deadline passed: `send_timeout` (an answer the
    /// client stopped taking).
    pub reason: &'static str,
}

/// What the kernel side reports at scrape time.
pub trait KernelStats: Send + Sync + std::fmt::Debug + 'static {
    /// `(verdict, reason, packets)` summed over CPUs.
    fn xdp_packets(&self) -> Vec<(&'static str, &'static str, u64)>;
    /// Ban entries whose deadline has not passed.
    fn bans_active(&self) -> u64;
}

/// Every metric the agent exports. Cheap handles: clones share the values.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub decision_seconds: Histogram,
    pub upstream_seconds: Histogram,
    pub store_errors: Counter,
    pub store_healthy: Gauge,
    pub buckets: Gauge,
    pub upstream_idle: Gauge,
    pub upstream_open: Gauge,
    pub reloads: Family<ReloadLabels, Counter>,
    pub connections_refused: Family<ConnectionRefusedLabels, Counter>,
    pub answers_cut: Family<CutLabels, Counter>,
    pub escalations: Counter,
    pub refused: Family<RefusedLabels, Counter>,
    pub rls_calls: Family<RlsCallLabels, Counter>,
    pub tier_in_flight: Family<TierLabels, Gauge>,
    pub tokens: Family<TokenLabels, Counter>,
    kernel: Arc<OnceLock<Arc<dyn KernelStats>>>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    #[expect(
        clippy::too_many_lines,
        reason = "one registration per metric, each beside its help text"
    )]
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "limiter_requests",
            "Requests by tier and decision",
            requests.clone(),
        );
        // 10 µs .. ~80 ms: decisions are microseconds in memory, a round trip with Redis.
        let decision_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 14));
        registry.register(
            "limiter_decision_duration_seconds",
            "Time to decide one request (store lookup included)",
            decision_seconds.clone(),
        );
        // 100 µs .. ~52 s: until the upstream's response headers.
        let upstream_seconds = Histogram::new(exponential_buckets(0.000_1, 2.0, 20));
        registry.register(
            "limiter_upstream_duration_seconds",
            "Time until the upstream's response headers",
            upstream_seconds.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "limiter_store_errors",
            "Store calls that failed or timed out",
            store_errors.clone(),
        );
        let store_healthy = Gauge::default();
        store_healthy.set(1);
        registry.register(
            "limiter_store_healthy",
            "1 when the store answers, 0 while it is down",
            store_healthy.clone(),
        );
        let buckets = Gauge::default();
        registry.register(
            "limiter_buckets",
            "Live buckets held in this agent's memory",
            buckets.clone(),
        );
        let upstream_open = Gauge::default();
        registry.register(
            "limiter_upstream_connections_open",
            "Upstream connections open, busy and idle (at most max_upstream_connections)",
            upstream_open.clone(),
        );
        let upstream_idle = Gauge::default();
        registry.register(
            "limiter_upstream_connections_idle",
            "Upstream connections open and idle, kept for the next request",
            upstream_idle.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "limiter_config_reloads",
            "Config reloads (SIGHUP) by result",
            reloads.clone(),
        );
        let connections_refused = Family::<ConnectionRefusedLabels, Counter>::default();
        registry.register(
            "limiter_connections_refused",
            "Connections answered 503 because a connection cap was reached, by cap",
            connections_refused.clone(),
        );
        let answers_cut = Family::<CutLabels, Counter>::default();
        registry.register(
            "limiter_answers_cut",
            "Answers cut because a deadline passed (HTTP/1: with their connection; HTTP/2: the stream), by reason",
            answers_cut.clone(),
        );
        let escalations = Counter::default();
        registry.register(
            "limiter_escalations",
            "Sources banned in the kernel for ignoring 429s",
            escalations.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "limiter_requests_refused",
            "Requests refused before a decision (400 or 503), by reason",
            refused.clone(),
        );
        let rls_calls = Family::<RlsCallLabels, Counter>::default();
        registry.register(
            "limiter_rls_calls",
            "Envoy rate limit service calls, by the code answered",
            rls_calls.clone(),
        );
        let tier_in_flight = Family::<TierLabels, Gauge>::default();
        registry.register(
            "limiter_tier_in_flight",
            "Requests this agent has in flight on tiers with max_in_flight, by tier",
            tier_in_flight.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "limiter_tokens",
            "Tokens of tiers with a token budget, by tier and kind (reserved, refunded, charged, used)",
            tokens.clone(),
        );
        let kernel: Arc<OnceLock<Arc<dyn KernelStats>>> = Arc::default();
        registry.register_collector(Box::new(KernelCollector(kernel.clone())));
        Self {
            requests,
            decision_seconds,
            upstream_seconds,
            store_errors,
            store_healthy,
            buckets,
            upstream_idle,
            upstream_open,
            reloads,
            connections_refused,
            answers_cut,
            escalations,
            refused,
            rls_calls,
            tier_in_flight,
            tokens,
            kernel,
            registry: Arc::new(registry),
        }
    }

    /// The counter for one tier and decision (resolve once, keep the handle).
    #[must_use]
    pub fn request_counter(&self, tier: &str, decision: &'static str) -> Counter {
        self.requests
            .get_or_create(&RequestLabels {
                tier: tier.to_owned(),
                decision,
            })
            .clone()
    }

    /// The in-flight gauge of one tier (resolve once, keep the handle).
    #[must_use]
    pub fn in_flight_gauge(&self, tier: &str) -> Gauge {
        self.tier_in_flight
            .get_or_create(&TierLabels {
                tier: tier.to_owned(),
            })
            .clone()
    }

    /// The token counter of one tier and kind (resolve once, keep the handle).
    #[must_use]
    pub fn token_counter(&self, tier: &str, kind: &'static str) -> Counter {
        self.tokens
            .get_or_create(&TokenLabels {
                tier: tier.to_owned(),
                kind,
            })
            .clone()
    }

    /// Counts one request refused before a decision.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// Counts one rate limit service call by the code answered.
    pub fn rls_call(&self, code: &'static str) {
        self.rls_calls.get_or_create(&RlsCallLabels { code }).inc();
    }

    /// Counts a connection refused by the cap named `cap` (its setting).
    pub fn connection_refused(&self, cap: &'static str) {
        self.connections_refused
            .get_or_create(&ConnectionRefusedLabels { cap })
            .inc();
    }

    /// Counts an answer cut because the deadline named `reason` passed.
    pub fn answer_cut(&self, reason: &'static str) {
        self.answers_cut.get_or_create(&CutLabels { reason }).inc();
    }

    /// Adds the kernel counters to every later scrape (once; later calls are ignored).
    /// The kernel's `(verdict, reason, packets)` counters; empty without it.
    #[must_use]
    pub fn xdp_packets(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.kernel
            .get()
            .map(|k| k.xdp_packets())
            .unwrap_or_default()
    }

    pub fn set_kernel(&self, stats: Arc<dyn KernelStats>) {
        let _ = self.kernel.set(stats);
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the kernel counters at scrape time.
#[derive(Debug)]
struct KernelCollector(Arc<OnceLock<Arc<dyn KernelStats>>>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XdpLabels {
    verdict: &'static str,
    reason: &'static str,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = self.0.get() else {
            return Ok(());
        };
        let packets = stats.xdp_packets();
        let mut family = encoder.encode_descriptor(
            "limiter_xdp_packets",
            "Packets seen by the XDP program, by verdict and reason (all CPUs)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (verdict, reason, value) in packets {
            let labels = XdpLabels { verdict, reason };
            let metric = family.encode_family(&labels)?;
            ConstCounter::new(value).encode(metric)?;
        }
        let bans = ConstGauge::new(i64::try_from(stats.bans_active()).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "limiter_bans_active",
            "Kernel bans in force",
            None,
            bans.metric_type(),
        )?;
        bans.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl KernelStats for Fixed {
        fn xdp_packets(&self) -> Vec<(&'static str, &'static str, u64)> {
            vec![("drop", "banned", 7), ("pass", "api", 3)]
        }

        fn bans_active(&self) -> u64 {
            2
        }
    }

    #[test]
    fn exposition_has_the_design_names() {
        let metrics = Metrics::new();
        metrics.request_counter("/api/chat", "allowed").inc();
        metrics.request_counter("/api/chat", "rejected").inc_by(2);
        metrics.store_errors.inc();
        metrics.connection_refused("max_connections_per_source");
        let text = metrics.encode();
        assert!(
            text.contains(r#"limiter_requests_total{tier="/api/chat",decision="allowed"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"limiter_requests_total{tier="/api/chat",decision="rejected"} 2"#),
            "{text}"
        );
        assert!(text.contains("limiter_store_errors_total 1"), "{text}");
        assert!(
            text.contains(
                r#"limiter_connections_refused_total{cap="max_connections_per_source"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("limiter_decision_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            !text.contains("limiter_xdp_packets"),
            "no kernel side yet: {text}"
        );
        metrics.set_kernel(Arc::new(Fixed));
        let text = metrics.encode();
        assert!(
            text.contains(r#"limiter_xdp_packets_total{verdict="drop",reason="banned"} 7"#),
            "{text}"
        );
        assert!(text.contains("limiter_bans_active 2"), "{text}");
    }
}
