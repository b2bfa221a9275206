//! Config parsing on arbitrary text: never a panic; a config that validates
//! builds its route table and survives a second validation of its own parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use limiter_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            assert!(!config.live.tiers.is_empty());
            assert!(config.live.route_table().is_ok(), "validated but unroutable");
            for tier in &config.live.tiers {
                assert!(tier.limit.get() >= 1);
                assert!(!tier.window.is_zero());
            }
        }
        Err(e) => {
            // Every refusal names what is wrong.
            assert!(!e.to_string().is_empty());
        }
    }
});
