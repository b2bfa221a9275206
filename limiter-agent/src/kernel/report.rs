//! The kernel side's state as `limiter-agent status` and `/status` show it,
//! read from the maps.

use std::fmt::Write as _;

use limiter_common::mode;
use serde::Serialize;

use super::{maps::Maps, state::Attachment};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub instance: String,
    /// The running agent's pid, when one is running.
    pub agent_pid: Option<u32>,
    pub persist: bool,
    pub attachments: Vec<Attachment>,
    pub mode: &'static str,
    pub ports: Vec<u16>,
    pub ipv6_prefix: u32,
    pub max_packets_per_second: u32,
    pub max_syns_per_second: u32,
    /// New sources each CPU may start tracking per second.
    pub max_new_sources_per_cpu: u32,
    /// Unknown sources' SYNs over that budget get the SYN challenge.
    pub syn_challenge: bool,
    /// Challenge SYN-ACKs each CPU may send per second (0 = no cap).
    pub max_syn_acks_per_cpu: u32,
    /// Sources each CPU may admit to probation by the challenge per second.
    pub max_challenge_admissions_per_cpu: u32,
    /// Sources in probation (admitted by the challenge, not yet promoted).
    pub probation: usize,
    pub autoban_after_seconds: u16,
    pub autoban_seconds: u64,
    /// `jiffies` (calibrated tick clock) or `helper`.
    pub clock: &'static str,
    pub allow: Vec<String>,
    pub top_sources: Vec<SourceRow>,
    pub bans: Vec<BanRow>,
    /// Non-zero counters only.
    pub counters: Vec<CounterRow>,
}

#[derive(Debug, Serialize)]
pub struct SourceRow {
    pub addr: String,
    /// In the source's current one-second window (0 when that window is over).
    pub packets: u32,
    pub syns: u32,
    /// Seconds left on the kernel's own auto-ban, if any.
    pub autoban_seconds_left: u64,
}

#[derive(Debug, Serialize)]
pub struct BanRow {
    pub net: String,
    pub seconds_left: u64,
    /// The host that made it, when the fleet's entries say (see
    /// [`origins_path`]); `None` for a ban of this host's own making
    /// outside the fleet (`limiter-agent ban` on the pinned maps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// `escalation` or the admin token's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

/// Where the agent of `instance` writes the fleet's bans it applies, by
/// network, so `status` can say where each came from:
/// `{"store": {net: ban}, "local": {net: ban}}`.
#[must_use]
pub fn origins_path(instance: &str) -> std::path::PathBuf {
    super::state::run_state_path(instance).with_extension("bans.json")
}

#[derive(Debug, Serialize)]
pub struct CounterRow {
    pub verdict: &'static str,
    pub reason: &'static str,
    pub packets: u64,
}

fn seconds_left(until_ns: u64, now_ns: u64) -> u64 {
    until_ns.saturating_sub(now_ns).div_ceil(1_000_000_000)
}

impl Report {
    /// Fills in each ban's origin from the fleet's entries the agent of
    /// `self.instance` applies (nothing when it writes none).
    pub fn attach_origins(&mut self) {
        let Ok(bytes) = std::fs::read(origins_path(&self.instance)) else {
            return;
        };
        let Ok(origins) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return;
        };
        let field = |ban: &serde_json::Value, name: &str| ban[name].as_str().map(str::to_owned);
        for row in &mut self.bans {
            let ban = ["store", "local"]
                .iter()
                .find_map(|part| origins[part].get(&row.net));
            if let Some(ban) = ban {
                row.origin = field(ban, "origin");
                row.by = field(ban, "by");
                row.reason = field(ban, "reason");
                row.tier = field(ban, "tier");
            }
        }
    }

