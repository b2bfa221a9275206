//! The operator's live view: `GET /` on the admin listener serves one page
//! embedded in the binary (`dashboard.html`: no external assets, works
//! offline) that polls `/dashboard.json` every two seconds.
//!
//! Cost: allowed requests pay nothing (the page reads counters the proxy keeps
//! anyway); a rejected one notes its client on the offenders board (one
//! short lock). A sampler task, off the request path, reads those counters
//! once a second into a ring of the last 15 minutes ([`HISTORY`] samples per
//! series, a few kilobytes per tier). The kernel's bans and attachments are
//! read only when the page asks.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::status::StatusReport;
use crate::{
    config::{LimitMode, StoreKind},
    limit::Algorithm,
    proxy::Proxy,
};

/// Samples kept per series: 15 minutes at one a second.
pub const HISTORY: usize = 900;
/// Between two samples.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Samples the "now" rates average over.
const RECENT: usize = 10;
/// The request decisions charted per tier.
const DECISIONS: [&str; 5] = [
    "allowed",
    "rejected",
    "would_reject",
    "in_flight_rejected",
    "tokens_rejected",
];

/// The rings of per-second rates, and the totals they are the deltas of.
struct Rings {
    at: Instant,
    totals: HashMap<String, u64>,
    rates: HashMap<String, VecDeque<f64>>,
    samples: usize,
}

impl Rings {
    fn push(&mut self, series: &str, total: u64, seconds: f64) {
        let last = self.totals.insert(series.to_owned(), total);
        let rate = last.map_or(0.0, |last| {
            let delta = total.saturating_sub(last);
            f64::from(u32::try_from(delta).unwrap_or(u32::MAX)) / seconds
        });
        let ring = self.rates.entry(series.to_owned()).or_default();
        if ring.len() == HISTORY {
            ring.pop_front();
        }
        ring.push_back((rate * 10.0).round() / 10.0);
    }

    fn series(&self, name: &str) -> Value {
        self.rates
            .get(name)
            .map_or_else(|| json!([]), |ring| json!(ring))
    }

    fn recent(&self, name: &str) -> f64 {
        self.rates.get(name).map_or(0.0, |ring| {
            let n = ring.len().min(RECENT);
            if n == 0 {
                return 0.0;
            }
            let sum: f64 = ring.iter().rev().take(n).sum();
            (sum / f64::from(u32::try_from(n).unwrap_or(1)) * 10.0).round() / 10.0
        })
    }
}

/// What `/` and `/dashboard.json` serve.
pub struct Dashboard {
    proxy: Arc<Proxy>,
    /// The kernel side's status (bans, attachments), read when the page asks.
    kernel: Option<Arc<dyn StatusReport>>,
    /// The fleet's runtime entries (overrides, bans, changes and who made them).
    fleet: Option<Arc<dyn StatusReport>>,
    started: Instant,
    rings: Mutex<Rings>,
}

/// The page.
pub const PAGE: &str = include_str!("dashboard.html");

impl Dashboard {
    #[must_use]
    pub fn new(proxy: Arc<Proxy>, kernel: Option<Arc<dyn StatusReport>>) -> Self {
        Self {
            proxy,
            kernel,
            fleet: None,
            started: Instant::now(),
            rings: Mutex::new(Rings {
                at: Instant::now(),
                totals: HashMap::new(),
                rates: HashMap::new(),
                samples: 0,
            }),
        }
    }

    /// Shows the fleet's runtime entries.
    #[must_use]
    pub fn with_fleet(mut self, fleet: Arc<dyn StatusReport>) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Takes one sample of every series (the sampler calls it every [`INTERVAL`]).
    pub fn sample(&self) {
        let state = self.proxy.state();
        let metrics = self.proxy.metrics();
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        let seconds = rings.at.elapsed().as_secs_f64().max(0.001);
        rings.at = Instant::now();
        for tier in &state.config.live.tiers {
            for decision in DECISIONS {
                let total = metrics.request_counter(&tier.route, decision).get();
                rings.push(&format!("{}|{decision}", tier.route), total, seconds);
            }
        }
        for (verdict, reason, packets) in metrics.xdp_packets() {
            rings.push(&format!("xdp|{verdict}/{reason}"), packets, seconds);
        }
        rings.samples += 1;
    }

    /// Samples every [`INTERVAL`] until the task is dropped.
    pub async fn run_sampler(self: Arc<Self>) {
        let mut tick = tokio::time::interval(INTERVAL);
        loop {
            tick.tick().await;
            self.sample();
        }
    }

