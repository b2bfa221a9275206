//! One timer per connection for every deadline it has (the head, the idle
//! wait, a stalled write), re-armed lazily as nginx does: a deadline that
//! moves later leaves the timer where it is, and when it fires early it is
//! set again for the deadline that stands then. A busy connection pays one
//! timer per timeout period, not one per request.

use std::{future::Future as _, pin::Pin, task::Poll, time::Duration};

use tokio::time::{Instant, Sleep, sleep_until};

pub struct Timer {
    sleep: Pin<Box<Sleep>>,
    armed: Instant,
}

impl Timer {
    pub fn new() -> Self {
        let armed = Instant::now() + Duration::from_hours(24);
        Self {
            sleep: Box::pin(sleep_until(armed)),
            armed,
        }
    }

    /// Resolves at `deadline`.
    pub async fn until(&mut self, deadline: Instant) {
        std::future::poll_fn(|cx| {
            loop {
                if deadline < self.armed {
                    self.sleep.as_mut().reset(deadline);
                    self.armed = deadline;
                }
                if self.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if self.armed >= deadline {
                    return Poll::Ready(());
                }
                // Fired for an earlier deadline that has moved since.
                self.sleep.as_mut().reset(deadline);
                self.armed = deadline;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
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
    }
}
