//! The SYN challenge: while the new-source budget is spent, a source the map
//! does not hold gets a SYN-ACK whose acknowledgment number is a cookie
//! (`XDP_TX`), and is admitted to probation when it answers with a RST
//! carrying that cookie, as a real TCP stack in SYN-SENT does (and as any
//! host does for a SYN-ACK it did not ask for: `probation.rs`).

use limiter_common::{
    reason::{API, CHALLENGE_PASSED, NEW_SOURCE_CEILING, SYN_CHALLENGE},
    verdict::{DROP, PASS, TX, WOULD_DROP},
};
use limiter_tests::{
    packet::{ACK, Frame, RST, SYN, seal, sealed},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_PASS, XDP_TX},
};

use crate::support::{
    DEST_OPTS, ETH_LEN, IPV4_LEN, IPV6_LEN, WINDOW_NS, api4, assert_stats, pin_to_one_cpu, send,
    v4, v6_64,
};

/// MSS 1460, SACK permitted, timestamps, a NOP and window scale 7: what
/// Linux puts in a SYN (20 bytes).
const SYN_OPTIONS: [u8; 20] = [
    2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 3, 3, 7,
];
const CLIENT_ISN: u32 = 0x1234_5678;

/// A harness whose new-source budget is spent by one known source.
pub fn flooded() -> Harness {
    // The budget is per CPU, and BPF_PROG_TEST_RUN runs on the caller's.
    pin_to_one_cpu();
    let mut h = Harness::new();
    h.update_config(|c| {
        // Ten-second windows: the budget must not refill midway.
        c.window_ns = WINDOW_NS;
        c.max_new_sources = 1;
        c.syn_challenge = 1;
        c.challenge_key = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
    });
    send(&h, &api4([192, 0, 2, 1], SYN), XDP_PASS);
    h
}

/// A SYN as a client's stack sends it, checksums included.
pub fn syn(frame: Frame) -> Vec<u8> {
    let mut bytes = frame.tcp_header(CLIENT_ISN, &SYN_OPTIONS).build();
    seal(&mut bytes);
    bytes
}

/// The RST a client's stack answers an unacceptable SYN-ACK with: sequence
/// number = the SYN-ACK's acknowledgment number, no ACK flag (RFC 9293).
pub fn rst(frame: Frame, challenge: &[u8], l4: usize) -> Vec<u8> {
    let ack = u32::from_be_bytes(challenge[l4 + 8..l4 + 12].try_into().unwrap());
    let mut bytes = frame.tcp_header(ack, &[]).build();
    seal(&mut bytes);
    bytes
}

/// Asserts `answer` is `request` turned around: MACs, addresses and ports
/// swapped, SYN+ACK, an acknowledgment that is not the acceptable one, the
/// options overwritten with no-ops, and checksums a receiver accepts.
#[track_caller]
fn assert_challenge(request: &[u8], answer: &[u8], ip_len: usize) {
    let (l3, l4) = (ETH_LEN, ETH_LEN + ip_len);
    let addr = if ip_len == IPV4_LEN {
        (12, 16, 4)
    } else {
        (8, 24, 16)
    };
    assert_eq!(answer.len(), request.len());
    assert_eq!(answer[0..6], request[6..12], "destination MAC");
    assert_eq!(answer[6..12], request[0..6], "source MAC");
    let (src, dst, n) = addr;
    assert_eq!(
        answer[l3 + src..l3 + src + n],
        request[l3 + dst..l3 + dst + n]
    );
    assert_eq!(
        answer[l3 + dst..l3 + dst + n],
        request[l3 + src..l3 + src + n]
    );
    assert_eq!(answer[l4..l4 + 2], request[l4 + 2..l4 + 4], "source port");
    assert_eq!(
        answer[l4 + 2..l4 + 4],
        request[l4..l4 + 2],
        "destination port"
    );
    assert_eq!(answer[l4 + 13], SYN | ACK, "flags");
    let ack = u32::from_be_bytes(answer[l4 + 8..l4 + 12].try_into().unwrap());
    assert_ne!(
        ack,
        CLIENT_ISN + 1,
        "an acceptable SYN-ACK completes nothing"
    );
    assert_eq!(answer[l4 + 12], request[l4 + 12], "same header length");
    assert!(
        answer[l4 + 20..l4 + 40].iter().all(|&b| b == 1),
        "options are no-ops: {:?}",
        &answer[l4 + 20..l4 + 40]
    );
    assert!(sealed(answer), "the checksums verify: {answer:02x?}");
}

