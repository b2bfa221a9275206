//! What several hosts promise, under faults: three agents in network
//! namespaces sharing Redis (or a Redis Cluster with replicas) in a fourth,
//! clients spread over the agents, every request recorded, faults injected
//! on a schedule, and a checker that reads the history.
//!
//! The tier is a sliding window, whose guarantee is checkable from outside:
//! no interval of one window's length holds more than the limit. Each
//! request's decision happened between its sending and its answer, so a set
//! of admitted requests all sent and answered within one window's length
//! certainly shared a window; the checker finds the largest such set per
//! client and holds it to the bound `docs/fleet.md` states for the time it
//! falls in: the limit while every agent reached the store, the limit × (1 +
//! the agents that fell back) when `on_error = "allow"` and some could not,
//! and the limit at all times under `on_error = "deny"`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    agent::Process,
    fleet::{NsCluster, StoreNet, TOKEN, admin_call, agent_in},
    netns::{Netns, ip},
    redis::RedisServer,
};

/// The agents' API port, in their namespaces.
const PORT: u16 = 8088;
/// The tier every client hammers: `LIMIT` per `WINDOW_MS`, sliding.
const LIMIT: usize = 10;
const WINDOW_MS: f64 = 2000.0;
/// After a fault heals, how long the breaker may keep an agent on its
/// local store (`breaker_cooldown`, then a probe) plus a margin.
const RECOVERY_MS: f64 = 2500.0;

/// Where the agents' shared store lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Redis,
    /// Three primaries, each with a replica.
    Cluster,
}

/// One fault, on a schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Agent `n` cannot reach the store (its packets to it dropped).
    Partition(usize),
    /// Redis stopped (SIGSTOP), then continued.
    RedisPaused,
    /// Redis killed (SIGKILL), then started again on its append-only file.
    RedisKilled,
    /// The primary holding the fleet's entries handed over to its replica
    /// (`CLUSTER FAILOVER`).
    Failover,
    /// Agent `n` killed (SIGKILL), then started again.
    AgentKilled(usize),
}

impl Fault {
    fn name(self) -> String {
        match self {
            Self::Partition(n) => format!("agent {n} cut off from the store"),
            Self::RedisPaused => "Redis paused (SIGSTOP)".into(),
            Self::RedisKilled => "Redis killed and restarted".into(),
            Self::Failover => "Cluster primary failed over to its replica".into(),
            Self::AgentKilled(n) => format!("agent {n} killed and restarted"),
        }
    }

    /// Agents that may decide on their local store while it lasts.
    fn fallen_back(self) -> usize {
        match self {
            Self::Partition(_) => 1,
            Self::RedisPaused | Self::RedisKilled | Self::Failover => 3,
            Self::AgentKilled(_) => 0,
        }
    }
}

/// A run: the store, what agents do when it fails, the faults in turn.
#[derive(Clone, Debug)]
pub struct Plan {
    pub store: Store,
    /// `on_error`: `allow` or `deny`.
    pub on_error: &'static str,
    pub faults: Vec<Fault>,
    /// How long each fault lasts.
    pub fault: Duration,
    /// Quiet time before the first fault and after each heal.
    pub settle: Duration,
    pub clients: usize,
    /// Requests each client sends per second.
    pub rate: f64,
}

/// One request as the client saw it.
#[derive(Clone, Debug)]
struct Record {
    client: usize,
    agent: usize,
    /// ms since the run's start.
    sent: f64,
    answered: f64,
    /// `None`: no answer (refused, reset, timed out).
    status: Option<u16>,
    /// Status lines read on the request's connection (more than one: the
    /// request was answered twice).
    answers: usize,
}

/// When a fault was in force.
#[derive(Clone, Copy, Debug)]
struct Span {
    fault: Fault,
    start: f64,
    heal: f64,
}

