//! What one connection is doing, for its timers: requests in flight (a request
//! is in flight until its response body is sent or dropped, so a long SSE
//! stream counts), when it last went idle, when the next request's first
//! bytes arrived, and which answers wait for the client to take their next
//! piece. Pings and other HTTP/2 control frames are not activity.
//!
//! An answer waits on the client from when a piece of it is handed to hyper
//! until hyper asks for the next: hyper asks only once the piece is on its
//! way (HTTP/1: room in its write buffer, so in the socket's; HTTP/2: window
//! from the client). An answer that waits longer than `send_timeout` means a
//! client that stopped reading (a shut window, a full socket buffer) while
//! the answer holds an upstream connection: it is cut (`server/answer.rs`;
//! HTTP/1: the connection with it), and an HTTP/2 answer cut and still held
//! by hyper a `send_timeout` later closes the connection. An answer waiting
//! on the upstream (an SSE stream between events) waits on nobody's clock
//! here.

use std::{
    collections::HashMap,
    io,
    pin::{Pin, pin},
    sync::{Arc, Mutex, PoisonError, Weak},
    task::{Context, Poll},
    time::Duration,
};

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
    /// An answer waiting this long for the client to take its next piece:
    /// the connection is cut.
    pub send: Duration,
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
    /// An answer waited `send_timeout` for the client to take its next piece:
    /// cut it (HTTP/1: the connection with it).
    SendStalled,
    /// An answer cut a `send_timeout` ago is still held by hyper (an HTTP/2
    /// stream whose window stays shut is never asked again, so never reset):
    /// close the connection.
    CutLingers,
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
    /// Answers handed a piece to hyper and not asked for the next yet, by
    /// request number, oldest first (at most one per request in flight).
    waiting: Vec<(u64, Instant)>,
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
            waiting: Vec::new(),
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

    /// A request's headers are complete and it was handed to the proxy:
    /// its number on this connection.
    pub fn request_started(&mut self) -> u64 {
        self.in_flight += 1;
        self.requests += 1;
        self.partial_since = None;
        self.requests
    }

    /// Request `id`'s answer handed hyper a piece (or its head) at `now`.
    pub fn handed(&mut self, id: u64, now: Instant) {
        if !self.waiting.iter().any(|(w, _)| *w == id) {
            self.waiting.push((id, now));
        }
    }

    /// Hyper asked request `id`'s answer for its next piece.
    pub fn taken(&mut self, id: u64) {
        if let Some(i) = self.waiting.iter().position(|(w, _)| *w == id) {
            self.waiting.remove(i);
        }
    }

    /// Takes the answers that have waited on the client `send` or longer
    /// off the waiting list: their request numbers.
    pub fn stalled(&mut self, now: Instant, send: Duration) -> Vec<u64> {
        let mut stalled = Vec::new();
        self.waiting.retain(|(id, since)| {
            let keep = *since + send > now;
            if !keep {
                stalled.push(*id);
            }
            keep
        });
        stalled
    }

    /// Request `id`'s response was sent (or abandoned). True when the
    /// connection is idle now.
    pub fn request_ended(&mut self, id: u64, now: Instant) -> bool {
        self.taken(id);
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

    /// When the connection's timer fires next, and why; with a request in
    /// flight (however long its response streams), only when an answer waits
    /// on the client.
    #[must_use]
    pub fn deadline(&self, timeouts: Timeouts) -> Option<(Instant, Expiry)> {
        if self.in_flight > 0 {
            return self
                .waiting
                .first()
                .map(|(_, since)| (*since + timeouts.send, Expiry::SendStalled));
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

/// An answer the timer can cut: what it holds is let go at once.
pub trait Cut: Send + Sync {
    fn cut(&self);
}

/// One connection's [`Activity`], shared by its IO, its requests and its timer.
pub struct Tracker {
    activity: Mutex<Activity>,
    timeouts: Timeouts,
    /// The answers in flight, by request number, for cutting a stalled one.
    answers: Mutex<HashMap<u64, Weak<dyn Cut>>>,
    /// Answers cut, and when, until hyper lets go of them.
    cut: Mutex<Vec<(Instant, Weak<dyn Cut>)>>,
}

impl Tracker {
    #[must_use]
    pub fn new(timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Self {
            activity: Mutex::new(Activity::new(Instant::now())),
            timeouts,
            answers: Mutex::default(),
            cut: Mutex::default(),
        })
    }

    pub(super) fn with<T>(&self, f: impl FnOnce(&mut Activity) -> T) -> T {
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

    /// Request `id`'s answer, for [`Tracker::cut_stalled`].
    pub(super) fn answer(&self, id: u64, answer: Weak<dyn Cut>) {
        self.answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, answer);
    }

    /// Cuts every answer that waited on the client `send_timeout` or
    /// longer: each lets go of its upstream connection and in-flight slots
    /// at once, and its stream is reset when hyper next asks for it. How
    /// many were cut.
    pub fn cut_stalled(&self) -> usize {
        let now = Instant::now();
        let stalled = self.with(|a| a.stalled(now, self.timeouts.send));
        let answers: Vec<Weak<dyn Cut>> = {
            let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
            stalled.iter().filter_map(|id| answers.remove(id)).collect()
        };
        // Outside both locks: a cut ends its request, which takes them.
        let mut cut = 0;
        for answer in answers {
            if let Some(live) = answer.upgrade() {
                live.cut();
                cut += 1;
                self.cut
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((now, answer));
            }
        }
        cut
    }

    /// When the oldest answer cut and still held by hyper has lingered a
    /// `send_timeout`; answers hyper let go of are forgotten.
    fn lingering_until(&self) -> Option<Instant> {
        let mut cut = self.cut.lock().unwrap_or_else(PoisonError::into_inner);
        cut.retain(|(_, answer)| answer.strong_count() > 0);
        cut.first().map(|(at, _)| *at + self.timeouts.send)
    }

    /// Counts a request in flight until the returned guard is dropped.
    #[must_use]
    pub fn request(self: &Arc<Self>) -> InFlight {
        let id = self.with(Activity::request_started);
        InFlight {
            tracker: self.clone(),
            id,
        }
    }

    /// Resolves when the connection's timer fires.
    ///
    /// Nothing wakes the timer when the state changes: it is never armed
    /// later than one `check` from when it was armed, the shortest of the
    /// header, idle and send timeouts (the close grace once closing), and no
    /// change brings a deadline nearer than one `check` from the change (a
    /// request's first bytes start a header timeout, an ended request an idle
    /// timeout, a piece handed to hyper a send timeout; closing is decided by
    /// the caller, who asks again). So the armed time
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
                self.timeouts
                    .header_read
                    .min(self.timeouts.idle)
                    .min(self.timeouts.send)
            }
            .max(Duration::from_millis(1));
            let at = match next {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => at.min(now + check),
                None => now + check,
            };
            let at = match self.lingering_until() {
                Some(lingers) if lingers <= now => return Expiry::CutLingers,
                Some(lingers) => at.min(lingers),
                None => at,
            };
            timer.as_mut().reset(at);
            timer.as_mut().await;
        }
    }
}

