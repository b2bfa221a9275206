//! A spoofing campaign against the SYN challenge, end to end: an attacker
//! spoofs SYNs from the addresses of real third-party hosts ("bystanders",
//! a namespace whose kernel answers any SYN-ACK it did not ask for with a
//! RST carrying the cookie), over the new-source budget, while 50
//! established clients keep long-lived connections busy and new clients
//! arrive. Root needed; every namespace is removed on drop.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use limiter_agent::kernel::maps::{Maps, SourceView};
use limiter_tests::{
    http,
    netns::{
        self, API_PORT, ATTACKER_ADDR, BYSTANDERS, BYSTANDERS_PREFIX, HOST_ATTACKER_ADDR,
        HOST_CLIENT_ADDR, Topology, connects, counter, ip, spoofed_syns_paced, syn_flood,
    },
    newcomers::{self, RxNapi},
};

/// Spoofed SYNs a second: over the new-source budget (2,048 a second, 1,024
/// per CPU here), under the challenge's SYN-ACK cap and admission budget
/// (8,192 a second each, 4,096 per CPU).
const CAMPAIGN_RATE: u32 = 3_000;
const CAMPAIGN: Duration = Duration::from_secs(10);
/// The new-source budget of one window, all CPUs: what a flood may add to
/// the per-source map before the budget marks it as a flood.
const NEW_SOURCE_BUDGET: usize = 2_048;
/// The derived SYN-ACK cap, all CPUs, per second.
const SYN_ACK_CAP: u64 = 8_192;
const ESTABLISHED: u8 = 50;
const NEW_CLIENTS: u32 = 100;
/// SYNs per second per source before the ceiling, and how long the kernel's
/// auto-ban then lasts.
const XDP: &str = "max_syns_per_second = 100\nautoban_after_seconds = 1\nban_seconds = 600";

fn in_bystanders(view: &SourceView) -> bool {
    let std::net::IpAddr::V4(v4) = view.addr else {
        return false;
    };
    u32::from(v4) >> (32 - BYSTANDERS_PREFIX) == u32::from(BYSTANDERS) >> (32 - BYSTANDERS_PREFIX)
}

/// What one established client saw.
#[derive(Debug, Default)]
struct Kept {
    requests: u32,
    failures: u32,
    first_failure: Option<String>,
}