/// Runs `plan` and checks its history; the report, whose `"ok"` says whether
/// every check passed.
#[must_use]
pub fn run(plan: &Plan) -> Value {
    crate::require_root("the fault-injection suite (network namespaces, iptables)");
    let mut fleet = Fleet::start(plan);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..plan.clients)
        .map(|client| {
            let (ns, stop) = (fleet.store.ns.clone(), stop.clone());
            let rate = plan.rate;
            ns.clone()
                .spawn(move || client_loop(client, rate, started, &stop))
        })
        .collect();
    let ms = |at: Instant| at.duration_since(started).as_secs_f64() * 1000.0;
    std::thread::sleep(plan.settle);
    let mut spans = Vec::new();
    let mut convergence = Vec::new();
    for (n, fault) in plan.faults.iter().enumerate() {
        let start = Instant::now();
        fleet.inject(*fault, true);
        std::thread::sleep(plan.fault / 2);
        // A change made while the fault lasts, on an agent that may reach
        // the store; it may be refused (the store is down): then after.
        let change = fleet.change(n, *fault);
        std::thread::sleep(plan.fault / 2);
        fleet.inject(*fault, false);
        let heal = Instant::now();
        spans.push(Span {
            fault: *fault,
            start: ms(start),
            heal: ms(heal),
        });
        let made = change.or_else(|| fleet.change(n, Fault::AgentKilled(usize::MAX)));
        let converged = made.and_then(|(key, net)| fleet.converged(&key, &net, heal));
        convergence.push(converged);
        std::thread::sleep(plan.settle.saturating_sub(heal.elapsed()));
    }
    stop.store(true, Ordering::Relaxed);
    let records: Vec<Record> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    let report = check(plan, &records, &spans, &convergence);
    drop(fleet);
    report
}

/// The agents, the store and its namespace.
struct Fleet {
    store: StoreNet,
    hosts: Vec<Netns>,
    /// Each agent's store address (its link's far end).
    links: Vec<Ipv4Addr>,
    agents: Vec<Option<Process>>,
    configs: Vec<String>,
    redis: Option<RedisServer>,
    cluster: Option<NsCluster>,
}

impl Fleet {
    fn start(plan: &Plan) -> Self {
        let store = StoreNet::new();
        let hosts: Vec<Netns> = (0..3)
            .map(|i| {
                let ns = Netns {
                    name: format!("{}h{i}", store.ns.name),
                };
                ip(&["netns", "add", &ns.name]);
                ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
                ns
            })
            .collect();
        let links: Vec<Ipv4Addr> = hosts
            .iter()
            .zip(1u8..)
            .map(|(h, i)| store.link(h, i))
            .collect();
        let (redis, cluster, store_section) = match plan.store {
            Store::Redis => {
                // Every write on disk before it is acknowledged: a killed
                // Redis comes back with every count.
                let redis = store.redis(6379, &["--appendonly", "yes", "--appendfsync", "always"]);
                (
                    Some(redis),
                    None,
                    "url = \"redis://{addr}:6379\"".to_owned(),
                )
            }
            Store::Cluster => {
                let cluster = NsCluster::start(&store, links[0], 3, 1);
                let seeds: Vec<String> =
                    cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
                let section = format!("cluster_nodes = [{}]", seeds.join(", "));
                (None, Some(cluster), section)
            }
        };
        let configs: Vec<String> = links
            .iter()
            .map(|addr| {
                format!(
                    "[server]\nlisten = \"0.0.0.0:{PORT}\"\n\n[identity]\nverify_keys = \"none\"\n\n\
                     [store]\nkind = \"redis\"\n{}\non_error = \"{}\"\ntimeout = \"100ms\"\n\
                     breaker_failures = 3\nbreaker_cooldown = \"1s\"\n\n[xdp]\nenabled = false\n\n\
                     [[tier]]\nroute = \"/api/chat\"\nlimit = {LIMIT}\nwindow = \"2s\"\nalgorithm = \"sliding\"\n",
                    store_section.replace("{addr}", &addr.to_string()),
                    plan.on_error
                )
            })
            .collect();
        let mut fleet = Self {
            store,
            hosts,
            links,
            agents: Vec::new(),
            configs,
            redis,
            cluster,
        };
        fleet.agents = (0..3).map(|n| Some(fleet.start_agent(n))).collect();
        fleet
    }

    fn start_agent(&self, n: usize) -> Process {
        agent_in(
            &self.hosts[n],
            &format!("{}-{n}", self.hosts[n].name),
            PORT,
            &self.configs[n],
            &[],
        )
    }