/// A request in flight: the connection is not idle until this is dropped.
pub struct InFlight {
    pub(super) tracker: Arc<Tracker>,
    pub(super) id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.tracker
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.tracker
            .with(|a| a.request_ended(self.id, Instant::now()));
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

/// The timeouts of the unit tests here and beside.
#[cfg(test)]
pub(super) const TEST_TIMEOUTS: Timeouts = Timeouts {
    header_read: Duration::from_secs(10),
    idle: Duration::from_mins(1),
    send: Duration::from_secs(30),
};

#[cfg(test)]
mod tests {
    use super::{TEST_TIMEOUTS as TIMEOUTS, *};

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
        let id = a.request_started();
        assert_eq!(a.deadline(TIMEOUTS), None);
        // Body bytes and pipelined requests while it streams change nothing.
        a.bytes(t0 + secs(100), b"GET /next HTTP/1.1\r\n");
        assert_eq!(a.deadline(TIMEOUTS), None);
        assert!(a.request_ended(id, t0 + secs(3600)));
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(3660), Expiry::Idle)));
    }

    #[test]
    fn keep_alive_waits_the_idle_timeout_then_the_header_timeout_once_bytes_come() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        let id = a.request_started();
        a.request_ended(id, t0 + secs(1));
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
        let id = a.request_started();
        a.request_ended(id, t0 + secs(1));
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
        let first = a.request_started();
        let second = a.request_started();
        assert!(!a.request_ended(first, t0 + secs(1)));
        assert_eq!(a.deadline(TIMEOUTS), None);
        assert!(a.request_ended(second, t0 + secs(2)));
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(62), Expiry::Idle)));
    }

    #[test]
    fn a_closing_connection_is_cut_after_the_grace_once_nothing_is_in_flight() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        let id = a.request_started();
        a.closing(t0 + secs(1));
        // Its in-flight request finishes first, however long it takes.
        assert_eq!(a.deadline(TIMEOUTS), None);
        a.request_ended(id, t0 + secs(30));
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

    #[test]
    fn an_answer_the_client_stops_taking_is_cut_a_send_timeout_after_it_was_handed() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        let slow = a.request_started();
        let fast = a.request_started();
        a.handed(slow, t0 + secs(1));
        a.handed(fast, t0 + secs(2));
        assert_eq!(
            a.deadline(TIMEOUTS),
            Some((t0 + secs(31), Expiry::SendStalled)),
            "the oldest waiting answer sets the deadline"
        );
        // Another stream taking its pieces does not help the stalled one.
        for s in 3..30 {
            a.taken(fast);
            a.handed(fast, t0 + secs(s));
        }
        assert_eq!(
            a.deadline(TIMEOUTS),
            Some((t0 + secs(31), Expiry::SendStalled))
        );
        // Taken at last: the other answer's wait is what is left.
        a.taken(slow);
        assert_eq!(
            a.deadline(TIMEOUTS),
            Some((t0 + secs(59), Expiry::SendStalled))
        );
        a.request_ended(fast, t0 + secs(40));
        assert_eq!(
            a.deadline(TIMEOUTS),
            None,
            "waiting on the upstream is nobody's stall"
        );
        a.request_ended(slow, t0 + secs(41));
        assert_eq!(a.deadline(TIMEOUTS), Some((t0 + secs(101), Expiry::Idle)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_at_a_send_deadline() {
        let (why, after) = fired(async |tracker, t0| {
            tokio::time::sleep_until(t0 + secs(1)).await;
            let in_flight = tracker.request();
            tracker.with(|a| a.handed(in_flight.id, Instant::now()));
            // Held past the deadline: the timer must have fired by then.
            tokio::time::sleep_until(t0 + secs(40)).await;
            drop(in_flight);
        })
        .await;
        assert_eq!(why, Expiry::SendStalled);
        assert!(about(after, 31), "{after:?}");
    }
}
