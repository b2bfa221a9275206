//! What one connection is doing, for its timers: requests in flight (a request
//! is in flight until its response body is sent or dropped, so a long SSE
//! stream counts), when it last went idle, and when the next request's first
//! bytes arrived. Pings and other HTTP/2 control frames are not activity.

use std::{
    io,
    pin::{Pin, pin},
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// How long a connection that was asked to close (idle, or the agent shutting
/// down) may stay open with nothing in flight: an HTTP/2 client gets one round
/// trip to acknowledge the GOAWAY's ping, a client that never does is cut.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The connection timeouts, read from the config when the connection opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to the first request's headers, and from the first byte of
    /// a later HTTP/1 request to its last header byte.
    pub header_read: Duration,
    /// With no request in flight: until the connection is closed.
    pub idle: Duration,
}

/// Why a connection's timer fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// A request's headers did not arrive in time (or no first request at
    /// all): HTTP/1 gets a 408, then the connection is closed.
    Headers,
    /// No request in flight for the idle timeout: close gracefully.
    Idle,
    /// Asked to close, still open after [`CLOSE_GRACE`] with nothing in flight.
    Abort,
}

/// A connection's activity as a pure state machine (time passed in).
#[derive(Debug)]
pub struct Activity {
    in_flight: usize,
    requests: u64,
    /// When the last request in flight ended (or the connection was accepted).
    idle_since: Instant,
    /// With nothing in flight: when the first byte of the next request arrived.
    partial_since: Option<Instant>,
    closing_since: Option<Instant>,
    /// Bytes of the HTTP/2 preface matched so far; `None` once it is not one.
    preface: Option<usize>,
}

impl Activity {
    #[must_use]
    pub fn new(now: Instant) -> Self {
        Self {
            in_flight: 0,
            requests: 0,
            idle_since: now,
            partial_since: None,
            closing_since: None,
            preface: Some(0),
        }
    }

    /// The connection speaks HTTP/2 (its first bytes were the preface).
    #[must_use]
    pub fn is_h2(&self) -> bool {
        self.preface == Some(H2_PREFACE.len())
    }

    /// Bytes arrived from the client. True when that moved a deadline earlier.
    pub fn bytes(&mut self, now: Instant, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return false;
        }
        if let Some(matched) = self.preface
            && matched < H2_PREFACE.len()
        {
            let take = bytes.len().min(H2_PREFACE.len() - matched);
            self.preface =
                (bytes[..take] == H2_PREFACE[matched..matched + take]).then_some(matched + take);
        }
        // HTTP/2 frames between requests are pings, settings, window updates:
        // not a request starting. On HTTP/1 they are the next request's head.
        if self.in_flight == 0 && self.partial_since.is_none() && !self.is_h2() {
            self.partial_since = Some(now);
            return true;
        }
        false
    }

    /// A request's headers are complete and it was handed to the proxy.
    pub fn request_started(&mut self) {
        self.in_flight += 1;
        self.requests += 1;
        self.partial_since = None;
    }

    /// A request's response was sent (or abandoned). True when the connection
    /// is idle now.
    pub fn request_ended(&mut self, now: Instant) -> bool {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.idle_since = now;
            self.partial_since = None;
            return true;
        }
        false
    }

    /// The connection was asked to close (GOAWAY sent, keep-alive off).
    pub fn closing(&mut self, now: Instant) {
        self.closing_since.get_or_insert(now);
    }

    #[must_use]
    pub fn is_closing(&self) -> bool {
        self.closing_since.is_some()
    }

    /// When the connection's timer fires next, and why; `None` while a
    /// request is in flight (however long its response streams).
    #[must_use]
    pub fn deadline(&self, timeouts: Timeouts) -> Option<(Instant, Expiry)> {
        if self.in_flight > 0 {
            return None;
        }
        if let Some(closing) = self.closing_since {
            return Some((closing.max(self.idle_since) + CLOSE_GRACE, Expiry::Abort));
        }
        if self.requests == 0 {
            return Some((self.idle_since + timeouts.header_read, Expiry::Headers));
        }
        if let Some(partial) = self.partial_since {
            return Some((partial + timeouts.header_read, Expiry::Headers));
        }
        Some((self.idle_since + timeouts.idle, Expiry::Idle))
    }
}