    /// The page's data.
    #[must_use]
    pub fn json(&self) -> Value {
        let state = self.proxy.state();
        let config = &state.config;
        let metrics = self.proxy.metrics();
        let rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        let tiers: Vec<Value> = config
            .live
            .tiers
            .iter()
            .map(|t| {
                let name = |d: &str| format!("{}|{d}", t.route);
                let mut rates = serde_json::Map::new();
                let mut now = serde_json::Map::new();
                for decision in DECISIONS {
                    rates.insert(decision.into(), rings.series(&name(decision)));
                    now.insert(decision.into(), json!(rings.recent(&name(decision))));
                }
                json!({
                    "route": t.route,
                    "limit": t.limit.get(),
                    "window_seconds": t.window.as_secs_f64(),
                    "algorithm": match t.algorithm {
                        Algorithm::Fixed => json!({ "name": "fixed" }),
                        Algorithm::Sliding => json!({ "name": "sliding" }),
                        Algorithm::Gcra { burst } => json!({ "name": "gcra", "burst": burst }),
                    },
                    "mode": match t.mode {
                        LimitMode::Enforce => "enforce",
                        LimitMode::Observe => "observe",
                    },
                    "rates": rates,
                    "now": now,
                    "in_flight": t.max_in_flight.map(|max| json!({
                        "max": max.get(),
                        "now": metrics.in_flight_gauge(&t.route).get(),
                    })),
                    "tokens": t.tokens.as_ref().map(|b| json!({
                        "limit": b.limit.get(),
                        "window_seconds": b.window.as_secs_f64(),
                    })),
                })
            })
            .collect();
        let mut verdicts = serde_json::Map::new();
        for (name, ring) in &rings.rates {
            if let Some(verdict) = name.strip_prefix("xdp|")
                && ring.iter().any(|r| *r > 0.0)
            {
                verdicts.insert(verdict.to_owned(), json!(ring));
            }
        }
        let samples = rings.samples;
        drop(rings);
        let reloads = |result| {
            metrics
                .reloads
                .get_or_create(&crate::metrics::ReloadLabels { result })
                .get()
        };
        let kernel = self.kernel.as_ref().map(|k| k.report());
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "interval_seconds": INTERVAL.as_secs(),
            "samples": samples,
            "store": {
                "kind": match config.startup.store {
                    StoreKind::Memory => "memory",
                    StoreKind::Redis(_) => "redis",
                },
                "healthy": metrics.store_healthy.get() == 1,
                "errors": metrics.store_errors.get(),
                "buckets": metrics.buckets.get(),
            },
            "reloads": { "ok": reloads("ok"), "error": reloads("error") },
            "escalations": metrics.escalations.get(),
            "tiers": tiers,
            "offenders": self.proxy.offenders().top(self.proxy.now_ms()),
            "fleet": self.fleet.as_ref().map(|f| f.report()),
            "xdp": kernel.map(|k| json!({
                "instance": k["instance"],
                "mode": k["mode"],
                "attachments": k["attachments"],
                "bans": bans(&k),
                "verdicts": verdicts,
            })),
        })
    }
}

/// Active bans: the ban trie's (escalations, `limiter-agent ban`) and the
/// kernel's own auto-bans of the busiest sources.
fn bans(kernel: &Value) -> Vec<Value> {
    let mut out: Vec<Value> = kernel["bans"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["seconds_left"].as_u64().unwrap_or(0) > 0)
        .map(|b| {
            let kind = match (b["origin"].as_str(), b["by"].as_str()) {
                (Some(origin), Some(by)) => format!("ban from {origin} by {by}"),
                _ => "ban (this host's CLI)".to_owned(),
            };
            json!({
                "source": b["net"],
                "seconds_left": b["seconds_left"],
                "kind": kind,
                "origin": b["origin"],
                "reason": b["reason"],
            })
        })
        .collect();
    out.extend(
        kernel["top_sources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["autoban_seconds_left"].as_u64().unwrap_or(0) > 0)
            .map(|s| {
                json!({
                    "source": s["addr"],
                    "seconds_left": s["autoban_seconds_left"],
                    "kind": "kernel auto-ban",
                })
            }),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_turn_totals_into_rates_and_keep_fifteen_minutes() {
        let mut rings = Rings {
            at: Instant::now(),
            totals: HashMap::new(),
            rates: HashMap::new(),
            samples: 0,
        };
        rings.push("s", 100, 1.0);
        rings.push("s", 130, 1.0);
        rings.push("s", 150, 2.0);
        assert_eq!(rings.series("s"), json!([0.0, 30.0, 10.0]));
        assert!((rings.recent("s") - 13.3).abs() < 1e-9);
        for i in 0..2 * HISTORY {
            rings.push("s", 150 + u64::try_from(i).unwrap(), 1.0);
        }
        assert_eq!(rings.rates["s"].len(), HISTORY);
    }
}