#[test]
fn an_unknown_sources_syn_during_a_flood_gets_a_challenge_and_no_entry() {
    let h = flooded();
    let request = syn(Frame::tcp4([198, 51, 100, 7], API_PORT, SYN));
    assert!(sealed(&request));
    let (action, answer) = h.run_out(&request);
    assert_eq!(action, XDP_TX);
    assert_challenge(&request, &answer, IPV4_LEN);
    // The cookie depends on the source: another source gets another one.
    let (_, other) = h.run_out(&syn(Frame::tcp4([198, 51, 100, 8], API_PORT, SYN)));
    let ack = |f: &[u8]| f[ETH_LEN + IPV4_LEN + 8..ETH_LEN + IPV4_LEN + 12].to_vec();
    assert_ne!(ack(&answer), ack(&other));
    assert_stats(&h, &[(PASS, API, 1), (TX, SYN_CHALLENGE, 2)]);
    assert_eq!(h.source_count(), 1, "challenges create no entry");
}

#[test]
fn a_rst_with_the_cookie_admits_the_source_to_probation_and_its_next_syn_passes() {
    let h = flooded();
    let src = [198, 51, 100, 9];
    let (_, answer) = h.run_out(&syn(Frame::tcp4(src, API_PORT, SYN)));
    let l4 = ETH_LEN + IPV4_LEN;
    send(
        &h,
        &rst(Frame::tcp4(src, API_PORT, RST), &answer, l4),
        XDP_DROP,
    );
    assert!(h.probation(&v4(src)).is_some(), "admitted to probation");
    assert!(h.source(&v4(src)).is_none(), "not to the per-source map");
    // Its SYN, sent again, goes to the listener and is counted as usual.
    send(&h, &syn(Frame::tcp4(src, API_PORT, SYN)), XDP_PASS);
    assert_eq!(h.probation(&v4(src)).expect("in probation").syns, 1);
    assert_stats(
        &h,
        &[
            (PASS, API, 2),
            (TX, SYN_CHALLENGE, 1),
            (DROP, CHALLENGE_PASSED, 1),
        ],
    );
}

#[test]
fn a_guessed_or_borrowed_cookie_admits_nobody() {
    let h = flooded();
    let src = [198, 51, 100, 10];
    let (_, answer) = h.run_out(&syn(Frame::tcp4(src, API_PORT, SYN)));
    let l4 = ETH_LEN + IPV4_LEN;
    let good = rst(Frame::tcp4(src, API_PORT, RST), &answer, l4);
    // A spoofer guessing: any other sequence number.
    for seq in [0, 1, CLIENT_ISN + 1, u32::MAX] {
        let mut guess = Frame::tcp4(src, API_PORT, RST).tcp_header(seq, &[]).build();
        seal(&mut guess);
        send(&h, &guess, XDP_DROP);
    }
    // The right cookie from another address or another port.
    let mut other_src = good.clone();
    other_src[ETH_LEN + 15] = 11;
    send(&h, &other_src, XDP_DROP);
    let mut other_port = good.clone();
    other_port[l4 + 1] ^= 1;
    send(&h, &other_port, XDP_DROP);
    // A plain ACK with the cookie in its acknowledgment number is no RST.
    let mut ack = good.clone();
    ack[l4 + 13] = ACK;
    send(&h, &ack, XDP_DROP);
    assert_eq!(h.source_count(), 1, "nobody admitted");
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (TX, SYN_CHALLENGE, 1),
            (DROP, NEW_SOURCE_CEILING, 7),
        ],
    );
}

#[test]
fn ipv6_sources_get_the_challenge_too_unless_extension_headers_are_in_the_way() {
    let h = flooded();
    let src = "2001:db8:c::1";
    let request = syn(Frame::tcp6(src, API_PORT, SYN));
    let (action, answer) = h.run_out(&request);
    assert_eq!(action, XDP_TX);
    assert_challenge(&request, &answer, IPV6_LEN);
    let l4 = ETH_LEN + IPV6_LEN;
    send(
        &h,
        &rst(Frame::tcp6(src, API_PORT, RST), &answer, l4),
        XDP_DROP,
    );
    assert!(h.probation(&v6_64(src)).is_some(), "admitted by its /64");
    // Behind an extension header the answer would carry it back: dropped.
    let behind = Frame::tcp6("2001:db8:c:1::1", API_PORT, SYN)
        .ipv6_ext(DEST_OPTS, 8)
        .build();
    send(&h, &behind, XDP_DROP);
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (TX, SYN_CHALLENGE, 1),
            (DROP, CHALLENGE_PASSED, 1),
            (DROP, NEW_SOURCE_CEILING, 1),
        ],
    );
}

