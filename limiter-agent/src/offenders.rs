//! The offenders board: the clients rejected in their current windows, by
//! tier, as the dashboard shows them. The proxy notes each rejection (one
//! short lock, no allocation for a client already on the board); the board
//! holds at most [`OFFENDERS_MAX`] clients and forgets a client once its
//! window resets.

use std::{
    collections::{HashMap, hash_map::RandomState},
    hash::BuildHasher as _,
    sync::{Mutex, PoisonError},
};

use serde_json::{Value, json};

use crate::{identity::Identity, limit::Decision};

/// Clients the offenders board holds at most.
pub const OFFENDERS_MAX: usize = 512;
/// One rejection in this many is noted once a client has had as many in its
/// window.
const SAMPLE: u32 = 16;
/// Offenders shown.
const OFFENDERS_SHOWN: usize = 10;

/// The clients rejected in their current windows, by tier, with the store's
/// own count of their rejections.
pub struct Offenders {
    /// One rejection in this many is noted (see [`Offenders::note`]).
    sample: u32,
    /// Keyed by a keyed hash of (route, identity), so a rejection of a client
    /// already on the board allocates nothing.
    clients: Mutex<HashMap<u64, Row>>,
    hasher: RandomState,
}

#[derive(Clone, Debug)]
struct Row {
    route: Box<str>,
    /// As shown: the address, or a prefix of the key's hash.
    client: Box<str>,
    rejected: u32,
    limit: u32,
    reset_ms: u64,
}

impl Default for Offenders {
    fn default() -> Self {
        Self {
            sample: SAMPLE,
            clients: Mutex::default(),
            hasher: RandomState::new(),
        }
    }
}

impl Offenders {
    /// Notes a rejection (or a would-be one) of `identity` on `route`.
    /// Sampled: a client's first [`SAMPLE`] rejections in a window, then
    /// one in [`SAMPLE`] of the rejections this thread sees (the board
    /// shows the store's count as of the last one noted), so a flood of
    /// 429s costs the board a lock and a hash only now and then.
    pub fn note(&self, route: &str, identity: &Identity, decision: &Decision, now_ms: u64) {
        thread_local! {
            static SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        let seen = SEEN.with(|seen| {
            let n = seen.get().wrapping_add(1);
            seen.set(n);
            n
        });
        if decision.rejected > self.sample && !seen.is_multiple_of(self.sample) {
            return;
        }
        let key = self.hasher.hash_one((route, identity));
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = clients.get_mut(&key) {
            known.rejected = decision.rejected;
            known.limit = decision.limit;
            known.reset_ms = decision.reset_ms;
            return;
        }
        if clients.len() >= OFFENDERS_MAX {
            make_room(&mut clients, now_ms);
        }
        let client = match identity {
            // Only a prefix of the key's hash: enough to tell clients apart.
            Identity::Key(sha256) => format!("key {}…", sha256.get(..12).unwrap_or(sha256)),
            Identity::Ip(ip) => ip.to_string(),
        };
        clients.insert(
            key,
            Row {
                route: route.into(),
                client: client.into(),
                rejected: decision.rejected,
                limit: decision.limit,
                reset_ms: decision.reset_ms,
            },
        );
    }

    /// Drops clients whose window has reset; the top ones by rejections.
    pub fn top(&self, now_ms: u64) -> Vec<Value> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.retain(|_, o| o.reset_ms > now_ms);
        let mut rows: Vec<&Row> = clients.values().collect();
        rows.sort_by(|a, b| {
            b.rejected
                .cmp(&a.rejected)
                .then_with(|| (&a.route, &a.client).cmp(&(&b.route, &b.client)))
        });
        rows.into_iter()
            .take(OFFENDERS_SHOWN)
            .map(|o| {
                json!({
                    "client": o.client,
                    "tier": o.route,
                    "rejected": o.rejected,
                    "limit": o.limit,
                    "remaining": 0,
                    "reset_seconds": (o.reset_ms - now_ms).div_ceil(1000),
                })
            })
            .collect()
    }
}

