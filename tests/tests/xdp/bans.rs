//! Bans written by userspace through the agent's map layer, and when the program
//! re-reads the tries (the policy generation).

use limiter_common::{
    SOURCE_ALLOWED,
    reason::{ALLOWLISTED, API, BANNED, NON_API},
    verdict::{DROP, PASS},
};
use limiter_tests::{
    monotonic_ns,
    packet::{ACK, Frame, SYN},
    xdp::{API_PORT, Harness, XDP_DROP, XDP_PASS},
};

use crate::support::{
    MINUTE, OTHER_PORT, SECOND, api4, api6, assert_counts, assert_stats, entry, host, net, send,
    send_n, v4,
};

#[test]
fn a_ban_in_the_future_drops_api_packets() {
    let mut h = Harness::new();
    let src = [203, 0, 113, 1];
    let until = monotonic_ns() + MINUTE;
    h.ban(host(src), until);
    send(&h, &api4(src, SYN), XDP_DROP);
    send(&h, &api4(src, ACK), XDP_DROP);
    assert_stats(&h, &[(DROP, BANNED, 2)]);
    let s = entry(&h, &v4(src));
    assert_eq!(s.ban_until_ns, until, "the ban's deadline is cached: {s:?}");
    assert_eq!(s.policy_gen, 2, "{s:?}");
    assert_eq!(
        (s.packets, s.syns),
        (0, 0),
        "banned packets are not counted"
    );
}

#[test]
fn a_ban_in_the_past_is_ignored() {
    let mut h = Harness::new();
    let src = [203, 0, 113, 2];
    let until = monotonic_ns() - SECOND;
    h.ban(host(src), until);
    send(&h, &api4(src, SYN), XDP_PASS);
    send(&h, &api4(src, ACK), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 2)]);
    assert_counts(&h, &v4(src), 2, 1, 0);
    assert_eq!(entry(&h, &v4(src)).ban_until_ns, until);
}

#[test]
fn a_ban_on_a_known_source_applies_from_the_next_packet() {
    let mut h = Harness::new();
    let src = [203, 0, 113, 3];
    let key = v4(src);
    send_n(&h, &api4(src, ACK), 2, XDP_PASS);
    assert_eq!(entry(&h, &key).policy_gen, 1);
    let until = monotonic_ns() + MINUTE;
    h.ban(host(src), until);
    send(&h, &api4(src, ACK), XDP_DROP);
    assert_stats(&h, &[(PASS, API, 2), (DROP, BANNED, 1)]);
    let s = entry(&h, &key);
    assert_eq!((s.ban_until_ns, s.policy_gen), (until, 2), "{s:?}");
    assert_eq!(s.packets, 2, "the banned packet is not counted");
}

/// A ban that is not there (swept after it expired, or never written) is
/// no error to lift: the fleet lifts bans the kernel may have swept, and
/// `limiter-agent unban` says the net is not banned.
#[test]
fn lifting_a_ban_that_is_not_there_says_so_without_an_error() {
    let mut h = Harness::new();
    let src = [203, 0, 113, 9];
    assert!(!h.lift(host(src)), "never banned");
    h.ban(host(src), monotonic_ns() + MINUTE);
    assert!(h.lift(host(src)), "banned");
    assert!(!h.lift(host(src)), "lifted already");
    send(&h, &api4(src, SYN), XDP_PASS);
}

#[test]
fn unban_lifts_a_ban() {
    let mut h = Harness::new();
    let src = [203, 0, 113, 4];
    let key = v4(src);
    h.ban(host(src), monotonic_ns() + MINUTE);
    send(&h, &api4(src, SYN), XDP_DROP);
    h.unban(host(src));
    send(&h, &api4(src, SYN), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 1), (DROP, BANNED, 1)]);
    let s = entry(&h, &key);
    assert_eq!((s.ban_until_ns, s.policy_gen), (0, 3), "{s:?}");
    assert_counts(&h, &key, 1, 1, 0);
}

#[test]
fn an_ipv4_24_ban_covers_every_address_in_the_24() {
    let mut h = Harness::new();
    h.ban(net("203.0.113.0/24"), monotonic_ns() + MINUTE);
    send(&h, &api4([203, 0, 113, 77], SYN), XDP_DROP);
    send(&h, &api4([203, 0, 113, 255], ACK), XDP_DROP);
    send(&h, &api4([203, 0, 114, 1], SYN), XDP_PASS);
    send(&h, &api4([203, 0, 112, 255], SYN), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 2), (DROP, BANNED, 2)]);
    assert!(entry(&h, &v4([203, 0, 113, 77])).ban_until_ns > monotonic_ns());
    assert_eq!(entry(&h, &v4([203, 0, 114, 1])).ban_until_ns, 0);
}

