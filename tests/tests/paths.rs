//! The path-spelling differential suite: real routers nobody here wrote
//! (Express 5, Starlette, Flask, nginx; `tests/routers/`) as the agent's
//! upstream, and hundreds of spellings per reference tier sent as raw bytes
//! (`limiter_tests::spellings`). For each spelling sent through the agent:
//! either the agent refused it (400), or the tier it counted it in (read off
//! `X-RateLimit-Limit`, distinct per tier) is the route the router served.
//! A router serving tier R for a spelling we counted in no tier is an escape;
//! in another tier, a misroute. Either fails the test.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{agent, tier},
    http::{self, Response},
    routers::Router,
    spellings::{self, BASES, Spelling, TIERS},
};

/// Tier `i` gets limit `BASE_LIMIT + i`, so `X-RateLimit-Limit` names the tier
/// a request was counted in; no run comes near any of them.
const BASE_LIMIT: usize = 100_001;

/// The reference table with a distinct limit per tier, XDP off.
fn config() -> String {
    let mut config = "[server]\nlisten = \"127.0.0.1:1\"\n\n[xdp]\nenabled = false\n".to_owned();
    for (i, (_, route)) in TIERS.iter().enumerate() {
        config.push_str(&tier(route, BASE_LIMIT + i, "1m"));
    }
    config
}

/// What came back for one spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// The tier whose handler answered (the router's `route=<tier>` body).
    route: Option<usize>,
    /// The tier the agent counted the request in (`X-RateLimit-Limit`).
    counted: Option<usize>,
    /// The agent (or hyper, before it) answered 400 itself: never forwarded.
    refused: bool,
}

/// Sends `GET target` as raw bytes, so no client normalises it, and reads the answer up to its
/// `Content-Length` (not to the close: Werkzeug's server lingers ~10 ms before closing).
fn exchange(addr: SocketAddr, target: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let request = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    http::read_response(&mut stream)
        .unwrap_or_else(|e| panic!("{addr} {target:?}: no answer ({e})"))
}

fn ask(addr: SocketAddr, target: &str) -> Answer {
    let response = Response::parse(&exchange(addr, target));
    let counted = response.header("x-ratelimit-limit").map(|value| {
        let limit: usize = value.parse().expect("numeric X-RateLimit-Limit");
        let tier = limit.checked_sub(BASE_LIMIT).filter(|&t| t < TIERS.len());
        tier.unwrap_or_else(|| panic!("{target:?}: X-RateLimit-Limit {limit} is no tier's"))
    });
    let body = response.body.as_str();
    let route = body.trim().strip_prefix("route=").map(|name| {
        TIERS
            .iter()
            .position(|(tier, _)| *tier == name)
            .unwrap_or_else(|| panic!("{target:?}: a router answered route={name}"))
    });
    let status = response.status;
    // Ours is a JSON `BAD_REQUEST`; hyper's own (a target it cannot parse) has no body,
    // and no answer at all is a refusal too. The routers' 400s have bodies of their own.
    let refused = route.is_none()
        && (status == 0
            || (status == 400 && (body.is_empty() || body.contains("\"code\":\"BAD_REQUEST\""))));
    Answer {
        status,
        route,
        counted,
        refused,
    }
}

#[derive(Debug, Default)]
struct Tally {
    spellings: usize,
    /// Asked directly, the router served it as a tier.
    served: usize,
    /// Of those, refused by the agent.
    served_refused: usize,
    /// Refused by the agent, all spellings.
    refused: usize,
    /// Counted in a tier the router did not serve it as (none: a 404, a redirect). Harmless:
    /// the client is charged for a request that reached no tier's handler.
    over_counted: usize,
    escapes: Vec<String>,
    misroutes: Vec<String>,
    elapsed: Duration,
}

impl Tally {
    fn merge(mut self, other: Tally) -> Tally {
        self.spellings += other.spellings;
        self.served += other.served;
        self.served_refused += other.served_refused;
        self.refused += other.refused;
        self.over_counted += other.over_counted;
        self.escapes.extend(other.escapes);
        self.misroutes.extend(other.misroutes);
        self
    }
}

/// Client threads per router: the routers answer concurrently, and the run is latency-bound.
const CLIENTS: usize = 4;