    fn inject(&mut self, fault: Fault, on: bool) {
        match fault {
            Fault::Partition(n) => {
                let verb = if on { "-I" } else { "-D" };
                let port = PORT.to_string();
                let ns = &self.hosts[n];
                let _ = ns.output(
                    "iptables",
                    &[
                        verb,
                        "OUTPUT",
                        "-d",
                        "10.93.0.0/16",
                        "-p",
                        "tcp",
                        "!",
                        "--sport",
                        &port,
                        "-j",
                        "DROP",
                    ],
                );
                let _ = ns.output(
                    "iptables",
                    &[
                        verb,
                        "INPUT",
                        "-s",
                        "10.93.0.0/16",
                        "-p",
                        "tcp",
                        "!",
                        "--dport",
                        &port,
                        "-j",
                        "DROP",
                    ],
                );
            }
            Fault::RedisPaused => self.redis.as_ref().expect("one Redis").pause(on),
            Fault::RedisKilled => {
                let redis = self.redis.as_mut().expect("one Redis");
                if on {
                    redis.kill();
                } else {
                    redis.restart();
                }
            }
            Fault::Failover => {
                if on {
                    let cluster = self.cluster.as_ref().expect("a cluster");
                    let (_, replica) = cluster.fleet_primary_and_replica();
                    let answer = cluster.nodes[replica].cli(&["CLUSTER", "FAILOVER"]);
                    assert!(answer.contains("OK"), "CLUSTER FAILOVER: {answer}");
                }
            }
            Fault::AgentKilled(n) => {
                if on {
                    if let Some(mut agent) = self.agents[n].take() {
                        agent.signal(libc::SIGKILL);
                        let _ = agent.wait_exit(Duration::from_secs(5));
                    }
                } else {
                    self.agents[n] = Some(self.start_agent(n));
                }
            }
        }
    }

