//! The operator's live view: `GET /` on the admin listener serves one page
//! embedded in the binary (`dashboard.html`: no external assets, works
//! offline) that polls `/dashboard.json` every two seconds.
//!
//! Cost: allowed requests pay nothing (the page reads counters the proxy keeps
//! anyway); a rejected one notes its client on the [`Offenders`] board (one
//! short lock). A sampler task, off the request path, reads those counters
//! once a second into a ring of the last 15 minutes ([`HISTORY`] samples per
//! series, a few kilobytes per tier). The kernel's bans and attachments are
//! read only when the page asks.

use std::{
    collections::{HashMap, VecDeque, hash_map::RandomState},
    hash::BuildHasher as _,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    admin::StatusReport,
    config::{LimitMode, StoreKind},
    identity::Identity,
    limit::Decision,
    proxy::Proxy,
};

/// Samples kept per series: 15 minutes at one a second.
pub const HISTORY: usize = 900;
/// Between two samples.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Clients the offenders board holds at most.
const OFFENDERS_MAX: usize = 512;
/// Offenders shown.
const OFFENDERS_SHOWN: usize = 10;
/// Samples the "now" rates average over.
const RECENT: usize = 10;
/// The request decisions charted per tier.
const DECISIONS: [&str; 3] = ["allowed", "rejected", "would_reject"];

/// The clients rejected in their current windows, by tier, with the store's
/// own count of their rejections.
#[derive(Default)]
pub struct Offenders {
    /// Keyed by a keyed hash of (route, identity), so a rejection of a client
    /// already on the board allocates nothing.
    clients: Mutex<HashMap<u64, Offender>>,
    hasher: RandomState,
}

#[derive(Clone, Debug)]
struct Offender {
    route: Box<str>,
    /// As shown: the address, or a prefix of the key's hash.
    client: Box<str>,
    rejected: u32,
    limit: u32,
    reset_ms: u64,
}

impl Offenders {
    /// Notes a rejection (or a would-be one) of `identity` on `route`.
    pub fn note(&self, route: &str, identity: &Identity, decision: &Decision, now_ms: u64) {
        let key = self.hasher.hash_one((route, identity));
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = clients.get_mut(&key) {
            known.rejected = decision.rejected;
            known.limit = decision.limit;
            known.reset_ms = decision.reset_ms;
            return;
        }
        if clients.len() >= OFFENDERS_MAX {
            make_room(&mut clients, now_ms);
        }
        let client = match identity {
            // Only a prefix of the key's hash: enough to tell clients apart.
            Identity::Key(sha256) => format!("key {}…", sha256.get(..12).unwrap_or(sha256)),
            Identity::Ip(ip) => ip.to_string(),
        };
        clients.insert(
            key,
            Offender {
                route: route.into(),
                client: client.into(),
                rejected: decision.rejected,
                limit: decision.limit,
                reset_ms: decision.reset_ms,
            },
        );
    }

    /// Drops clients whose window has reset; the top ones by rejections.
    fn top(&self, now_ms: u64) -> Vec<Value> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.retain(|_, o| o.reset_ms > now_ms);
        let mut rows: Vec<&Offender> = clients.values().collect();
        rows.sort_by(|a, b| {
            b.rejected
                .cmp(&a.rejected)
                .then_with(|| (&a.route, &a.client).cmp(&(&b.route, &b.client)))
        });
        rows.into_iter()
            .take(OFFENDERS_SHOWN)
            .map(|o| {
                json!({
                    "client": o.client,
                    "tier": o.route,
                    "rejected": o.rejected,
                    "limit": o.limit,
                    "remaining": 0,
                    "reset_seconds": (o.reset_ms - now_ms).div_ceil(1000),
                })
            })
            .collect()
    }
}

