//! Path canonicalisation and routing on arbitrary request targets: never a
//! panic; a canonical path is absolute, ASCII, free of dot segments, empty
//! segments and escapes, and canonical again unchanged (so no second spelling
//! of it exists); routing it never panics and is stable.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use limiter_agent::{
    config::Config,
    route::{PathPolicy, RouteTable, canonicalize},
};

/// The reference table, as the agent builds it from its default config.
fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        Config::parse(include_str!("../../examples/concurred.toml"))
            .expect("the reference config")
            .live
            .route_table()
            .expect("the reference table")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    for policy in [PathPolicy::Lenient, PathPolicy::Strict] {
        let Ok(path) = canonicalize(target, policy) else {
            continue;
        };
        assert!(path.starts_with('/'), "{target:?} -> {path:?}");
        assert!(path.is_ascii(), "{target:?} -> {path:?}");
        assert!(!path.contains('%') && !path.contains('?'), "{target:?} -> {path:?}");
        assert!(!path.bytes().any(|b| b.is_ascii_control()), "{target:?} -> {path:?}");
        for segment in path.split('/').skip(1) {
            assert!(segment != "." && segment != "..", "{target:?} -> {path:?}");
        }
        if path.len() > 1 {
            assert!(!path.contains("//"), "{target:?} -> {path:?}");
        }
        assert_eq!(
            canonicalize(&path, policy).as_deref(),
            Ok(path.as_str()),
            "not idempotent for {target:?}"
        );
        let tier = table().lookup(&path);
        assert_eq!(tier, table().lookup(&path));
    }
});
