//! Probation: a valid cookie admits its source to the `probation` map, not
//! to `sources`, within a per-CPU admission budget; a probation source is
//! promoted to `sources` by a packet of a connection this host has
//! established (the kernel's socket lookup), within the new-source budget.
//! So reflected RSTs, which any host at a spoofed address sends, cannot
//! evict a source that has been served.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use limiter_common::{
    PROBATION_MAX_PACKETS, PROBATION_MAX_SYNS, SourceState,
    reason::{
        API, CHALLENGE_BUDGET, CHALLENGE_PASSED, NEW_SOURCE_CEILING, PACKET_CEILING, PROMOTED,
        SYN_ACK_CAP, SYN_CEILING, SYN_CHALLENGE,
    },
    verdict::{DROP, PASS, TX},
};
use limiter_tests::{
    newcomers,
    packet::{ACK, Frame, PSH, RST, SYN, seal},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_PASS, XDP_TX},
};

use crate::{
    challenge::{flooded, rst, syn},
    support::{ETH_LEN, IPV4_LEN, IPV4_MF, api4, assert_stats, send, v4},
};

const L4: usize = ETH_LEN + IPV4_LEN;

/// Challenges `src` and answers with the RST its stack would send; the
/// program's verdict on that RST.
fn pass_challenge(h: &Harness, src: [u8; 4]) -> u32 {
    let (action, answer) = h.run_out(&syn(Frame::tcp4(src, API_PORT, SYN)));
    assert_eq!(action, XDP_TX, "{src:?} challenged");
    h.run(&rst(Frame::tcp4(src, API_PORT, RST), &answer, L4))
}

#[test]
fn valid_cookies_over_the_admission_budget_admit_nobody() {
    let mut h = flooded();
    h.update_config(|c| c.max_challenge_admissions = 2);
    let sources: Vec<[u8; 4]> = (0..4).map(|i| [198, 51, 100, 60 + i]).collect();
    let verdicts: Vec<u32> = sources.iter().map(|s| pass_challenge(&h, *s)).collect();
    assert_eq!(verdicts, [XDP_DROP; 4]);
    for (i, src) in sources.iter().enumerate() {
        assert_eq!(h.probation(&v4(*src)).is_some(), i < 2, "{src:?}");
        assert!(h.source(&v4(*src)).is_none(), "{src:?}");
    }
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (TX, SYN_CHALLENGE, 4),
            (DROP, CHALLENGE_PASSED, 2),
            (DROP, CHALLENGE_BUDGET, 2),
        ],
    );
}

#[test]
fn a_campaign_of_reflected_rsts_cannot_evict_known_sources() {
    // A per-source map of 64, full of sources that were served; then
    // 300 addresses whose stacks echo the cookie (bystanders of a spoofing
    // campaign) pass the challenge: they fill probation, not the map.
    limiter_tests::pin_to_cpu(0);
    let mut h = Harness::with_sources_capacity(Some(64));
    h.update_config(|c| {
        c.window_ns = crate::support::WINDOW_NS;
        c.max_new_sources = 64;
        c.syn_challenge = 1;
        c.challenge_key = [7, 11];
    });
    let known: Vec<[u8; 4]> = (0..64).map(|i| [192, 0, 2, i]).collect();
    for src in &known {
        send(&h, &api4(*src, SYN), XDP_PASS);
    }
    assert_eq!(h.source_count(), 64);
    for i in 0..300u16 {
        let [hi, lo] = i.to_be_bytes();
        assert_eq!(pass_challenge(&h, [203, 0, hi, lo]), XDP_DROP);
    }
    assert_eq!(h.probation_count(), 300, "the campaign is in probation");
    for src in &known {
        assert!(h.source(&v4(*src)).is_some(), "{src:?} kept its entry");
    }
    assert_eq!(h.source_count(), 64);
}

/// An established TCP connection on loopback from `from`: (listener, its
/// accepted end, the client end).
fn connection(from: Ipv4Addr) -> (TcpListener, TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
    let SocketAddr::V4(to) = listener.local_addr().unwrap() else {
        unreachable!("bound to IPv4")
    };
    let (client, _) =
        newcomers::connect_from(from, to, Duration::from_secs(5)).expect("connect on loopback");
    let (accepted, _) = listener.accept().expect("accept");
    (listener, accepted, client)
}

