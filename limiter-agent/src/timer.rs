//! A timer for a run of deadlines that mostly move later (a connection's
//! head, idle and send deadlines; the deadlines of its requests upstream),
//! re-armed lazily as nginx does: a deadline that moves later leaves the
//! timer where it is, and when it fires early it is set again for the
//! deadline that stands then. A busy connection pays one timer per timeout
//! period, not one per request: no entry made and removed in the runtime's
//! timer wheel (under its lock) for each.

use std::{future::Future as _, pin::Pin, task::Poll};

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

    /// Resolves at `deadline`. A wait dropped before then leaves the timer
    /// armed; the next wait moves it only if it must fire sooner.
    pub async fn until(&mut self, deadline: Instant) {
        std::future::poll_fn(|cx| {
            let (sleep, armed) = self
                .armed
                .get_or_insert_with(|| (Box::pin(sleep_until(deadline)), deadline));
            loop {
                if deadline < *armed {
                    sleep.as_mut().reset(deadline);
                    *armed = deadline;
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if *armed >= deadline {
                    return Poll::Ready(());
                }
                // Fired for an earlier deadline that has moved since.
                sleep.as_mut().reset(deadline);
                *armed = deadline;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_deadline_however_it_moved() {
        let start = Instant::now();
        let mut timer = Timer::new();
        timer.until(start + Duration::from_secs(2)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Later than the armed time: armed again when the old one fires.
        timer.until(start + Duration::from_secs(7)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(7));
        // Earlier than armed: the timer moves.
        let mut timer = Timer::new();
        timer.until(start + Duration::from_secs(9)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(9));
        timer.until(start + Duration::from_secs(8)).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(9),
            "a passed deadline is at once"
        );
    }

    /// A wait given up (its request answered first) leaves the timer armed
    /// for a later deadline, which still fires when it comes.
    #[tokio::test(start_paused = true)]
    async fn a_wait_given_up_leaves_the_next_one_exact() {
        let start = Instant::now();
        let mut timer = Timer::new();
        let gave_up = tokio::time::timeout(
            Duration::from_secs(1),
            timer.until(start + Duration::from_secs(30)),
        )
        .await;
        assert!(gave_up.is_err());
        timer.until(start + Duration::from_secs(31)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(31));
    }
}
