//! IPv6 sources grouped by the configured prefix into one entry.

use limiter_common::{ipv6_mask, reason::API, verdict::PASS};
use limiter_tests::{
    packet::{ACK, SYN},
    xdp::{Harness, XDP_PASS},
};

use crate::support::{api6, assert_counts, assert_stats, send, v6, v6_64};

#[test]
fn ipv6_sources_in_one_64_share_an_entry() {
    let h = Harness::new();
    send(&h, &api6("2001:db8:1:2::1", SYN), XDP_PASS);
    send(&h, &api6("2001:db8:1:2:ffff:ffff:ffff:fffe", ACK), XDP_PASS);
    send(&h, &api6("2001:db8:1:3::1", SYN), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 3)]);
    assert_eq!(v6_64("2001:db8:1:2::1"), v6("2001:db8:1:2::", 128));
    assert_counts(&h, &v6_64("2001:db8:1:2::1"), 2, 1, 0);
    assert_counts(&h, &v6_64("2001:db8:1:3::1"), 1, 1, 0);
    assert_eq!(h.source_count(), 2);
}

#[test]
fn ipv6_grouping_prefix_is_configurable() {
    let mut h = Harness::new();
    h.update_config(|c| c.ipv6_mask = ipv6_mask(48));
    send(&h, &api6("2001:db8:1:2::1", SYN), XDP_PASS);
    send(&h, &api6("2001:db8:1:ffff::2", ACK), XDP_PASS);
    send(&h, &api6("2001:db8:2::1", SYN), XDP_PASS);
    assert_stats(&h, &[(PASS, API, 3)]);
    assert_counts(&h, &v6("2001:db8:1::", 48), 2, 1, 0);
    assert_counts(&h, &v6("2001:db8:2::", 48), 1, 1, 0);
    assert!(h.source(&v6_64("2001:db8:1:2::1")).is_none());
    assert_eq!(h.source_count(), 2);

    // /128: every address on its own.
    h.update_config(|c| c.ipv6_mask = ipv6_mask(128));
    send(&h, &api6("2001:db8:1:2::1", ACK), XDP_PASS);
    send(&h, &api6("2001:db8:1:2::2", ACK), XDP_PASS);
    assert_counts(&h, &v6("2001:db8:1:2::1", 128), 1, 0, 0);
    assert_counts(&h, &v6("2001:db8:1:2::2", 128), 1, 0, 0);
    assert_eq!(h.source_count(), 4);
    assert_stats(&h, &[(PASS, API, 5)]);
}