/// One connection's [`Activity`], shared by its IO, its requests and its timer.
#[derive(Debug)]
pub struct Tracker {
    activity: Mutex<Activity>,
    timeouts: Timeouts,
}

impl Tracker {
    #[must_use]
    pub fn new(timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Self {
            activity: Mutex::new(Activity::new(Instant::now())),
            timeouts,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Activity) -> T) -> T {
        f(&mut self.activity.lock().unwrap_or_else(PoisonError::into_inner))
    }

    #[must_use]
    pub fn is_h2(&self) -> bool {
        self.with(|a| a.is_h2())
    }

    #[must_use]
    pub fn is_closing(&self) -> bool {
        self.with(|a| a.is_closing())
    }

    /// Marks the connection as asked to close.
    /// Marks the connection closing. The caller must ask [`Tracker::expired`]
    /// again afterwards: the close grace is shorter than the timer's check.
    pub(super) fn closing(&self) {
        self.with(|a| a.closing(Instant::now()));
    }

    /// Counts a request in flight until the returned guard is dropped.
    #[must_use]
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.with(Activity::request_started);
        InFlight(self.clone())
    }

    /// Resolves when the connection's timer fires.
    ///
    /// Nothing wakes the timer when the state changes: it is never armed
    /// later than one `check` from when it was armed, the shorter of the
    /// header and idle timeouts (the close grace once closing), and no change
    /// brings a deadline nearer than one `check` from the change (a request's
    /// first bytes start a header timeout, an ended request an idle timeout;
    /// closing is decided by the caller, who asks again). So the armed time
    /// is never after the deadline, and each time it fires the state is read
    /// again: a connection busy with requests pays one timer per `check`,
    /// not a wake-up per request.
    pub async fn expired(&self) -> Expiry {
        let mut timer = pin!(tokio::time::sleep_until(Instant::now()));
        loop {
            let now = Instant::now();
            let (next, closing) = self.with(|a| (a.deadline(self.timeouts), a.is_closing()));
            let check = if closing {
                CLOSE_GRACE
            } else {
                self.timeouts.header_read.min(self.timeouts.idle)
            }
            .max(Duration::from_millis(1));
            let at = match next {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => at.min(now + check),
                None => now + check,
            };
            timer.as_mut().reset(at);
            timer.as_mut().await;
        }
    }
}

/// A request in flight: the connection is not idle until this is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Tracker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.with(|a| a.request_ended(Instant::now()));
    }
}

/// A response body that keeps its request in flight until it is sent.
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket (or TLS stream), telling the tracker what it reads.
pub struct Watched<T> {
    io: T,
    tracker: Arc<Tracker>,
}

impl<T> Watched<T> {
    pub fn new(io: T, tracker: Arc<Tracker>) -> Self {
        Self { io, tracker }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            this.tracker
                .with(|activity| activity.bytes(Instant::now(), read));
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header_read: Duration::from_secs(10),
        idle: Duration::from_mins(1),
    };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Runs the tracker's timer against `script` (sleep until `t0 + secs`,
    /// then act) on a paused clock: what fired, and how long after `t0`.
    async fn fired(script: impl AsyncFnOnce(&Arc<Tracker>, Instant)) -> (Expiry, Duration) {
        let tracker = Tracker::new(TIMEOUTS);
        let t0 = Instant::now();
        let timer = tokio::spawn({
            let tracker = tracker.clone();
            async move { (tracker.expired().await, Instant::now()) }
        });
        script(&tracker, t0).await;
        let (why, at) = timer.await.expect("timer task");
        (why, at - t0)
    }