/// A segment from `client`'s end to its peer, with `flags`, in the frame
/// shape of the harness (which sends to 127.0.0.1).
fn segment(client: &TcpStream, flags: u8) -> Vec<u8> {
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) =
        (client.local_addr().unwrap(), client.peer_addr().unwrap())
    else {
        unreachable!("IPv4 loopback")
    };
    let mut frame = Frame::tcp4(local.ip().octets(), peer.port(), flags).build();
    frame[L4..L4 + 2].copy_from_slice(&local.port().to_be_bytes());
    seal(&mut frame);
    frame
}

/// A flooded harness that also treats `port` as an API port.
fn flooded_with_port(port: u16) -> Harness {
    let mut h = flooded();
    h.update_config(|c| c.ports[1] = port.to_be());
    h
}

#[test]
fn an_established_connection_promotes_its_source_and_nothing_else_does() {
    let (listener, mut accepted, client) = connection(Ipv4Addr::LOCALHOST);
    let port = listener.local_addr().unwrap().port();
    let mut h = flooded_with_port(port);
    let key = v4([127, 0, 0, 1]);
    // As a valid cookie puts it (loopback itself never gets a challenge).
    h.put_probation(&key, &SourceState::default());
    // A segment of a connection this host does not have: no promotion.
    let mut stray = segment(&client, ACK);
    stray[L4..L4 + 2].copy_from_slice(&1u16.to_be_bytes());
    seal(&mut stray);
    send(&h, &stray, XDP_PASS);
    // A SYN or a RST on the real tuple never promotes either.
    send(&h, &segment(&client, SYN), XDP_PASS);
    send(&h, &segment(&client, RST | ACK), XDP_PASS);
    assert!(h.source(&key).is_none(), "still on probation");
    let before = h.probation(&key).expect("in probation");
    assert_eq!((before.packets, before.syns), (3, 1));
    // Data on the established connection: promoted, its counters with it.
    send(&h, &segment(&client, ACK | PSH), XDP_PASS);
    assert!(h.probation(&key).is_none(), "out of probation");
    let promoted = h.source(&key).expect("in the per-source map");
    assert_eq!((promoted.packets, promoted.syns), (4, 1));
    // From here on it is a known source.
    send(&h, &segment(&client, ACK), XDP_PASS);
    assert_eq!(h.source(&key).unwrap().packets, 5);
    assert_stats(&h, &[(PASS, API, 5), (PASS, PROMOTED, 1)]);
    // The connection is real: the kernel never saw these frames.
    let mut client = client;
    client.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    accepted.read_exact(&mut byte).unwrap();
}

#[test]
fn promotions_share_the_new_source_budget() {
    // `flooded` allows one new source per window; its known source spent
    // the budget's demand, not its promotions: one promotion, then none.
    let (listener, _a, first) = connection(Ipv4Addr::LOCALHOST);
    let port = listener.local_addr().unwrap().port();
    let SocketAddr::V4(to) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let (second, _) =
        newcomers::connect_from(Ipv4Addr::new(127, 0, 0, 2), to, Duration::from_secs(5))
            .expect("connect from 127.0.0.2");
    let _b = listener.accept().expect("accept");
    let mut h = flooded_with_port(port);
    for octet in [1, 2] {
        h.put_probation(&v4([127, 0, 0, octet]), &SourceState::default());
    }
    send(&h, &segment(&first, ACK), XDP_PASS);
    send(&h, &segment(&second, ACK), XDP_PASS);
    assert!(h.source(&v4([127, 0, 0, 1])).is_some(), "promoted");
    assert!(
        h.probation(&v4([127, 0, 0, 2])).is_some(),
        "left in probation, served"
    );
    assert!(h.source(&v4([127, 0, 0, 2])).is_none());
    assert_stats(&h, &[(PASS, API, 2), (PASS, PROMOTED, 1)]);
}