#[test]
fn without_the_challenge_or_in_observe_mode_nothing_is_answered() {
    let mut h = flooded();
    h.update_config(|c| c.syn_challenge = 0);
    let request = syn(Frame::tcp4([198, 51, 100, 12], API_PORT, SYN));
    send(&h, &request, XDP_DROP);
    h.update_config(|c| {
        c.syn_challenge = 1;
        c.mode = limiter_common::mode::OBSERVE;
    });
    send(&h, &request, XDP_PASS);
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (DROP, NEW_SOURCE_CEILING, 1),
            (WOULD_DROP, NEW_SOURCE_CEILING, 1),
        ],
    );
}

#[test]
fn within_the_budget_a_new_source_is_never_challenged() {
    let mut h = Harness::new();
    h.update_config(|c| c.syn_challenge = 1);
    send(
        &h,
        &syn(Frame::tcp4([198, 51, 100, 13], API_PORT, SYN)),
        XDP_PASS,
    );
    assert_stats(&h, &[(PASS, API, 1)]);
}

#[test]
fn after_a_window_over_budget_every_unknown_syn_is_challenged_and_spends_nothing() {
    // A flood that went on past its first window adds no entry after it:
    // SYNs of unknown sources go straight to the challenge.
    pin_to_one_cpu();
    let mut h = Harness::new();
    // Long enough for five packets under emulation (the VM matrix).
    let window = std::time::Duration::from_secs(2);
    h.update_config(|c| {
        c.max_new_sources = 2;
        c.window_ns = u64::try_from(window.as_nanos()).unwrap();
        c.syn_challenge = 1;
    });
    let fresh = |i: u8| syn(Frame::tcp4([198, 51, 100, 20 + i], API_PORT, SYN));
    for (i, want) in [XDP_PASS, XDP_PASS, XDP_TX, XDP_TX, XDP_TX]
        .into_iter()
        .enumerate()
    {
        send(&h, &fresh(u8::try_from(i).unwrap()), want);
    }
    std::thread::sleep(window + window / 4);
    // The budget is fresh, but the window before went over: challenged.
    send(&h, &fresh(10), XDP_TX);
    // Other packets of unknown sources spend the budget too, and during a
    // flood get no entry: the challenge is the only way in.
    send(&h, &api4([198, 51, 100, 40], ACK), XDP_DROP);
    std::thread::sleep(window + window / 4);
    // That window stayed within the budget: the flood is over.
    send(&h, &fresh(11), XDP_PASS);
    assert_stats(
        &h,
        &[
            (PASS, API, 3),
            (TX, SYN_CHALLENGE, 4),
            (DROP, NEW_SOURCE_CEILING, 1),
        ],
    );
    assert_eq!(h.source_count(), 3);
}

#[test]
fn the_answer_carries_a_whole_checksum_whatever_the_syn_carried() {
    // A SYN from a local veth holds only the pseudo-header's partial sum,
    // left for a device to finish; the answer's checksum is computed afresh.
    let h = flooded();
    let mut request = syn(Frame::tcp4([198, 51, 100, 14], API_PORT, SYN));
    let l4 = ETH_LEN + IPV4_LEN;
    request[l4 + 16..l4 + 18].copy_from_slice(&[0xde, 0xad]);
    let (action, answer) = h.run_out(&request);
    assert_eq!(action, XDP_TX);
    assert!(sealed(&answer), "the checksums verify: {answer:02x?}");
    // A SYN carrying data (TCP Fast Open) is not turned around: dropped.
    let mut with_data = Frame::tcp4([198, 51, 100, 15], API_PORT, SYN)
        .tcp_header(CLIENT_ISN, &SYN_OPTIONS)
        .build();
    with_data.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    let total = u16::try_from(with_data.len() - ETH_LEN).unwrap();
    with_data[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&total.to_be_bytes());
    seal(&mut with_data);
    send(&h, &with_data, XDP_DROP);
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (TX, SYN_CHALLENGE, 1),
            (DROP, NEW_SOURCE_CEILING, 1),
        ],
    );
}