/// A client from `local` on one keep-alive connection, asking `GET
/// /api/chat` every 100 ms until `stop`; `ready` is counted up once its
/// first answer came.
fn keep_busy(local: Ipv4Addr, ready: &AtomicU32, stop: &AtomicBool) -> Kept {
    let mut kept = Kept::default();
    let target = SocketAddrV4::new(HOST_CLIENT_ADDR, API_PORT);
    let (mut stream, _) = newcomers::connect_from(local, target, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("established client {local} could not connect: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("read timeout");
    let request = b"GET /api/chat HTTP/1.1\r\nHost: api\r\n\r\n";
    let mut first = true;
    while first || !stop.load(Ordering::Relaxed) {
        kept.requests += 1;
        let answer = stream
            .write_all(request)
            .and_then(|()| http::read_response(&mut stream));
        match answer {
            Ok(raw) if http::status(&raw) == Some(200) => {}
            other => {
                kept.failures += 1;
                kept.first_failure
                    .get_or_insert_with(|| format!("request {}: {other:?}", kept.requests));
                // The connection is gone: nothing more to keep busy.
                break;
            }
        }
        if first {
            ready.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    kept
}

/// The SYNs from the bystanders `paced` a second (or as fast as one thread
/// sends) until `stop`; how many were sent.
fn campaign(
    topology: &Topology,
    rate: u32,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let stop = Arc::clone(stop);
    topology.flood_thread(Some(0), move |host, attacker| {
        spoofed_syns_paced(host, attacker, (BYSTANDERS, 1 << 16), rate, stop)
    })
}

/// Fifty clients on long-lived connections, each answered once before this
/// returns; they keep asking until `stop`.
fn established_clients(
    topology: &Topology,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Kept>> {
    let ready = Arc::new(AtomicU32::new(0));
    let clients: Vec<_> = (0..ESTABLISHED)
        .map(|i| {
            let local = Ipv4Addr::new(10, 91, 1, 150 + i);
            ip(&[
                "-n",
                &topology.client.name,
                "addr",
                "add",
                &format!("{local}/32"),
                "dev",
                "vc",
            ]);
            let (ready, stop) = (Arc::clone(&ready), Arc::clone(stop));
            topology
                .client
                .spawn(move || keep_busy(local, &ready, &stop))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready.load(Ordering::Relaxed) < u32::from(ESTABLISHED) {
        assert!(
            Instant::now() < deadline,
            "the established clients never all got an answer"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    clients
}

/// Before the campaign: the attacker's own address goes over its SYN
/// ceiling and the kernel bans it (its entry holds the auto-ban); the ban's
/// deadline.
fn auto_ban_the_attacker(topology: &Topology, maps: &Maps) -> u64 {
    let _ = syn_flood(&topology.host, &topology.attacker, 3_000);
    let banned_until = maps
        .source(ATTACKER_ADDR.into(), 64)
        .expect("the attacker has an entry")
        .autoban_until_ns;
    assert!(
        banned_until > limiter_agent::kernel::monotonic_ns(),
        "the attacker is auto-banned"
    );
    banned_until
}

/// The agent's maps, through their pins.
fn pinned_maps(topology: &Topology) -> Maps {
    Maps::open_pinned(&std::path::PathBuf::from(format!(
        "/sys/fs/bpf/limiter/{}",
        topology.instance
    )))
    .expect("opening the pinned maps")
}

/// Per second, to the millisecond: `count` over `elapsed`.
fn per_second(count: u64, elapsed: Duration) -> u64 {
    count * 1000
        / u64::try_from(elapsed.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
}

#[test]
fn a_campaign_of_spoofed_syns_from_real_hosts_stays_within_budget_and_evicts_nobody() {
    let topology = Topology::new();
    let _bystanders = topology.bystanders();
    // XDP_TX frames reach a veth end only with its NAPI on: the clients'
    // (their challenges) and the attacker's (the bystanders' challenges,
    // which it forwards, as the Internet would).
    let _rx_client = RxNapi::attach(&topology.client, "vc");
    let _rx_attacker = RxNapi::attach(&topology.attacker, "va");
    let _agent = topology.agent(&netns::config("/api/chat", 1_000_000, XDP), &[]);
    let maps = pinned_maps(&topology);
    let now_ns = limiter_agent::kernel::monotonic_ns;

    let banned_until = auto_ban_the_attacker(&topology, &maps);
    let stop = Arc::new(AtomicBool::new(false));
    let established = established_clients(&topology, &stop);

    // The campaign: every bystander address in turn, at CAMPAIGN_RATE; new
    // clients arrive once it has made the budget a flood's.
    let before = topology.status();
    let started = Instant::now();
    let campaign_stop = Arc::new(AtomicBool::new(false));
    let sender = campaign(&topology, CAMPAIGN_RATE, &campaign_stop);
    std::thread::sleep(Duration::from_millis(2_500));
    let newcomers = newcomers::run_clients(
        &topology,
        Ipv4Addr::new(10, 92, 1, 0),
        NEW_CLIENTS,
        4,
        "/api/chat",
        Duration::from_millis(1_500),
    );
    if let Some(rest) = CAMPAIGN.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    campaign_stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("campaign thread");
    let elapsed = started.elapsed();
    let after = topology.status();
    stop.store(true, Ordering::Relaxed);
    let kept: Vec<Kept> = established
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();

    let delta = |verdict: &str, reason: &str| {
        counter(&after, verdict, reason) - counter(&before, verdict, reason)
    };
    let syn_acks_per_second = per_second(delta("tx", "syn_challenge"), elapsed);
    let in_sources = maps.sources().iter().filter(|v| in_bystanders(v)).count();
    let in_probation = maps.probation().iter().filter(|v| in_bystanders(v)).count();
    let failed: Vec<&Kept> = kept.iter().filter(|k| k.failures > 0).collect();
    let requests: u32 = kept.iter().map(|k| k.requests).sum();
    let ban = maps
        .source(ATTACKER_ADDR.into(), 64)
        .map(|s| s.autoban_until_ns);
    eprintln!(
        "campaign: {sent} spoofed SYNs in {elapsed:.1?} ({}/s) from {} bystander addresses; \
         {syn_acks_per_second} SYN-ACKs/s (cap {SYN_ACK_CAP}); {} RSTs with the cookie admitted, \
         {} over budget; bystander entries: {in_sources} in sources (bound {NEW_SOURCE_BUDGET}), \
         {in_probation} in probation; established clients: {} of {ESTABLISHED} failed, {requests} \
         requests; auto-ban in force: {}; new clients served {}/{} (connect p99 {:.1} ms); \
         counters {}",
        per_second(sent, elapsed),
        sent.min(1 << 16),
        delta("drop", "challenge_passed"),
        delta("drop", "challenge_budget"),
        failed.len(),
        ban.is_some_and(|until| until > now_ns()),
        newcomers.served,
        newcomers.attempts,
        newcomers.connect_quantile(0.99),
        after["counters"],
    );

    // The campaign met the challenge and the bystanders answered it.
    assert!(
        delta("drop", "challenge_passed") >= u64::from(CAMPAIGN_RATE),
        "{after}"
    );
    assert!(
        failed.is_empty(),
        "established clients failed: {:?}",
        failed.iter().map(|k| &k.first_failure).collect::<Vec<_>>()
    );
    assert!(
        in_sources <= NEW_SOURCE_BUDGET,
        "{in_sources} bystander entries in the per-source map"
    );
    assert!(in_probation <= limiter_common::PROBATION_CAPACITY as usize);
    assert_eq!(
        ban,
        Some(banned_until),
        "the auto-ban survived the campaign in its entry"
    );
    assert!(
        !connects(
            &topology.attacker,
            SocketAddrV4::new(HOST_ATTACKER_ADDR, API_PORT),
            Duration::from_secs(1)
        ),
        "the auto-ban is still in force"
    );
    assert!(
        syn_acks_per_second <= SYN_ACK_CAP,
        "{syn_acks_per_second} SYN-ACKs/s"
    );
    assert!(
        newcomers.served * 100 >= newcomers.attempts * 99,
        "new clients: {newcomers:?}"
    );
    over_the_cap(&topology);
}

/// The same campaign as fast as one thread sends, for two seconds: the
/// bucket holds one second's worth, so at most cap × (2 + 1) answers.
fn over_the_cap(topology: &Topology) {
    let before = topology.status();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = campaign(topology, u32::MAX, &stop);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("burst thread");
    let after = topology.status();
    let delta = |verdict: &str, reason: &str| {
        counter(&after, verdict, reason) - counter(&before, verdict, reason)
    };
    let (answered, capped) = (delta("tx", "syn_challenge"), delta("drop", "syn_ack_cap"));
    eprintln!("burst: {sent} spoofed SYNs in 2 s, {answered} answered, {capped} over the cap");
    assert!(
        sent > 3 * SYN_ACK_CAP,
        "the burst went over the cap: {sent}"
    );
    assert!(answered <= 3 * SYN_ACK_CAP, "{answered} SYN-ACKs in 2 s");
    assert!(capped > 0, "the cap dropped some: {after}");
}

#[test]
fn where_the_interface_forwards_the_answer_goes_only_where_the_fib_says() {
    // `bpf_fib_lookup` answers only on an interface with forwarding on.
    let topology = Topology::new();
    for interface in [netns::HOST_CLIENT_IF, netns::HOST_ATTACKER_IF] {
        let _ = topology.host.output(
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.{interface}.forwarding=1")],
        );
    }
    let _rx_client = RxNapi::attach(&topology.client, "vc");
    let _rx_attacker = RxNapi::attach(&topology.attacker, "va");
    let _agent = topology.agent(&netns::config("/api/chat", 1_000_000, XDP), &[]);
    // A flood from addresses the host has no route to: dropped unanswered.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        topology.flood_thread(Some(0), move |host, attacker| {
            netns::spoofed_syn_flood_until(host, attacker, stop)
        })
    };
    std::thread::sleep(Duration::from_millis(1_500));
    // New clients, routed through the client's namespace: answered through
    // their gateway's neighbour entry, and served.
    let clients = newcomers::run_clients(
        &topology,
        Ipv4Addr::new(10, 92, 2, 0),
        20,
        4,
        "/api/chat",
        Duration::from_millis(1_500),
    );
    // Addresses that live behind the client's interface, claimed from the
    // attacker's: the route back leaves by another interface, so nothing
    // goes back to the attacker.
    let before = topology.status();
    let claim_stop = Arc::new(AtomicBool::new(false));
    let claims = {
        let stop = Arc::clone(&claim_stop);
        topology.flood_thread(None, move |host, attacker| {
            spoofed_syns_paced(
                host,
                attacker,
                (Ipv4Addr::new(10, 91, 1, 64), 64),
                2_000,
                stop,
            )
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    claim_stop.store(true, Ordering::Relaxed);
    let claimed = claims.join().expect("claims thread");
    let after = topology.status();
    stop.store(true, Ordering::Relaxed);
    let flooded = flood.join().expect("flood thread");
    let delta = |verdict: &str, reason: &str| {
        counter(&after, verdict, reason) - counter(&before, verdict, reason)
    };
    eprintln!(
        "forwarding on: {flooded} unroutable SYNs; new clients served {}/{}; {claimed} SYNs \
         claiming client-side addresses: {} answered, {} without a return path; {}",
        clients.served,
        clients.attempts,
        delta("tx", "syn_challenge"),
        delta("drop", "no_return_path"),
        after["counters"]
    );
    assert!(
        counter(&after, "drop", "no_return_path") >= flooded / 2,
        "the unroutable flood went unanswered: {after}"
    );
    assert!(clients.served >= 19, "{clients:?}");
    assert!(
        counter(&before, "tx", "syn_challenge") >= 20,
        "the clients met the challenge: {before}"
    );
    assert!(claimed >= 1_000, "{claimed} claims sent");
    assert_eq!(
        delta("tx", "syn_challenge"),
        0,
        "no answer to the attacker's claims: {after}"
    );
}