    fn about(d: Duration, s: u64) -> bool {
        d >= secs(s) && d < secs(s) + Duration::from_millis(10)
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_at_a_header_deadline_nobody_told_it_of() {
        // A request at 1 s, ended at 2 s; the next one's first bytes at 35 s:
        // its headers are due at 45 s, before the idle timeout (62 s).
        let (why, after) = fired(async |tracker, t0| {
            tokio::time::sleep_until(t0 + secs(1)).await;
            let in_flight = tracker.request();
            tokio::time::sleep_until(t0 + secs(2)).await;
            drop(in_flight);
            tokio::time::sleep_until(t0 + secs(35)).await;
            tracker.with(|a| a.bytes(Instant::now(), b"GET / HT"));
        })
        .await;
        assert_eq!(why, Expiry::Headers);
        assert!(about(after, 45), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_at_the_idle_deadline_and_never_during_a_request() {
        let (why, after) = fired(async |tracker, t0| {
            tokio::time::sleep_until(t0 + secs(1)).await;
            let in_flight = tracker.request();
            // Streams for five minutes: no deadline meanwhile.
            tokio::time::sleep_until(t0 + secs(301)).await;
            drop(in_flight);
        })
        .await;
        assert_eq!(why, Expiry::Idle);
        assert!(about(after, 361), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_closing_connection_is_cut_a_grace_after_its_last_request() {
        let (why, after) = fired(async |tracker, t0| {
            tokio::time::sleep_until(t0 + secs(1)).await;
            let in_flight = tracker.request();
            tracker.closing();
            tokio::time::sleep_until(t0 + secs(30)).await;
            drop(in_flight);
        })
        .await;
        assert_eq!(why, Expiry::Abort);
        assert!(about(after, 32), "{after:?}");
    }

    #[test]
    fn the_first_request_must_come_within_the_header_timeout() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(10), Expiry::Headers)));
        // Its first bytes do not extend that.
        a.bytes(t0 + secs(9), b"GET / HT");
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(10), Expiry::Headers)));
    }

    #[test]
    fn a_request_in_flight_has_no_deadline_however_long_it_streams() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        a.bytes(t0, b"GET /events HTTP/1.1\r\n\r\n");
        a.request_started();
        assert_eq!(a.deadline(TIMEOUTS), None);
        // Body bytes and pipelined requests while it streams change nothing.
        a.bytes(t0 + secs(100), b"GET /next HTTP/1.1\r\n");
        assert_eq!(a.deadline(TIMEOUTS), None);
        assert!(a.request_ended(t0 + secs(3600)));
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(3660), Expiry::Idle)));
    }

    #[test]
    fn keep_alive_waits_the_idle_timeout_then_the_header_timeout_once_bytes_come() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        a.request_started();
        a.request_ended(t0 + secs(1));
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(61), Expiry::Idle)));
        // The next request starts late in the idle period: it gets the whole
        // header timeout from its first byte, and the deadline moves earlier.
        assert!(a.bytes(t0 + secs(5), b"G"));
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(15), Expiry::Headers)));
        assert!(!a.bytes(t0 + secs(6), b"ET / HTTP/1.1\r\n"));
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(15), Expiry::Headers)));
    }

    #[test]
    fn http2_control_frames_are_not_activity() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        // The preface split across reads.
        a.bytes(t0, &H2_PREFACE[..10]);
        a.bytes(t0, &H2_PREFACE[10..]);
        assert!(a.is_h2());
        a.request_started();
        a.request_ended(t0 + secs(1));
        // A ping every second: the connection still goes idle at 61 s.
        for s in 2..61 {
            assert!(!a.bytes(t0 + secs(s), &[0, 0, 8, 6, 0, 0, 0, 0, 0]));
        }
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(61), Expiry::Idle)));
    }

    #[test]
    fn http1_starting_like_the_preface_is_http1() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        a.bytes(t0, b"PRI * HTTP/1.1\r\n");
        assert!(!a.is_h2());
    }

    #[test]
    fn concurrent_streams_keep_the_connection_busy_until_the_last_ends() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        a.request_started();
        a.request_started();
        assert!(!a.request_ended(t0 + secs(1)));
        assert_eq!(a.deadline(TIMEOUTS), None);
        assert!(a.request_ended(t0 + secs(2)));
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(62), Expiry::Idle)));
    }

    #[test]
    fn a_closing_connection_is_cut_after_the_grace_once_nothing_is_in_flight() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        a.request_started();
        a.closing(t0 + secs(1));
        // Its in-flight request finishes first, however long it takes.
        assert_eq!(a.deadline(TIMEOUTS), None);
        a.request_ended(t0 + secs(30));
        assert_eq!(
            a.deadline(TIMEOUTS),
            Some((t0 + secs(30) + CLOSE_GRACE, Expiry::Abort))
        );
        // A second request to close does not move the grace.
        a.closing(t0 + secs(40));
        assert_eq!(
            a.deadline(TIMEOUTS),
            Some((t0 + secs(30) + CLOSE_GRACE, Expiry::Abort))
        );
    }
}