/// A full board forgets the clients whose windows reset and, unless that
/// freed a quarter of it, the half with the fewest rejections at once: a
/// stream of ever-new rejected clients costs a scan per `OFFENDERS_MAX / 4`
/// of them at most, not one each, however their windows are staggered.
fn make_room(clients: &mut HashMap<u64, Row>, now_ms: u64) {
    clients.retain(|_, o| o.reset_ms > now_ms);
    if clients.len() <= OFFENDERS_MAX - OFFENDERS_MAX / 4 {
        return;
    }
    let mut ranked: Vec<(u32, u64, u64)> = clients
        .iter()
        .map(|(key, o)| (o.rejected, o.reset_ms, *key))
        .collect();
    let half = ranked.len() / 2;
    ranked.select_nth_unstable(half);
    for (_, _, key) in &ranked[..half] {
        clients.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn rejected(count: u32, reset_ms: u64) -> Decision {
        Decision {
            allowed: false,
            limit: 5,
            remaining: 0,
            reset_ms,
            rejected: count,
            window: reset_ms,
        }
    }

    #[test]
    fn a_flood_is_noted_now_and_then() {
        let board = Offenders::default();
        let ip = Identity::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        for count in 1..=40 {
            board.note("/a", &ip, &rejected(count, 10_000), 0);
        }
        // Every one of the first 16, then one in 16 of the thread's.
        let noted = board.top(1_000)[0]["rejected"].as_u64().unwrap();
        assert!((17..40).contains(&noted), "{noted}");
    }

    #[test]
    fn the_board_ranks_current_offenders_hides_keys_and_forgets_reset_windows() {
        let board = Offenders::default();
        let ip = |last| Identity::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)));
        board.note("/a", &ip(1), &rejected(2, 10_000), 0);
        board.note("/a", &ip(1), &rejected(3, 10_000), 0);
        board.note("/a", &ip(2), &rejected(9, 5_000), 0);
        board.note(
            "/b",
            &Identity::Key("ab".repeat(32)),
            &rejected(4, 20_000),
            0,
        );
        let top = board.top(1_000);
        let clients: Vec<_> = top.iter().map(|r| r["client"].as_str().unwrap()).collect();
        assert_eq!(clients, ["192.0.2.2", "key abababababab…", "192.0.2.1"]);
        assert_eq!(top[2]["rejected"], 3, "the store's latest count");
        assert_eq!(top[0]["reset_seconds"], 4);
        // 192.0.2.2's window reset at 5 s.
        assert_eq!(board.top(6_000).len(), 2);
    }

    #[test]
    fn a_full_board_forgets_reset_windows_then_the_least_rejected_half() {
        let board = Offenders {
            sample: 1,
            ..Offenders::default()
        };
        let ip = |i: usize| Identity::Ip(IpAddr::from(u32::try_from(i).unwrap().to_be_bytes()));
        let shown = |board: &Offenders| -> Vec<String> {
            let clients = board.clients.lock().unwrap();
            clients.values().map(|o| o.client.to_string()).collect()
        };
        // Half of them in windows that reset at 5 s.
        for i in 0..OFFENDERS_MAX {
            let reset = if i % 2 == 0 { 5_000 } else { 10_000 };
            board.note(
                "/a",
                &ip(i),
                &rejected(10 + u32::try_from(i).unwrap(), reset),
                0,
            );
        }
        let newcomer = Identity::Ip(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)));
        board.note("/a", &newcomer, &rejected(1, 10_000), 6_000);
        let left = shown(&board);
        assert_eq!(left.len(), OFFENDERS_MAX / 2 + 1, "the reset windows went");
        assert!(left.contains(&"203.0.113.1".to_owned()));
        assert!(!left.contains(&"0.0.0.0".to_owned()));

        // Full of live windows: the least rejected half goes at once.
        for i in OFFENDERS_MAX..OFFENDERS_MAX * 2 {
            board.note(
                "/a",
                &ip(i),
                &rejected(10 + u32::try_from(i).unwrap(), 10_000),
                6_000,
            );
        }
        let left = shown(&board);
        assert!(left.len() <= OFFENDERS_MAX);
        assert!(
            !left.contains(&"203.0.113.1".to_owned()),
            "the least rejected"
        );
        let most = ip(OFFENDERS_MAX * 2 - 1);
        let Identity::Ip(most) = most else {
            unreachable!()
        };
        assert!(left.contains(&most.to_string()), "the most rejected stays");
    }

    /// Windows that reset one at a time do not turn the halving into a scan
    /// per new client.
    #[test]
    fn one_reset_window_does_not_spare_a_full_board_its_halving() {
        let board = Offenders::default();
        for i in 0..OFFENDERS_MAX {
            let ip = Identity::Ip(IpAddr::from(u32::try_from(i).unwrap().to_be_bytes()));
            let reset = if i == 0 { 5_000 } else { 10_000 };
            board.note("/a", &ip, &rejected(10, reset), 0);
        }
        let newcomer = Identity::Ip(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)));
        board.note("/a", &newcomer, &rejected(1, 10_000), 6_000);
        assert!(board.clients.lock().unwrap().len() <= OFFENDERS_MAX / 2 + 1);
    }
}