#[test]
fn an_ipv6_ban_covers_its_prefix() {
    let mut h = Harness::new();
    h.ban(net("2001:db8:7::/64"), monotonic_ns() + MINUTE);
    h.ban(net("2001:db8:8::/48"), monotonic_ns() + MINUTE);
    send(&h, &api6("2001:db8:7::1", SYN), XDP_DROP);
    send(&h, &api6("2001:db8:7::ffff:1", SYN), XDP_DROP);
    send(&h, &api6("2001:db8:8:1234::1", SYN), XDP_DROP);
    send(&h, &api6("2001:db8:7:1::1", SYN), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 1), (DROP, BANNED, 3)]);
    assert_eq!(
        h.source_count(),
        3,
        "2001:db8:7::/64, 2001:db8:8:1234::/64, 2001:db8:7:1::/64"
    );
}

#[test]
fn a_banned_source_passes_to_a_non_api_port() {
    let mut h = Harness::new();
    let src = [203, 0, 113, 5];
    h.ban(host(src), monotonic_ns() + MINUTE);
    send(&h, &Frame::tcp4(src, OTHER_PORT, SYN).build(), XDP_PASS);
    send(
        &h,
        &Frame::tcp6("2001:db8:9::1", 443, SYN).build(),
        XDP_PASS,
    );
    send(&h, &api4(src, SYN), XDP_DROP);
    assert_stats(&h, &[(PASS, NON_API, 2), (DROP, BANNED, 1)]);
}

#[test]
fn a_banned_source_passes_udp() {
    let mut h = Harness::new();
    let src = [203, 0, 113, 6];
    h.ban(host(src), monotonic_ns() + MINUTE);
    h.ban(net("2001:db8:a::/64"), monotonic_ns() + MINUTE);
    send(&h, &api4(src, 0), XDP_DROP);
    send(
        &h,
        &Frame::tcp4(src, API_PORT, 0).udp(API_PORT).build(),
        XDP_PASS,
    );
    send(&h, &Frame::tcp4(src, API_PORT, 0).udp(53).build(), XDP_PASS);
    send(
        &h,
        &Frame::tcp6("2001:db8:a::1", API_PORT, 0)
            .udp(API_PORT)
            .build(),
        XDP_PASS,
    );
    assert_stats(&h, &[(PASS, NON_API, 3), (DROP, BANNED, 1)]);
}

#[test]
fn a_known_source_reads_the_tries_only_when_the_generation_changes() {
    // The tries are cached in the entry: a trie change without a generation bump
    // is not seen by a source the program already counts.
    let mut h = Harness::new();
    let src = [203, 0, 113, 7];
    let key = v4(src);
    send(&h, &api4(src, SYN), XDP_PASS);
    // Ban in the trie only: `ban` bumps the generation, so undo that.
    h.ban(host(src), monotonic_ns() + MINUTE);
    h.update_config(|c| c.policy_gen -= 1);
    send(&h, &api4(src, ACK), XDP_PASS);
    assert_eq!(entry(&h, &key).ban_until_ns, 0, "no trie read");
    h.update_config(|c| c.policy_gen += 1);
    send(&h, &api4(src, ACK), XDP_DROP);
    assert_stats(&h, &[(PASS, API, 2), (DROP, BANNED, 1)]);
}

#[test]
fn a_banned_source_reads_the_tries_only_when_the_generation_changes() {
    // The tries are read "only for a new source or when userspace bumps the
    // policy generation" (docs/xdp.md), banned sources included. A banned source's
    // entry never starts a window (window_start_ns stays 0), and the program
    // once re-read both tries whenever window_start_ns was 0: every packet of a
    // banned flood cost two LPM lookups. That shows as a trie change without a
    // generation bump being picked up at once.
    let mut h = Harness::new();
    let src = [203, 0, 113, 8];
    let key = v4(src);
    let until = monotonic_ns() + MINUTE;
    h.ban(host(src), until);
    send(&h, &api4(src, SYN), XDP_DROP);
    // Lift the ban in the trie only: `unban` bumps the generation, so undo that.
    h.unban(host(src));
    h.update_config(|c| c.policy_gen -= 1);
    assert_eq!(entry(&h, &key).policy_gen, h.config().policy_gen);
    send(&h, &api4(src, SYN), XDP_DROP);
    assert_eq!(entry(&h, &key).ban_until_ns, until, "the cached ban stands");
    assert_stats(&h, &[(DROP, BANNED, 2)]);
}

#[test]
fn an_allowed_source_reads_the_tries_only_when_the_generation_changes() {
    // As for banned sources: an allowed source's entry keeps window_start_ns 0
    // too, and must not re-read the tries on every packet either.
    let mut h = Harness::new();
    let src = [203, 0, 113, 9];
    let key = v4(src);
    h.allow(host(src));
    send(&h, &api4(src, SYN), XDP_PASS);
    // Remove the trie entry only: `disallow` bumps the generation, so undo that.
    h.disallow(host(src));
    h.update_config(|c| c.policy_gen -= 1);
    send(&h, &api4(src, SYN), XDP_PASS);
    assert_eq!(
        entry(&h, &key).flags,
        SOURCE_ALLOWED,
        "the cached allow stands"
    );
    assert_stats(&h, &[(PASS, ALLOWLISTED, 2)]);
}