/// Sends every spelling to the router directly and through an agent in front of it.
fn run(router: Router, spellings: &[Spelling]) -> Tally {
    let started = Instant::now();
    let upstream = router.start();
    let agent = agent(&config(), Some(upstream.addr), &[]);
    // The plain paths must work, or every count below is meaningless.
    for &(tier, path) in BASES {
        let answer = ask(agent.addr, path);
        assert!(
            answer.route == Some(tier) && answer.counted == Some(tier),
            "{}: {path} must be served and counted as {}; got {answer:?}\nrouter log:\n{}\nagent log:\n{}",
            router.name(),
            TIERS[tier].0,
            upstream.log(),
            agent.log()
        );
    }
    let (direct, through) = (upstream.addr, agent.addr);
    let mut tally = std::thread::scope(|scope| {
        let chunks: Vec<_> = spellings
            .chunks(spellings.len().div_ceil(CLIENTS))
            .map(|chunk| scope.spawn(move || check(chunk, direct, through)))
            .collect();
        chunks
            .into_iter()
            .map(|chunk| {
                chunk
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
            .fold(Tally::default(), Tally::merge)
    });
    tally.elapsed = started.elapsed();
    tally
}

/// Sends each spelling to the router (`direct`) and through the agent, and tallies the answers.
fn check(spellings: &[Spelling], direct: SocketAddr, agent: SocketAddr) -> Tally {
    let name = |tier: Option<usize>| tier.map_or("none", |t| TIERS[t].0);
    let mut tally = Tally::default();
    for spelling in spellings {
        let target = spelling.target.as_str();
        let direct = ask(direct, target);
        let through = ask(agent, target);
        tally.spellings += 1;
        if direct.route.is_some() {
            tally.served += 1;
            tally.served_refused += usize::from(through.refused);
        }
        tally.refused += usize::from(through.refused);
        let line = || {
            format!(
                "{target:?}: served as {}, counted in {} (status {}; asked directly: {})",
                name(through.route),
                name(through.counted),
                through.status,
                name(direct.route)
            )
        };
        match (through.route, through.counted) {
            (Some(_), None) => tally.escapes.push(line()),
            (Some(route), Some(counted)) if route != counted => tally.misroutes.push(line()),
            (None, Some(_)) => tally.over_counted += 1,
            _ => {}
        }
        assert!(
            !(through.refused && through.counted.is_some()),
            "{target:?}: refused and counted"
        );
    }
    tally
}

#[test]
fn every_spelling_a_router_serves_as_a_tier_is_counted_there_or_refused() {
    let started = Instant::now();
    let spellings = spellings::all();
    for (tier, (name, _)) in TIERS.iter().enumerate() {
        let n = spellings.iter().filter(|s| s.from_tier == tier).count();
        assert!(n >= 200, "only {n} spellings of {name}");
    }
    let tallies: Vec<(Router, Tally)> = std::thread::scope(|scope| {
        let runs: Vec<_> = Router::ALL
            .into_iter()
            .map(|router| {
                let spellings = &spellings;
                (router, scope.spawn(move || run(router, spellings)))
            })
            .collect();
        runs.into_iter()
            .map(|(router, run)| {
                let tally = run.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                (router, tally)
            })
            .collect()
    });
    let mut report = format!(
        "path spellings through the agent ({} in {:.1?}):\n{:<10} {:>9} {:>7} {:>15} {:>8} {:>12} {:>8} {:>10} {:>7}\n",
        spellings.len(),
        started.elapsed(),
        "router",
        "spellings",
        "served",
        "served+refused",
        "refused",
        "over-counted",
        "escapes",
        "misroutes",
        "time"
    );
    let mut failures = String::new();
    for (router, tally) in &tallies {
        writeln!(
            report,
            "{:<10} {:>9} {:>7} {:>15} {:>8} {:>12} {:>8} {:>10} {:>6.1?}",
            router.name(),
            tally.spellings,
            tally.served,
            tally.served_refused,
            tally.refused,
            tally.over_counted,
            tally.escapes.len(),
            tally.misroutes.len(),
            tally.elapsed
        )
        .expect("writing to a String");
        for line in tally
            .misroutes
            .iter()
            .take(20)
            .chain(tally.escapes.iter().take(20))
        {
            writeln!(failures, "  {}: {line}", router.name()).expect("writing to a String");
        }
    }
    // Always shown (the test harness captures print!, not writes to stderr itself).
    let _ = std::io::stderr().write_all(report.as_bytes());
    for (router, tally) in &tallies {
        assert!(
            tally.served > 500,
            "{} served only {} spellings as a tier: is it routing?",
            router.name(),
            tally.served
        );
    }
    assert!(
        failures.is_empty(),
        "spellings that a router serves as a tier escaped it:\n{report}{failures}"
    );
}
