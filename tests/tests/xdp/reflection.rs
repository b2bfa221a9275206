//! What the SYN challenge reflects: at most the SYN-ACK cap per CPU (a token
//! bucket), and nothing toward an address no reply may go to. Either way
//! the SYN is dropped unanswered and creates no entry.

use limiter_common::{
    reason::{API, MARTIAN_SOURCE, SYN_ACK_CAP, SYN_CHALLENGE},
    verdict::{DROP, PASS, TX},
};
use limiter_tests::{
    packet::{Frame, SYN},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_TX},
};

use crate::{
    challenge::{flooded, syn},
    support::{ETH_LEN, assert_stats, send},
};

/// A flooded harness whose CPU may send `cap` SYN-ACKs per (ten-second) window.
fn capped(cap: u32) -> Harness {
    let mut h = flooded();
    h.update_config(|c| c.max_syn_acks = cap);
    h
}

#[test]
fn syn_acks_stop_at_the_cap_and_the_rest_are_dropped_unanswered() {
    let h = capped(3);
    for i in 0..8u8 {
        let want = if i < 3 { XDP_TX } else { XDP_DROP };
        send(
            &h,
            &syn(Frame::tcp4([198, 51, 100, 100 + i], API_PORT, SYN)),
            want,
        );
    }
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (TX, SYN_CHALLENGE, 3),
            (DROP, SYN_ACK_CAP, 5),
        ],
    );
    assert_eq!(h.source_count(), 1, "no entry for a capped SYN");
    assert_eq!(h.probation_count(), 0);
}

#[test]
fn a_dropped_answer_spends_no_token() {
    // A SYN dropped unanswered (here: from a martian source) spends nothing
    // of the cap: only answers sent do.
    let h = capped(1);
    send(
        &h,
        &syn(Frame::tcp4([127, 0, 0, 1], API_PORT, SYN)),
        XDP_DROP,
    );
    send(
        &h,
        &syn(Frame::tcp4([198, 51, 100, 120], API_PORT, SYN)),
        XDP_TX,
    );
    send(
        &h,
        &syn(Frame::tcp4([198, 51, 100, 121], API_PORT, SYN)),
        XDP_DROP,
    );
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (TX, SYN_CHALLENGE, 1),
            (DROP, MARTIAN_SOURCE, 1),
            (DROP, SYN_ACK_CAP, 1),
        ],
    );
}

#[test]
fn no_answer_goes_to_martian_loopback_multicast_broadcast_or_our_own_addresses() {
    let h = flooded();
    let v4: [[u8; 4]; 8] = [
        [0, 0, 0, 0],         // unspecified
        [0, 1, 2, 3],         // "this network"
        [127, 0, 0, 1],       // loopback; also the frames' destination (ours)
        [127, 9, 9, 9],       // loopback
        [224, 0, 0, 251],     // multicast
        [239, 1, 2, 3],       // multicast
        [240, 0, 0, 1],       // reserved
        [255, 255, 255, 255], // limited broadcast
    ];
    for src in v4 {
        let request = syn(Frame::tcp4(src, API_PORT, SYN));
        let (action, answer) = h.run_out(&request);
        assert_eq!(action, XDP_DROP, "{src:?}");
        assert_eq!(answer, request, "{src:?}: the frame is left as it came");
    }
    let v6 = [
        "::",
        "::1",
        "ff02::1",
        "ff05::1:3",
        "::ffff:192.0.2.1",
        "::192.0.2.1",
    ];
    for src in v6 {
        send(&h, &syn(Frame::tcp6(src, API_PORT, SYN)), XDP_DROP);
    }
    // The SYN's own destination as its source (a LAND attack): the frames
    // go to 127.0.0.1 and ::1, so take a destination that is no martian.
    let mut land = syn(Frame::tcp4([198, 51, 100, 130], API_PORT, SYN));
    land[ETH_LEN + 16..ETH_LEN + 20].copy_from_slice(&[198, 51, 100, 130]);
    limiter_tests::packet::seal(&mut land);
    send(&h, &land, XDP_DROP);
    let mut land6 = syn(Frame::tcp6("2001:db8:9::1", API_PORT, SYN));
    let own: std::net::Ipv6Addr = "2001:db8:9::1".parse().unwrap();
    land6[ETH_LEN + 24..ETH_LEN + 40].copy_from_slice(&own.octets());
    limiter_tests::packet::seal(&mut land6);
    send(&h, &land6, XDP_DROP);
    // Any other address of the host, as the agent lists them.
    let mut h = h;
    h.set_local(&[
        std::net::IpAddr::from([198, 51, 100, 140]),
        "2001:db8:9::2".parse().unwrap(),
    ]);
    send(
        &h,
        &syn(Frame::tcp4([198, 51, 100, 140], API_PORT, SYN)),
        XDP_DROP,
    );
    send(
        &h,
        &syn(Frame::tcp6("2001:db8:9::2", API_PORT, SYN)),
        XDP_DROP,
    );
    // An ordinary address still gets the challenge.
    send(
        &h,
        &syn(Frame::tcp4([198, 51, 100, 131], API_PORT, SYN)),
        XDP_TX,
    );
    assert_stats(
        &h,
        &[
            (PASS, API, 1),
            (TX, SYN_CHALLENGE, 1),
            (DROP, MARTIAN_SOURCE, 18),
        ],
    );
    assert_eq!(h.source_count(), 1);
    assert_eq!(h.probation_count(), 0);
}
