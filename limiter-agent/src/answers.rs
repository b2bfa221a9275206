//! What an answer tells the client about its limit: the rate-limit header
//! fields (X-RateLimit-* and the IETF draft's `RateLimit` fields), and the
//! JSON bodies of the 429 and of every other error.

use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::limit::{Decision, Now};

const X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Adds X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset (Unix seconds, rounded UP) to `headers`;
/// with a `policy` name (`ietf_headers = true`) also the `RateLimit-Policy` and `RateLimit`
/// fields of draft-ietf-httpapi-ratelimit-headers-11, Structured Fields (RFC 9651) Lists of
/// one Item each, the policy name a String:
/// - `RateLimit-Policy: "api-chat";q=100;w=60`: the quota and the window in whole seconds,
///   rounded up, at least 1.
/// - `RateLimit: "api-chat";r=99;t=60`: remaining quota and seconds until it resets
///   (`retry_after_secs`, so on a 429 it equals Retry-After).
///
/// `now` is both clocks read at answer time: the window ran on the monotonic
/// clock, and its reset is told as the wall clock now plus the monotonic time
/// left ([`Now::unix_at`]), so a wall-clock step since the decision (NTP) is in
/// the Unix times and the seconds left are exact.
///
/// Existing headers of these names (say, from the upstream) are replaced.
pub fn apply(
    headers: &mut HeaderMap,
    decision: &Decision,
    window_ms: u64,
    now: Now,
    policy: Option<&PolicyName>,
) {
    limits(headers, decision, window_ms, now, policy);
}

/// Where an answer's fields go: a `HeaderMap`, or the bytes of a head the
/// HTTP/1 front end writes itself ([`Head`]).
pub trait FieldSink {
    /// Sets the field `name` to `value` (valid field-value bytes).
    fn put(&mut self, name: &HeaderName, value: &[u8]);
}

impl FieldSink for HeaderMap {
    fn put(&mut self, name: &HeaderName, value: &[u8]) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            self.insert(name.clone(), value);
        }
    }
}

/// Fields written as the lines of an HTTP/1 head (`name: value` CRLF).
pub struct Head<'a>(pub &'a mut Vec<u8>);

impl FieldSink for Head<'_> {
    fn put(&mut self, name: &HeaderName, value: &[u8]) {
        self.0.extend_from_slice(name.as_str().as_bytes());
        self.0.extend_from_slice(b": ");
        self.0.extend_from_slice(value);
        self.0.extend_from_slice(b"\r\n");
    }
}

/// [`apply`] into any [`FieldSink`].
pub fn limits<S: FieldSink + ?Sized>(
    sink: &mut S,
    decision: &Decision,
    window_ms: u64,
    now: Now,
    policy: Option<&PolicyName>,
) {
    let mut digits = itoa::Buffer::new();
    sink.put(&X_LIMIT, digits.format(decision.limit).as_bytes());
    sink.put(&X_REMAINING, digits.format(decision.remaining).as_bytes());
    sink.put(
        &X_RESET,
        digits.format(reset_secs(decision, now)).as_bytes(),
    );
    let Some(PolicyName(name)) = policy else {
        return;
    };
    let window_secs = window_ms.div_ceil(1000).max(1);
    // The name is lowercase letters, digits and `-`; the rest digits, `"`,
    // `;` and `=`: always valid header bytes.
    let mut value = String::with_capacity(name.len() + 24);
    // Writing into a String cannot fail.
    let _ = write!(value, "\"{name}\";q={};w={window_secs}", decision.limit);
    sink.put(&POLICY, value.as_bytes());
    value.clear();
    let _ = write!(
        value,
        "\"{name}\";r={};t={}",
        decision.remaining,
        retry_after_secs(decision, now)
    );
    sink.put(&RATELIMIT, value.as_bytes());
}