/// A full board forgets the clients whose windows reset and, unless that
/// freed a quarter of it, the half with the fewest rejections at once: a
/// stream of ever-new rejected clients costs a scan per `OFFENDERS_MAX / 4`
/// of them at most, not one each, however their windows are staggered.
fn make_room(clients: &mut HashMap<u64, Offender>, now_ms: u64) {
    clients.retain(|_, o| o.reset_ms > now_ms);
    if clients.len() <= OFFENDERS_MAX - OFFENDERS_MAX / 4 {
        return;
    }
    let mut ranked: Vec<(u32, u64, u64)> = clients
        .iter()
        .map(|(key, o)| (o.rejected, o.reset_ms, *key))
        .collect();
    let half = ranked.len() / 2;
    ranked.select_nth_unstable(half);
    for (_, _, key) in &ranked[..half] {
        clients.remove(key);
    }
}

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
            started: Instant::now(),
            rings: Mutex::new(Rings {
                at: Instant::now(),
                totals: HashMap::new(),
                rates: HashMap::new(),
                samples: 0,
            }),
        }
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
                    "mode": match t.mode {
                        LimitMode::Enforce => "enforce",
                        LimitMode::Observe => "observe",
                    },
                    "rates": rates,
                    "now": now,
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
        .map(|b| json!({ "source": b["net"], "seconds_left": b["seconds_left"], "kind": "ban (escalation or CLI)" }))
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
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn rejected(count: u32, reset_ms: u64) -> Decision {
        Decision {
            allowed: false,
            limit: 5,
            remaining: 0,
            reset_ms,
            rejected: count,
        }
    }

    #[test]
    fn the_board_ranks_current_offenders_hides_keys_and_forgets_reset_windows() {
        let board = Offenders::default();
        let ip = |last| Identity::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)));
        board.note("/a", &ip(1), &rejected(2, 10_000), 0);
        board.note("/a", &ip(1), &rejected(3, 10_000), 0);
        board.note("/a", &ip(2), &rejected(9, 5_000), 0);
        board.note(
            "/b",
            &Identity::Key("ab".repeat(32)),
            &rejected(4, 20_000),
            0,
        );
        let top = board.top(1_000);
        let clients: Vec<_> = top.iter().map(|r| r["client"].as_str().unwrap()).collect();
        assert_eq!(clients, ["192.0.2.2", "key abababababab…", "192.0.2.1"]);
        assert_eq!(top[2]["rejected"], 3, "the store's latest count");
        assert_eq!(top[0]["reset_seconds"], 4);
        // 192.0.2.2's window reset at 5 s.
        assert_eq!(board.top(6_000).len(), 2);
    }

    #[test]
    fn a_full_board_forgets_reset_windows_then_the_least_rejected_half() {
        let board = Offenders::default();
        let ip = |i: usize| Identity::Ip(IpAddr::from(u32::try_from(i).unwrap().to_be_bytes()));
        let shown = |board: &Offenders| -> Vec<String> {
            let clients = board.clients.lock().unwrap();
            clients.values().map(|o| o.client.to_string()).collect()
        };
        // Half of them in windows that reset at 5 s.
        for i in 0..OFFENDERS_MAX {
            let reset = if i % 2 == 0 { 5_000 } else { 10_000 };
            board.note(
                "/a",
                &ip(i),
                &rejected(10 + u32::try_from(i).unwrap(), reset),
                0,
            );
        }
        let newcomer = Identity::Ip(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)));
        board.note("/a", &newcomer, &rejected(1, 10_000), 6_000);
        let left = shown(&board);
        assert_eq!(left.len(), OFFENDERS_MAX / 2 + 1, "the reset windows went");
        assert!(left.contains(&"203.0.113.1".to_owned()));
        assert!(!left.contains(&"0.0.0.0".to_owned()));

        // Full of live windows: the least rejected half goes at once.
        for i in OFFENDERS_MAX..OFFENDERS_MAX * 2 {
            board.note(
                "/a",
                &ip(i),
                &rejected(10 + u32::try_from(i).unwrap(), 10_000),
                6_000,
            );
        }
        let left = shown(&board);
        assert!(left.len() <= OFFENDERS_MAX);
        assert!(
            !left.contains(&"203.0.113.1".to_owned()),
            "the least rejected"
        );
        let most = ip(OFFENDERS_MAX * 2 - 1);
        let Identity::Ip(most) = most else {
            unreachable!()
        };
        assert!(left.contains(&most.to_string()), "the most rejected stays");
    }

    /// Windows that reset one at a time do not turn the halving into a scan
    /// per new client.
    #[test]
    fn one_reset_window_does_not_spare_a_full_board_its_halving() {
        let board = Offenders::default();
        for i in 0..OFFENDERS_MAX {
            let ip = Identity::Ip(IpAddr::from(u32::try_from(i).unwrap().to_be_bytes()));
            let reset = if i == 0 { 5_000 } else { 10_000 };
            board.note("/a", &ip, &rejected(10, reset), 0);
        }
        let newcomer = Identity::Ip(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)));
        board.note("/a", &newcomer, &rejected(1, 10_000), 6_000);
        assert!(board.clients.lock().unwrap().len() <= OFFENDERS_MAX / 2 + 1);
    }

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
