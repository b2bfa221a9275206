//! `chaos`: the full fault-injection suite of `cargo xtask chaos`. Four runs
//! (Redis and a Redis Cluster with replicas, each under `on_error = "allow"`
//! and `"deny"`), every fault of `limiter_tests::chaos::Fault` in turn; the
//! report goes to `$LIMITER_BENCH_OUT/chaos.json` (default `target/bench`),
//! and the exit status is 1 if the checker refused any history.

use std::time::Duration;

use limiter_tests::chaos::{self, Fault, Plan, Store};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (fault, settle) = if quick {
        (Duration::from_secs(3), Duration::from_secs(3))
    } else {
        (Duration::from_secs(5), Duration::from_secs(5))
    };
    let plan = |store, on_error, faults| Plan {
        store,
        on_error,
        faults,
        fault,
        settle,
        clients: 6,
        rate: 12.0,
    };
    let single = vec![
        Fault::Partition(0),
        Fault::RedisPaused,
        Fault::RedisKilled,
        Fault::AgentKilled(1),
    ];
    let cluster = vec![Fault::Partition(2), Fault::Failover, Fault::AgentKilled(0)];
    let plans = [
        plan(Store::Redis, "allow", single.clone()),
        plan(Store::Redis, "deny", single),
        plan(Store::Cluster, "allow", cluster.clone()),
        plan(Store::Cluster, "deny", cluster),
    ];
    let mut runs = Vec::new();
    for plan in &plans {
        eprintln!(
            "== chaos: {:?} with on_error = {}, faults {:?}",
            plan.store, plan.on_error, plan.faults
        );
        let report = chaos::run(plan);
        eprintln!("{report:#}");
        runs.push(report);
    }
    let ok = runs.iter().all(|r| r["ok"] == true);
    let out = std::env::var_os("LIMITER_BENCH_OUT").map_or_else(
        || std::path::PathBuf::from("target/bench"),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&out).expect("output directory");
    let path = out.join("chaos.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({ "ok": ok, "runs": runs })).expect("JSON"),
    )
    .expect("chaos.json");
    println!("{}", path.display());
    if !ok {
        eprintln!(
            "chaos: the checker refused a history (see {})",
            path.display()
        );
        std::process::exit(1);
    }
}