/// The 429's fields after its status line, and its body: the limit fields,
/// `Retry-After`, the JSON type and length, the exact body. `head` is where
/// the answer is written (the HTTP/1 front end's write buffer).
pub fn write_too_many(
    head: &mut Vec<u8>,
    decision: &Decision,
    window_ms: u64,
    now: Now,
    policy: Option<&PolicyName>,
) {
    let retry = retry_after_secs(decision, now);
    limits(&mut Head(head), decision, window_ms, now, policy);
    let mut digits = itoa::Buffer::new();
    let retry = digits.format(retry);
    let body_len = TOO_MANY_PREFIX.len() + retry.len() + TOO_MANY_SUFFIX.len();
    head.extend_from_slice(b"retry-after: ");
    head.extend_from_slice(retry.as_bytes());
    head.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    head.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head.extend_from_slice(TOO_MANY_PREFIX.as_bytes());
    head.extend_from_slice(retry.as_bytes());
    head.extend_from_slice(TOO_MANY_SUFFIX.as_bytes());
}

/// The 429 body around its one number ([`too_many_requests_body`]).
const TOO_MANY_PREFIX: &str = r#"{"error":{"code":"RATE_LIMIT_EXCEEDED","message":"Rate limit exceeded. Try again later.","details":{"retryAfter":"#;
const TOO_MANY_SUFFIX: &str = "}}}";

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

/// A token budget's state in an answer: the decision on its bucket, its
/// window, and its IETF policy name when `ietf_headers` is on.
#[derive(Clone, Copy)]
pub struct TokenState<'a> {
    pub decision: &'a Decision,
    pub window_ms: u64,
    pub policy: Option<&'a PolicyName>,
}

/// On a tier with a token budget, adds OpenAI's own rate-limit headers, as
/// its SDKs and clients read them: `x-ratelimit-limit-requests`,
/// `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` for the
/// request limit (`requests`), the same three `-tokens` for the budget; a
/// reset is the time until the full quota is back, in Go's duration format
/// (`"6m0s"`, `"1.5s"`, `"20ms"`), never early. With the IETF fields on, the
/// budget is a second item of `RateLimit-Policy` and `RateLimit` (call after
/// [`apply`]).
pub fn apply_tokens(
    headers: &mut HeaderMap,
    requests: &Decision,
    tokens: TokenState<'_>,
    now: Now,
) {
    let left = |decision: &Decision| {
        HeaderValue::try_from(go_duration(decision.reset_ms.saturating_sub(now.mono_ms)))
            .unwrap_or(HeaderValue::from_static("0s"))
    };
    headers.insert(LIMIT_REQUESTS, HeaderValue::from(requests.limit));
    headers.insert(REMAINING_REQUESTS, HeaderValue::from(requests.remaining));
    headers.insert(RESET_REQUESTS, left(requests));
    let budget = tokens.decision;
    headers.insert(LIMIT_TOKENS, HeaderValue::from(budget.limit));
    headers.insert(REMAINING_TOKENS, HeaderValue::from(budget.remaining));
    headers.insert(RESET_TOKENS, left(budget));
    let Some(PolicyName(name)) = tokens.policy else {
        return;
    };
    let window_secs = tokens.window_ms.div_ceil(1000).max(1);
    for (field, item) in [
        (
            POLICY,
            format!("\"{name}\";q={};w={window_secs}", budget.limit),
        ),
        (
            RATELIMIT,
            format!(
                "\"{name}\";r={};t={}",
                budget.remaining,
                retry_after_secs(budget, now)
            ),
        ),
    ] {
        let joined = match headers.get(&field).and_then(|v| v.to_str().ok()) {
            Some(first) => format!("{first}, {item}"),
            None => item,
        };
        if let Ok(value) = HeaderValue::try_from(joined) {
            headers.insert(field, value);
        }
    }
}