#[test]
fn a_source_in_probation_gets_a_clients_handshakes_not_a_known_sources_ceilings() {
    // A bystander's echoed cookie put it there: its address may pass a
    // client's few SYNs and packets, not a flood into the kernel.
    let mut h = flooded();
    let src = [198, 51, 100, 9];
    h.put_probation(&v4(src), &SourceState::default());
    let syns = PROBATION_MAX_SYNS + 4;
    for i in 0..syns {
        let expected = if i < PROBATION_MAX_SYNS {
            XDP_PASS
        } else {
            XDP_DROP
        };
        send(&h, &api4(src, SYN), expected);
    }
    let acks = PROBATION_MAX_PACKETS - syns;
    for _ in 0..acks {
        send(&h, &api4(src, ACK), XDP_PASS);
    }
    send(&h, &api4(src, ACK), XDP_DROP);
    let state = h.probation(&v4(src)).expect("still in probation");
    assert_eq!(state.packets, PROBATION_MAX_PACKETS + 1);
    assert!(h.source(&v4(src)).is_none());
    assert_stats(
        &h,
        &[
            (PASS, API, 1 + u64::from(PROBATION_MAX_SYNS + acks)),
            (DROP, SYN_CEILING, 4),
            (DROP, PACKET_CEILING, 1),
        ],
    );
}

#[test]
fn a_probation_sources_syns_take_the_syn_ack_caps_tokens() {
    // The kernel answers each SYN it is passed: that reflection is capped
    // with the challenge's own.
    let mut h = flooded();
    h.update_config(|c| c.max_syn_acks = 3);
    let src = [198, 51, 100, 10];
    h.put_probation(&v4(src), &SourceState::default());
    for expected in [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP] {
        send(&h, &api4(src, SYN), expected);
    }
    assert_stats(&h, &[(PASS, API, 4), (DROP, SYN_ACK_CAP, 2)]);
}

#[test]
fn during_a_flood_packets_the_challenge_cannot_answer_get_no_entry_either() {
    // A window over the new-source budget flags the next one as a flood:
    // then a fragment (which the challenge cannot answer) from a new source
    // is turned away like everything else unknown, though the new window's
    // budget is untouched.
    limiter_tests::pin_to_cpu(0);
    let mut h = Harness::new();
    let window = Duration::from_millis(300);
    h.update_config(|c| {
        c.window_ns = u64::try_from(window.as_nanos()).unwrap();
        c.max_new_sources = 1;
        c.syn_challenge = 1;
        c.challenge_key = [7, 11];
    });
    send(&h, &api4([192, 0, 2, 1], ACK), XDP_PASS);
    send(&h, &api4([192, 0, 2, 2], ACK), XDP_DROP);
    std::thread::sleep(window + window / 3);
    let fragment = Frame::tcp4([192, 0, 2, 3], API_PORT, ACK)
        .ipv4_frag(IPV4_MF)
        .build();
    send(&h, &fragment, XDP_DROP);
    assert!(
        h.source(&v4([192, 0, 2, 3])).is_none(),
        "no entry in a flood"
    );
    assert_stats(&h, &[(PASS, API, 1), (DROP, NEW_SOURCE_CEILING, 2)]);
}

#[test]
fn a_source_left_in_probation_graduates_once_the_flood_is_over() {
    // Outside a flood no source needs proof: one a flood left in probation
    // (a client whose socket the lookup cannot see, say) gets its entry as
    // any new source would, and with it a known source's ceilings.
    limiter_tests::pin_to_cpu(0);
    let mut h = Harness::new();
    h.update_config(|c| {
        c.window_ns = crate::support::WINDOW_NS;
        c.max_new_sources = 4;
        c.syn_challenge = 1;
        c.challenge_key = [7, 11];
    });
    let src = [198, 51, 100, 11];
    h.put_probation(&v4(src), &SourceState::default());
    send(&h, &api4(src, ACK), XDP_PASS);
    assert!(h.probation(&v4(src)).is_none(), "out of probation");
    assert_eq!(h.source(&v4(src)).expect("an entry").packets, 1);
    for _ in 0..PROBATION_MAX_PACKETS + 10 {
        send(&h, &api4(src, ACK), XDP_PASS);
    }
    assert_stats(
        &h,
        &[
            (PASS, PROMOTED, 1),
            (PASS, API, u64::from(PROBATION_MAX_PACKETS + 10)),
        ],
    );
}
