//! A timer kept for a run of deadlines (a connection's head, idle and send
//! deadlines; the deadlines of its requests upstream), as nginx keeps one
//! per connection. What a deadline per request costs in tokio is its timer
//! entry: made, filed in the runtime's timer wheel and taken out again, each
//! under the wheel's lock. One kept entry moved to a later deadline costs a
//! compare-and-swap (tokio re-files it when its old time comes, without
//! waking the task); only a deadline that moves earlier is filed again.

use std::{future::Future as _, pin::Pin};

use tokio::time::{Instant, Sleep, sleep_until};

/// Made unarmed: nothing is allocated or read from the clock until a first
/// deadline is waited for.
#[derive(Default)]
pub struct Timer {
    armed: Option<(Pin<Box<Sleep>>, Instant)>,
}

impl Timer {
    #[must_use]
    pub const fn new() -> Self {
        Self { armed: None }
    }

    /// Resolves at `deadline`. A wait dropped before then leaves the entry
    /// for the next wait to move.
    pub async fn until(&mut self, deadline: Instant) {
        std::future::poll_fn(|cx| {
            let (sleep, armed) = self
                .armed
                .get_or_insert_with(|| (Box::pin(sleep_until(deadline)), deadline));
            if *armed != deadline {
                sleep.as_mut().reset(deadline);
                *armed = deadline;
            }
            sleep.as_mut().poll(cx)
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_at_each_deadline_however_it_moved() {
        let start = Instant::now();
        let mut timer = Timer::new();
        timer.until(start + Duration::from_secs(2)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Later than the entry's time: the entry moves to it.
        timer.until(start + Duration::from_secs(7)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(7));
        // A deadline already passed is at once.
        timer.until(start + Duration::from_secs(6)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    /// A wait given up (its request answered first) leaves the entry for
    /// the next wait, which fires at its own deadline: later, or earlier.
    #[tokio::test(start_paused = true)]
    async fn a_wait_given_up_leaves_the_next_one_exact() {
        let start = Instant::now();
        let mut timer = Timer::new();
        // (the deadline given up after a second, the next one), in seconds.
        for (given_up, next) in [(30, 31), (90, 40)] {
            let gave_up = tokio::time::timeout(
                Duration::from_secs(1),
                timer.until(start + Duration::from_secs(given_up)),
            )
            .await;
            assert!(gave_up.is_err());
            timer.until(start + Duration::from_secs(next)).await;
            assert_eq!(start.elapsed(), Duration::from_secs(next));
        }
        // The entry moved back to 40 s: a wait for 90 s again is 90 s.
        timer.until(start + Duration::from_secs(90)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(90));
    }
}