/// `ms` as Go prints a `time.Duration` (OpenAI's reset format): `"20ms"`
/// under a second, else hours, minutes and seconds with the seconds'
/// fraction trimmed of zeros (`"1.5s"`, `"6m0s"`, `"1h0m5s"`).
#[must_use]
pub fn go_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, minutes) = (ms / 3_600_000, ms / 60_000 % 60);
    let (secs, frac) = (ms / 1000 % 60, ms % 1000);
    let mut out = String::with_capacity(12);
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{secs}");
    if frac > 0 {
        let digits = format!("{frac:03}");
        let _ = write!(out, ".{}", digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// A tier's quota policy name in the IETF fields: its route, lowercased,
/// every run of other characters than letters and digits turned into one
/// `-` (`/api/v1/fashion/status/:id` → `api-v1-fashion-status-id`); `default`
/// for `/`. Safe inside a Structured Fields String as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyName(String);

impl PolicyName {
    #[must_use]
    pub fn from_route(route: &str) -> Self {
        let mut name = String::with_capacity(route.len());
        for c in route.chars() {
            if c.is_ascii_alphanumeric() {
                name.push(c.to_ascii_lowercase());
            } else if !name.is_empty() && !name.ends_with('-') {
                name.push('-');
            }
        }
        while name.ends_with('-') {
            name.pop();
        }
        if name.is_empty() {
            name.push_str("default");
        }
        Self(name)
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The X-RateLimit-Reset value: the reset as a Unix time on the wall clock `now`,
/// rounded up to a whole second, so a client waking at that second is never early.
fn reset_secs(decision: &Decision, now: Now) -> u64 {
    now.unix_at(decision.reset_ms).div_ceil(1000)
}

/// Seconds until the client may retry: X-RateLimit-Reset (rounded-up seconds) minus the current whole second on the wall clock (floor of now), at least 1 — so now + Retry-After is never earlier than X-RateLimit-Reset.
#[must_use]
pub fn retry_after_secs(decision: &Decision, now: Now) -> u64 {
    reset_secs(decision, now)
        .saturating_sub(now.unix_ms / 1000)
        .max(1)
}

/// The exact 429 body: `{"error":{"code":"RATE_LIMIT_EXCEEDED","message":"Rate limit exceeded. Try again later.","details":{"retryAfter":N}}}`
#[must_use]
pub fn too_many_requests_body(retry_after_secs: u64) -> String {
    format!("{TOO_MANY_PREFIX}{retry_after_secs}{TOO_MANY_SUFFIX}")
}

/// The 429 of a client with `max_in_flight` requests in flight on the tier:
/// the rate limit's shape, code `CONCURRENCY_LIMIT_EXCEEDED`, `retryAfter` 1.
#[must_use]
pub fn concurrency_limit_body() -> &'static str {
    r#"{"error":{"code":"CONCURRENCY_LIMIT_EXCEEDED","message":"Too many requests in flight. Try again later.","details":{"retryAfter":1}}}"#
}

/// The 429 of a request its client's token budget cannot hold now: the rate
/// limit's shape, code `TOKEN_LIMIT_EXCEEDED`, the tokens asked for and left.
#[must_use]
pub fn token_limit_body(
    retry_after_secs: u64,
    requested: u32,
    remaining: u32,
    limit: u32,
) -> String {
    let message = if requested > limit {
        "Request too large: it reserves more tokens than the budget holds per window; lower max_tokens."
    } else {
        "Token budget exceeded. Try again later."
    };
    format!(
        r#"{{"error":{{"code":"TOKEN_LIMIT_EXCEEDED","message":"{message}","details":{{"retryAfter":{retry_after_secs},"requestedTokens":{requested},"remainingTokens":{remaining}}}}}}}"#
    )
}

/// A JSON error body of the same shape for other errors: `{"error":{"code":CODE,"message":MESSAGE}}`, properly JSON-escaped.
#[must_use]
pub fn error_body(code: &str, message: &str) -> String {
    // Built by hand so the key order is fixed whatever serde_json features are enabled;
    // serde_json does the string escaping.
    let code = serde_json::Value::from(code);
    let message = serde_json::Value::from(message);
    format!(r#"{{"error":{{"code":{code},"message":{message}}}}}"#)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::limit::{Clock as _, FakeClock};

    const NOW: u64 = 1_706_540_000_250;

    /// Both clocks at `ms`: no wall-clock step since the decision.
    fn at(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            unix_ms: ms,
        }
    }

    fn decision(allowed: bool, remaining: u32, reset_ms: u64) -> Decision {
        Decision {
            allowed,
            limit: 100,
            remaining,
            reset_ms,
            rejected: u32::from(!allowed),
            window: reset_ms,
        }
    }

    fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn go_durations_are_what_openai_sends() {
        for (ms, text) in [
            (0, "0ms"),
            (20, "20ms"),
            (999, "999ms"),
            (1_000, "1s"),
            (1_500, "1.5s"),
            (59_999, "59.999s"),
            (60_000, "1m0s"),
            (360_000, "6m0s"),
            (3_605_250, "1h0m5.25s"),
        ] {
            assert_eq!(go_duration(ms), text, "{ms} ms");
        }
    }

    #[test]
    fn a_token_budget_adds_openais_headers_and_a_second_ietf_item() {
        let requests = decision(true, 59, NOW + 60_000);
        let budget = Decision {
            limit: 90_000,
            remaining: 89_500,
            ..decision(true, 0, NOW + 30_000)
        };
        let policy = PolicyName::from_route("/api/v1/chat/completions");
        let tokens_policy = PolicyName::from_route("/api/v1/chat/completions/tokens");
        let mut headers = HeaderMap::new();
        apply(&mut headers, &requests, 60_000, at(NOW), Some(&policy));
        let state = TokenState {
            decision: &budget,
            window_ms: 60_000,
            policy: Some(&tokens_policy),
        };
        apply_tokens(&mut headers, &requests, state, at(NOW));
        for (name, value) in [
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1m0s"),
            ("x-ratelimit-limit-tokens", "90000"),
            ("x-ratelimit-remaining-tokens", "89500"),
            ("x-ratelimit-reset-tokens", "30s"),
            (
                "ratelimit-policy",
                "\"api-v1-chat-completions\";q=100;w=60, \"api-v1-chat-completions-tokens\";q=90000;w=60",
            ),
            (
                "ratelimit",
                "\"api-v1-chat-completions\";r=59;t=61, \"api-v1-chat-completions-tokens\";r=89500;t=31",
            ),
            ("x-ratelimit-remaining", "59"),
        ] {
            assert_eq!(header(&headers, name), Some(value), "{name}");
        }
    }

    #[test]
    fn exact_header_values() {
        let d = decision(true, 99, 1_706_540_059_001);
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-limit", HeaderValue::from_static("7"));
        apply(&mut headers, &d, 60_000, at(NOW), None);
        assert_eq!(
            header(&headers, "x-ratelimit-limit"),
            Some("100"),
            "replaced, not appended"
        );
        assert_eq!(headers.get_all("x-ratelimit-limit").iter().count(), 1);
        assert_eq!(header(&headers, "x-ratelimit-remaining"), Some("99"));
        assert_eq!(header(&headers, "x-ratelimit-reset"), Some("1706540060"));
        assert_eq!(header(&headers, "ratelimit"), None);
        assert_eq!(header(&headers, "ratelimit-policy"), None);

        let policy = PolicyName::from_route("/api/v1/chat/completions");
        apply(&mut headers, &d, 60_000, at(NOW), Some(&policy));
        assert_eq!(
            header(&headers, "ratelimit-policy"),
            Some("\"api-v1-chat-completions\";q=100;w=60")
        );
        assert_eq!(
            header(&headers, "ratelimit"),
            Some("\"api-v1-chat-completions\";r=99;t=60")
        );
        assert_eq!(headers.len(), 5);

        let rejected = decision(false, 0, NOW + 1_500);
        apply(&mut headers, &rejected, 1_500, at(NOW), Some(&policy));
        assert_eq!(
            header(&headers, "ratelimit-policy"),
            Some("\"api-v1-chat-completions\";q=100;w=2")
        );
        assert_eq!(
            header(&headers, "ratelimit"),
            Some("\"api-v1-chat-completions\";r=0;t=2")
        );
    }

    #[test]
    fn policy_names_are_the_route_as_a_plain_structured_fields_string() {
        for (route, name) in [
            ("/api/v1/chat/completions", "api-v1-chat-completions"),
            ("/api/v1/fashion/status/:id", "api-v1-fashion-status-id"),
            ("/API/Files//*", "api-files"),
            ("/", "default"),
        ] {
            assert_eq!(PolicyName::from_route(route).as_str(), name, "{route}");
        }
    }

    #[test]
    fn reset_rounds_up_to_the_second() {
        let now = at(NOW);
        assert_eq!(
            reset_secs(&decision(true, 1, 1_706_540_059_001), now),
            1_706_540_060
        );
        assert_eq!(
            reset_secs(&decision(true, 1, 1_706_540_060_000), now),
            1_706_540_060
        );
        assert_eq!(
            reset_secs(&decision(true, 1, 1_706_540_060_999), now),
            1_706_540_061
        );
        assert_eq!(
            reset_secs(&decision(true, 1, NOW - 1), now),
            1_706_540_001,
            "a reset already passed is now, rounded up"
        );
    }

    #[test]
    fn retry_after_is_at_least_one() {
        assert_eq!(retry_after_secs(&decision(false, 0, NOW), at(NOW)), 1);
        assert_eq!(
            retry_after_secs(&decision(false, 0, NOW - 5_000), at(NOW)),
            1
        );
        // Reset at ...060.000, now ...000.250: 60 s from the current whole second.
        assert_eq!(
            retry_after_secs(&decision(false, 0, 1_706_540_060_000), at(NOW)),
            60
        );
    }

    /// Issue 12 item 8: the wall clock steps (NTP) while a window runs. The window
    /// keeps its length on the monotonic clock; the Unix times sent to the client
    /// are the wall clock at answer time plus the time left. (Before, the Unix
    /// epoch was read once at start: these headers stayed off by the step.)
    #[test]
    fn unix_times_follow_a_wall_clock_step_and_the_window_does_not() {
        let clock = FakeClock::new(NOW);
        let d = decision(false, 0, clock.now_ms() + 60_000);
        clock.advance(10_000);
        let mut headers = HeaderMap::new();
        let check = |headers: &mut HeaderMap, now: Now, reset: &str, retry: u64| {
            apply(headers, &d, 60_000, now, Some(&PolicyName::from_route("/")));
            assert_eq!(header(headers, "x-ratelimit-reset"), Some(reset));
            assert_eq!(retry_after_secs(&d, now), retry);
            let state = format!("\"default\";r=0;t={retry}");
            assert_eq!(header(headers, "ratelimit"), Some(state.as_str()));
        };
        // No step: ...000.250 + 60 s, rounded up; 51 s from the whole second ...010.
        check(&mut headers, clock.now(), "1706540061", 51);

        clock.step_wall(3_600_000);
        assert_eq!(
            clock.now_ms(),
            NOW + 10_000,
            "the monotonic clock did not step"
        );
        check(&mut headers, clock.now(), "1706543661", 51);

        clock.step_wall(-7_200_000);
        check(&mut headers, clock.now(), "1706536461", 51);

        // Time passes on both clocks: the same window, 30 s closer.
        clock.advance(30_000);
        check(&mut headers, clock.now(), "1706536461", 21);
    }

    proptest! {
        #[test]
        fn retry_after_never_earlier_than_reset(
            mono in 0u64..1 << 42,
            wall in 0u64..1 << 42,
            ahead in 0u64..100_000_000,
        ) {
            let d = decision(false, 0, mono + ahead);
            let now = Now { mono_ms: mono, unix_ms: wall };
            let retry = retry_after_secs(&d, now);
            prop_assert!(retry >= 1);
            prop_assert!(wall / 1000 + retry >= reset_secs(&d, now), "whole-second now + Retry-After");
            prop_assert!(wall + retry * 1000 >= wall + ahead, "exact now + Retry-After");
            prop_assert!(retry * 1000 < ahead + 2_000, "and not a second more than needed");
        }
    }

    #[test]
    fn too_many_requests_body_is_exact_json() {
        let body = too_many_requests_body(60);
        assert_eq!(
            body,
            r#"{"error":{"code":"RATE_LIMIT_EXCEEDED","message":"Rate limit exceeded. Try again later.","details":{"retryAfter":60}}}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["error"]["details"]["retryAfter"], 60);
    }

    #[test]
    fn error_body_escapes() {
        let body = error_body("BAD_REQUEST", "bad \"path\"\\\n");
        assert_eq!(
            body,
            r#"{"error":{"code":"BAD_REQUEST","message":"bad \"path\"\\\n"}}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["error"]["message"], "bad \"path\"\\\n");
        assert_eq!(parsed["error"]["code"], "BAD_REQUEST");
    }
}