    /// Reads everything but the attachments (which only the agent knows).
    #[must_use]
    pub fn read(maps: &Maps, now_ns: u64, top: usize) -> Self {
        let config = maps.config().unwrap_or_default();
        let mut sources: Vec<SourceRow> = maps
            .sources()
            .into_iter()
            .map(|s| {
                let current = now_ns.saturating_sub(s.state.window_start_ns) < config.window_ns;
                SourceRow {
                    addr: s.addr.to_string(),
                    packets: if current { s.state.packets } else { 0 },
                    syns: if current { s.state.syns } else { 0 },
                    autoban_seconds_left: seconds_left(s.state.autoban_until_ns, now_ns),
                }
            })
            .collect();
        sources.sort_by(|a, b| {
            (b.packets, b.autoban_seconds_left).cmp(&(a.packets, a.autoban_seconds_left))
        });
        sources.truncate(top);
        let mut bans: Vec<BanRow> = maps
            .bans()
            .into_iter()
            .filter(|b| b.until_ns > now_ns)
            .map(|b| BanRow {
                net: b.net.to_string(),
                seconds_left: seconds_left(b.until_ns, now_ns),
                origin: None,
                by: None,
                reason: None,
                tier: None,
            })
            .collect();
        bans.sort_by_key(|b| std::cmp::Reverse(b.seconds_left));
        Self {
            mode: if config.mode == mode::OBSERVE {
                "observe"
            } else {
                "enforce"
            },
            ports: config
                .ports
                .iter()
                .filter(|p| **p != 0)
                .map(|p| u16::from_be(*p))
                .collect(),
            ipv6_prefix: config.ipv6_mask.iter().map(|b| b.count_ones()).sum(),
            max_packets_per_second: config.max_packets,
            max_syns_per_second: config.max_syns,
            max_new_sources_per_cpu: config.max_new_sources,
            syn_challenge: config.syn_challenge != 0,
            max_syn_acks_per_cpu: config.max_syn_acks,
            max_challenge_admissions_per_cpu: config.max_challenge_admissions,
            probation: maps.probation().len(),
            autoban_after_seconds: config.autoban_after_windows,
            autoban_seconds: config.autoban_ns / 1_000_000_000,
            clock: if config.clock.ns_per_jiffy == 0 {
                "helper"
            } else {
                "jiffies"
            },
            allow: maps.allow_list().iter().map(ToString::to_string).collect(),
            top_sources: sources,
            bans,
            counters: maps
                .stats()
                .into_iter()
                .filter(|(_, _, n)| *n != 0)
                .map(|(verdict, reason, packets)| CounterRow {
                    verdict,
                    reason,
                    packets,
                })
                .collect(),
            ..Self::default()
        }
    }

    /// The human-readable form.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = String::new();
        let agent = self.agent_pid.map_or_else(
            || "not running".to_owned(),
            |pid| format!("running (pid {pid})"),
        );
        let _ = writeln!(out, "instance:   {} (agent {agent})", self.instance);
        let _ = writeln!(out, "mode:       {}", self.mode);
        if self.attachments.is_empty() {
            let _ = writeln!(out, "interfaces: none recorded");
        } else {
            let list: Vec<String> = self
                .attachments
                .iter()
                .map(|a| format!("{} ({})", a.interface, a.mode))
                .collect();
            let persist = if self.persist { ", persist" } else { "" };
            let _ = writeln!(out, "interfaces: {}{persist}", list.join(", "));
        }
        let ports: Vec<String> = self.ports.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "ports:      {}", ports.join(", "));
        let _ = writeln!(
            out,
            "ceilings:   {} packets/s, {} SYNs/s per source; kernel ban of {} s after {} s over",
            self.max_packets_per_second,
            self.max_syns_per_second,
            self.autoban_seconds,
            self.autoban_after_seconds
        );
        let _ = writeln!(
            out,
            "new sources: {} per second per CPU; over it, SYNs {}",
            self.max_new_sources_per_cpu,
            if self.syn_challenge {
                "get the SYN challenge"
            } else {
                "are dropped"
            }
        );
        if self.syn_challenge {
            let _ = writeln!(
                out,
                "challenge:  {} SYN-ACKs/s and {} admissions/s per CPU; {} sources in probation",
                self.max_syn_acks_per_cpu, self.max_challenge_admissions_per_cpu, self.probation
            );
        }
        let _ = writeln!(
            out,
            "ipv6:       grouped by /{}; clock: {}",
            self.ipv6_prefix, self.clock
        );
        if !self.allow.is_empty() {
            let _ = writeln!(out, "allow:      {}", self.allow.join(", "));
        }
        let _ = writeln!(out, "\ntop sources (current second):");
        if self.top_sources.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for s in &self.top_sources {
            let ban = if s.autoban_seconds_left > 0 {
                format!("  auto-banned {} s", s.autoban_seconds_left)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  {:<40} {:>8} packets {:>6} SYNs{ban}",
                s.addr, s.packets, s.syns
            );
        }
        let _ = writeln!(out, "\nbans:");
        if self.bans.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for b in &self.bans {
            let from = match (&b.origin, &b.by) {
                (Some(origin), Some(by)) => format!(
                    "  from {origin} by {by}{}",
                    b.reason
                        .as_deref()
                        .filter(|r| !r.is_empty())
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
                _ => String::new(),
            };
            let _ = writeln!(out, "  {:<43} {} s left{from}", b.net, b.seconds_left);
        }
        let _ = writeln!(out, "\npackets by verdict and reason:");
        if self.counters.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for c in &self.counters {
            let _ = writeln!(
                out,
                "  {:<11} {:<15} {:>12}",
                c.verdict, c.reason, c.packets
            );
        }
        out
    }
}