    /// An override and a ban made on an agent that `fault` leaves in touch
    /// with the store; `None` if the store refused them.
    fn change(&self, n: usize, fault: Fault) -> Option<(String, String)> {
        let maker = match fault {
            Fault::Partition(cut) | Fault::AgentKilled(cut) => (0..3).find(|a| *a != cut)?,
            _ => 0,
        };
        let agent = self.agents[maker].as_ref()?;
        let key = format!("{:064x}", 0xc4a05_u64 * 1000 + n as u64);
        let net = format!("192.0.2.{}", 10 + n);
        let (status, _) = admin_call(
            Some(&self.hosts[maker]),
            agent.admin?,
            "PUT",
            &format!("/overrides/{key}"),
            Some(TOKEN),
            Some(r#"{"multiplier":2}"#),
        );
        if status != 200 {
            return None;
        }
        let (status, _) = admin_call(
            Some(&self.hosts[maker]),
            agent.admin?,
            "PUT",
            &format!("/bans/{net}"),
            Some(TOKEN),
            Some(r#"{"seconds":600,"reason":"chaos"}"#),
        );
        (status == 200).then_some((key, format!("{net}/32")))
    }

    /// ms from `since` until every agent lists the override and the ban
    /// (at most 10 s: then the report says they did not converge).
    fn converged(&self, key: &str, net: &str, since: Instant) -> Option<f64> {
        let deadline = since + Duration::from_secs(10);
        for (n, agent) in self.agents.iter().enumerate() {
            let agent = agent.as_ref()?;
            loop {
                let (_, over) = admin_call(
                    Some(&self.hosts[n]),
                    agent.admin?,
                    "GET",
                    &format!("/overrides/{key}"),
                    Some(TOKEN),
                    None,
                );
                let (_, ban) = admin_call(
                    Some(&self.hosts[n]),
                    agent.admin?,
                    "GET",
                    &format!("/bans/{}", net.replace('/', "%2F")),
                    Some(TOKEN),
                    None,
                );
                if over["key_sha256"] == key && ban["net"] == net {
                    break;
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Some(since.elapsed().as_secs_f64() * 1000.0)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.agents.clear();
        self.redis = None;
        self.cluster = None;
        for host in &self.hosts {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &host.name])
                .status();
        }
        let _ = &self.links;
    }
}

/// One client: `rate` requests a second, each on a connection of its own
/// to the next agent in turn, from the store's namespace.
fn client_loop(client: usize, rate: f64, started: Instant, stop: &AtomicBool) -> Vec<Record> {
    let mut records = Vec::new();
    let gap = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    let mut turn = client;
    let key = format!("chaos-client-{client}");
    while !stop.load(Ordering::Relaxed) {
        let agent = turn % 3;
        turn += 1;
        let addr = SocketAddrV4::new(
            Ipv4Addr::new(10, 93, u8::try_from(agent + 1).unwrap_or(1), 1),
            PORT,
        );
        let sent = started.elapsed().as_secs_f64() * 1000.0;
        let (status, answers) = request(addr, &key);
        let answered = started.elapsed().as_secs_f64() * 1000.0;
        records.push(Record {
            client,
            agent,
            sent,
            answered,
            status,
            answers,
        });
        next += gap;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
    records
}

/// One request on a connection of its own: its status (`None`: no
/// answer) and how many status lines came back.
fn request(addr: SocketAddrV4, key: &str) -> (Option<u16>, usize) {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(1)) else {
        return (None, 0);
    };
    let request = format!(
        "GET /api/chat HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .is_err()
    {
        return (None, 0);
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    let answers = raw.matches("HTTP/1.1 ").count();
    (crate::http::status(&raw).filter(|s| *s != 0), answers)
}

/// The checks, and the report.
fn check(plan: &Plan, records: &[Record], spans: &[Span], convergence: &[Option<f64>]) -> Value {
    let mut ok = true;
    let mut violations = Vec::new();
    // Windows that touch a fault (until its effects are over) and the
    // most agents on their local store then.
    let fallen_back = |from: f64, to: f64| -> usize {
        spans
            .iter()
            .filter(|s| from <= s.heal + RECOVERY_MS && to >= s.start)
            .map(|s| s.fault.fallen_back())
            .max()
            .unwrap_or(0)
    };
    let bound = |fallen: usize| {
        if plan.on_error == "deny" {
            LIMIT
        } else {
            LIMIT * (1 + fallen)
        }
    };
    let answered_twice = records.iter().filter(|r| r.answers > 1).count();
    if answered_twice > 0 {
        ok = false;
    }
    let mut worst_clean = 0;
    let mut worst_by_fault = vec![0usize; spans.len()];
    for client in 0..plan.clients {
        let mut admitted: Vec<&Record> = records
            .iter()
            .filter(|r| r.client == client && r.status == Some(200))
            .collect();
        admitted.sort_by(|a, b| a.sent.total_cmp(&b.sent));
        for (j, first) in admitted.iter().enumerate() {
            let end = first.sent + WINDOW_MS;
            let together = admitted[j..]
                .iter()
                .take_while(|r| r.sent <= end)
                .filter(|r| r.answered <= end)
                .count();
            let fallen = fallen_back(first.sent, end);
            if together > bound(fallen) {
                ok = false;
                violations.push(json!({
                    "client": client, "from_ms": first.sent, "admitted": together,
                    "bound": bound(fallen),
                }));
            }
            // The window counts for the fault that sets its bound (the one
            // with the most agents on their local store).
            let governing = spans
                .iter()
                .enumerate()
                .filter(|(_, s)| first.sent <= s.heal + RECOVERY_MS && end >= s.start)
                .max_by_key(|(_, s)| s.fault.fallen_back())
                .map(|(i, _)| i);
            match governing {
                Some(i) => worst_by_fault[i] = worst_by_fault[i].max(together),
                None => worst_clean = worst_clean.max(together),
            }
        }
    }
    let faults: Vec<Value> = spans
        .iter()
        .zip(&worst_by_fault)
        .zip(convergence)
        .map(|((span, worst), converged)| {
            let during: Vec<&Record> = records
                .iter()
                .filter(|r| r.sent >= span.start && r.sent <= span.heal)
                .collect();
            let count = |f: &dyn Fn(&Record) -> bool| during.iter().filter(|r| f(r)).count();
            if converged.is_none() {
                ok = false;
            }
            json!({
                "fault": span.fault.name(),
                "seconds": (span.heal - span.start) / 1000.0,
                "requests": during.len(),
                "admitted": count(&|r| r.status == Some(200)),
                "limited": count(&|r| r.status == Some(429)),
                "refused_503": count(&|r| r.status == Some(503)),
                "unanswered": count(&|r| r.status.is_none()),
                "largest_in_a_window": worst,
                "bound": bound(span.fault.fallen_back()),
                "converged_ms": converged,
            })
        })
        .collect();
    json!({
        "ok": ok,
        "store": match plan.store { Store::Redis => "redis", Store::Cluster => "cluster (3 primaries, 3 replicas)" },
        "on_error": plan.on_error,
        "limit": LIMIT,
        "window_ms": WINDOW_MS,
        "clients": plan.clients,
        "requests": records.len(),
        "admitted": records.iter().filter(|r| r.status == Some(200)).count(),
        "by_agent": (0..3).map(|a| records.iter().filter(|r| r.agent == a).count()).collect::<Vec<_>>(),
        "largest_in_a_window_with_the_store": worst_clean,
        "answered_twice": answered_twice,
        "faults": faults,
        "violations": violations.into_iter().take(20).collect::<Vec<_>>(),
    })
}
