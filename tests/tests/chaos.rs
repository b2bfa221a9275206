//! The short fault-injection run of `cargo xtask test` (the full one is
//! `cargo xtask chaos`): three agents sharing Redis, clients over all of
//! them, a partition, a paused Redis, a killed agent, a killed Redis under
//! `on_error = "deny"`; the recorded history is held to the documented
//! bounds and every change made around a fault reaches every agent.

use std::time::Duration;

use limiter_tests::chaos::{self, Fault, Plan, Store};

fn assert_checked(report: &serde_json::Value) {
    eprintln!("{report:#}");
    assert_eq!(
        report["ok"], true,
        "the checker refused the history: {report:#}"
    );
    assert!(
        report["admitted"].as_u64().unwrap_or(0) > 100,
        "enough was admitted to check anything: {report:#}"
    );
    for fault in report["faults"].as_array().expect("faults") {
        assert!(fault["requests"].as_u64().unwrap_or(0) > 10, "{fault}");
    }
}

#[test]
fn under_allow_a_fleet_stays_within_its_bounds_through_a_partition_a_pause_and_a_dead_agent() {
    let report = chaos::run(&Plan {
        store: Store::Redis,
        on_error: "allow",
        faults: vec![
            Fault::Partition(0),
            Fault::RedisPaused,
            Fault::AgentKilled(1),
        ],
        fault: Duration::from_secs(3),
        settle: Duration::from_secs(3),
        clients: 4,
        rate: 12.0,
    });
    assert_checked(&report);
    assert_eq!(
        report["largest_in_a_window_with_the_store"], 10,
        "with the store reached, clients got their limit and no more"
    );
}

#[test]
fn under_deny_a_killed_redis_never_lets_a_client_past_its_limit() {
    let report = chaos::run(&Plan {
        store: Store::Redis,
        on_error: "deny",
        faults: vec![Fault::RedisKilled, Fault::Partition(2)],
        fault: Duration::from_secs(3),
        settle: Duration::from_secs(3),
        clients: 4,
        rate: 12.0,
    });
    assert_checked(&report);
    for fault in report["faults"].as_array().expect("faults") {
        assert!(
            fault["refused_503"].as_u64().unwrap_or(0) > 0,
            "deny answers 503 while the store is out of reach: {fault}"
        );
    }
}
