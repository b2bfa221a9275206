//! The idle upstream connections of one kind, newest last: a request takes
//! the newest one fit for it, a finished exchange puts its connection back,
//! and the agent's housekeeping closes the ones that went stale.
//!
//! A connection is fit when it leads to the request's upstream (a reload may
//! move it), has been idle less than [`IDLE_TIMEOUT`], and its own check
//! ([`Pooled::fit`]) passes. That check may be a system call, so unless the
//! kind says it is cheap it is never made under the pool's lock, and a
//! connection's drop (a close) never is.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

/// Idle connections older than this are closed.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_mins(1);
/// Most idle connections kept per pool; beyond it the oldest is closed.
pub(super) const MAX_IDLE: usize = 1024;

/// A connection a [`Pool`] can hold.
pub(super) trait Pooled {
    /// The `host:port` it was opened to.
    fn authority(&self) -> &str;
    /// Whether it can carry another request now (asked just before reuse).
    fn fit(&self) -> bool;
    /// Whether [`Self::fit`] is cheap (no system call): the sweep then asks
    /// it under the lock, and every kept connection stays takeable
    /// throughout. Otherwise the sweep takes the connections out to ask,
    /// and a request meanwhile finds the pool empty.
    const FIT_IS_CHEAP: bool = false;
    /// Called as it goes into the pool: a place to let go of large buffers.
    fn park(&mut self) {}
}

struct Idle<C> {
    since: Instant,
    conn: C,
}

pub(super) struct Pool<C> {
    idle: Mutex<VecDeque<Idle<C>>>,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Self {
            idle: Mutex::new(VecDeque::new()),
        }
    }
}

impl<C: Pooled> Pool<C> {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Idle<C>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest connection to `authority` fit for a request; the unfit
    /// ones met on the way are closed.
    pub(super) fn take(&self, authority: &str) -> Option<C> {
        self.take_at(authority, Instant::now())
    }

    /// [`Self::take`] with the clock read a moment ago (`now`).
    pub(super) fn take_at(&self, authority: &str, now: Instant) -> Option<C> {
        loop {
            let idle = self.lock().pop_back()?;
            if fresh(&idle, authority, now) && idle.conn.fit() {
                return Some(idle.conn);
            }
        }
    }

    /// Keeps `conn` for a later request; the oldest goes when the pool is full.
    pub(super) fn put(&self, mut conn: C) {
        conn.park();
        let oldest = {
            let mut idle = self.lock();
            let oldest = if idle.len() >= MAX_IDLE {
                idle.pop_front()
            } else {
                None
            };
            idle.push_back(Idle {
                since: Instant::now(),
                conn,
            });
            oldest
        };
        drop(oldest);
    }

    /// Closes the oldest idle connection, to free its permit; whether there
    /// was one.
    pub(super) fn close_oldest(&self) -> bool {
        let oldest = self.lock().pop_front();
        oldest.is_some()
    }

    /// Closes the connections that expired, failed their check, or lead to
    /// another upstream than `authority` (housekeeping, once a second).
    pub(super) fn sweep(&self, authority: &str) {
        let now = Instant::now();
        if C::FIT_IS_CHEAP {
            let stale: VecDeque<Idle<C>> = {
                let mut idle = self.lock();
                let (keep, stale) = idle
                    .drain(..)
                    .partition(|idle| fresh(idle, authority, now) && idle.conn.fit());
                *idle = keep;
                stale
            };
            drop(stale);
            return;
        }
        let all: Vec<Idle<C>> = self.lock().drain(..).collect();
        let keep: Vec<Idle<C>> = all
            .into_iter()
            .filter(|idle| fresh(idle, authority, now) && idle.conn.fit())
            .collect();
        let excess = {
            let mut idle = self.lock();
            // Put back meanwhile: newer, so after these.
            for (i, kept) in keep.into_iter().enumerate() {
                idle.insert(i, kept);
            }
            let excess = idle.len().saturating_sub(MAX_IDLE);
            idle.drain(..excess).collect::<Vec<_>>()
        };
        drop(excess);
    }

    /// Idle connections now.
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

fn fresh<C: Pooled>(idle: &Idle<C>, authority: &str, now: Instant) -> bool {
    idle.conn.authority() == authority && now.saturating_duration_since(idle.since) < IDLE_TIMEOUT
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, rc::Rc};

    use super::*;

    struct Conn {
        id: usize,
        authority: &'static str,
        fit: Rc<Cell<bool>>,
        parked: bool,
    }

    impl Pooled for Conn {
        fn authority(&self) -> &str {
            self.authority
        }
        fn fit(&self) -> bool {
            self.fit.get()
        }
        fn park(&mut self) {
            self.parked = true;
        }
    }

    fn conn(id: usize, authority: &'static str) -> (Conn, Rc<Cell<bool>>) {
        let fit = Rc::new(Cell::new(true));
        let conn = Conn {
            id,
            authority,
            fit: fit.clone(),
            parked: false,
        };
        (conn, fit)
    }

    #[test]
    fn takes_the_newest_fit_connection_to_the_upstream_and_closes_the_unfit() {
        let pool = Pool::default();
        let (a, _) = conn(1, "up:80");
        let (b, b_fit) = conn(2, "up:80");
        let (c, _) = conn(3, "other:80");
        pool.put(a);
        pool.put(b);
        pool.put(c);
        b_fit.set(false);
        // `c` leads elsewhere and `b` failed its check: both closed on the way.
        let taken = pool.take("up:80").expect("one fit connection");
        assert_eq!(taken.id, 1);
        assert!(taken.parked, "parked as it went in");
        assert_eq!(pool.len(), 0);
        assert!(pool.take("up:80").is_none());
    }

    #[test]
    fn a_full_pool_closes_its_oldest_and_the_sweep_keeps_the_fit_in_order() {
        let pool = Pool::default();
        for id in 0..=MAX_IDLE {
            pool.put(conn(id, "up:80").0);
        }
        assert_eq!(pool.len(), MAX_IDLE);
        let (unfit, fit) = conn(MAX_IDLE + 1, "up:80");
        pool.put(unfit);
        fit.set(false);
        pool.sweep("up:80");
        assert_eq!(
            pool.len(),
            MAX_IDLE - 1,
            "the full pool's oldest and the unfit one"
        );
        assert_eq!(pool.take("up:80").map(|c| c.id), Some(MAX_IDLE));
        assert!(pool.close_oldest());
        assert_eq!(pool.len(), MAX_IDLE - 3);
        pool.sweep("moved:80");
        assert_eq!(pool.len(), 0, "a reload moved the upstream");
        assert!(!pool.close_oldest());
    }

    /// A kind whose check is cheap: swept in place, with the same outcome.
    struct Cheap(Conn);

    impl Pooled for Cheap {
        fn authority(&self) -> &str {
            self.0.authority
        }
        fn fit(&self) -> bool {
            self.0.fit.get()
        }
        const FIT_IS_CHEAP: bool = true;
    }

    #[test]
    fn a_cheap_check_is_swept_in_place() {
        let pool = Pool::default();
        let (a, a_fit) = conn(1, "up:80");
        let (b, _) = conn(2, "up:80");
        let (c, _) = conn(3, "other:80");
        pool.put(Cheap(a));
        pool.put(Cheap(b));
        pool.put(Cheap(c));
        a_fit.set(false);
        pool.sweep("up:80");
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.take("up:80").map(|c| c.0.id), Some(2));
    }
}
