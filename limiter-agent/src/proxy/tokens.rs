//! Token budgets for OpenAI-compatible endpoints. A request's JSON body
//! says what it may cost (its completion bound, its size), which is reserved
//! at admission; the answer's `usage` says what it did cost, which settles
//! the reservation. The answer is watched on its way to the client, never
//! held: a JSON answer is copied aside to be read at its end, an event
//! stream is read line by line and passed on as each line completes. A
//! stream whose client did not ask for `stream_options.include_usage` has
//! it asked for upstream-bound, and the usage the client did not ask for
//! (the `"usage":null` member of every chunk, the usage-only event at the
//! end) is taken out, so the client gets the stream it asked for.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;

use super::{Body, BoxError};
use crate::{
    config::{Reserve, TokenBudget, UsageField},
    identity::Identity,
    limit::{BucketKey, Clock, Settle, Store},
};

/// Largest JSON answer copied aside to read its `usage`; a larger one is
/// settled as if it reported none.
const MAX_ANSWER_COPY: usize = 4 * 1024 * 1024;
/// Longest event-stream line kept to read; a longer one is passed on unread.
const MAX_LINE: usize = 1024 * 1024;

/// What a request asks for, as far as its cost goes.
#[derive(Deserialize)]
struct Asked {
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    n: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// What a request reserves and what goes upstream.
#[derive(Debug)]
pub(super) struct Plan {
    /// Tokens held until the answer settles them.
    pub(super) tokens: u32,
    /// The body to forward: the client's, or with `include_usage` added.
    pub(super) body: Bytes,
    /// The client did not ask for usage in its stream: take it out.
    pub(super) strip: bool,
}

/// A body this endpoint cannot read a cost from: 400.
#[derive(Debug, thiserror::Error)]
#[error(
    "the body must be a JSON object with well-formed stream, stream_options, max_tokens, max_completion_tokens and n: {0}"
)]
pub(super) struct Unreadable(String);

/// Reads a request body: its reservation, and the body to forward.
///
/// `reserve = "max_tokens"`: the completion bound (`max_completion_tokens`,
/// else `max_tokens`, else `default_max_tokens`) times `n` (at least 1),
/// plus the prompt estimate, the body's bytes divided by
/// `prompt_bytes_per_token` (rounded up: with 1, an upper bound on a text
/// prompt's tokens, since every token of a byte-level tokenizer covers at
/// least one byte, and the JSON around each message outweighs its framing
/// tokens).
///
/// # Errors
/// The body is not a JSON object, or names a field twice, or gives one of
/// the fields above a value of the wrong type: the upstream could read a
/// different cost from it than the agent.
pub(super) fn plan(body: Bytes, budget: &TokenBudget) -> Result<Plan, Unreadable> {
    let asked: Asked = serde_json::from_slice(&body).map_err(|e| Unreadable(e.to_string()))?;
    let tokens = match budget.reserve {
        Reserve::Fixed(n) => u64::from(n),
        Reserve::MaxTokens => {
            let completion = asked
                .max_completion_tokens
                .or(asked.max_tokens)
                .unwrap_or(u64::from(budget.default_max_tokens));
            let prompt =
                (body.len() as u64).div_ceil(u64::from(budget.prompt_bytes_per_token.get()));
            completion
                .saturating_mul(asked.n.unwrap_or(1).max(1))
                .saturating_add(prompt)
        }
    };
    let tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
    let asked_usage = asked.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true);
    if asked.stream != Some(true) || asked_usage {
        return Ok(Plan {
            tokens,
            body,
            strip: false,
        });
    }
    let body = if asked.stream_options.is_none() {
        with_stream_options(&body)
    } else {
        with_include_usage(&body)?
    };
    Ok(Plan {
        tokens,
        body,
        strip: true,
    })
}

/// `body` (an object without `stream_options`) with
/// `"stream_options":{"include_usage":true}` as its first member; the rest
/// is the client's, byte for byte.
fn with_stream_options(body: &[u8]) -> Bytes {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let open = body.iter().position(|&b| b == b'{').unwrap_or(0);
    let empty = body[open + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    let mut out = Vec::with_capacity(body.len() + MEMBER.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(MEMBER);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&body[open + 1..]);
    out.into()
}

/// `body` with `stream_options.include_usage` set, through a parse (a client
/// that sent `stream_options` without it: rare).
fn with_include_usage(body: &[u8]) -> Result<Bytes, Unreadable> {
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Unreadable(e.to_string()))?;
    let options = value
        .get_mut("stream_options")
        .and_then(serde_json::Value::as_object_mut)
        .ok_or_else(|| Unreadable("stream_options is not an object".into()))?;
    options.insert("include_usage".into(), true.into());
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| Unreadable(e.to_string()))
}

/// An answer's `usage`, the fields a settlement may count.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[expect(clippy::struct_field_names, reason = "OpenAI's names")]
pub(super) struct Usage {
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl Usage {
    fn sum(self, fields: &[UsageField]) -> u64 {
        fields
            .iter()
            .map(|field| match field {
                UsageField::Total => self.total_tokens,
                UsageField::Prompt => self.prompt_tokens,
                UsageField::Completion => self.completion_tokens,
            })
            .fold(0, u64::saturating_add)
    }
}

/// A JSON answer, or a stream chunk: its usage, and its choices.
#[derive(Deserialize)]
struct Reported {
    usage: Option<Usage>,
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

/// A reservation to settle once the answer's usage is known.
pub(super) struct Settlement {
    pub(super) store: Arc<dyn Store>,
    pub(super) key: BucketKey,
    pub(super) tier: Arc<str>,
    pub(super) identity: Identity,
    pub(super) limit: u32,
    pub(super) window_ms: u64,
    /// The reserving decision's window.
    pub(super) window: u64,
    pub(super) reserved: u32,
    pub(super) fields: Vec<UsageField>,
    /// Used, refunded and charged tokens.
    pub(super) counters: [Counter; 3],
    pub(super) clock: Arc<dyn Clock>,
}

impl Settlement {
    /// Settles at `usage` (off the answer's path): the difference refunded
    /// or charged. No usage (an upstream error, a client gone before the
    /// end, an answer that reported none): the reservation stands.
    fn settle(self, usage: Option<Usage>) {
        let Some(usage) = usage else { return };
        let used = usage.sum(&self.fields);
        self.counters[0].inc_by(used);
        self.adjust(i64::try_from(used).unwrap_or(i64::MAX));
    }

    /// Gives the whole reservation back: the request never reached the
    /// upstream.
    pub(super) fn refund(self) {
        self.adjust(0);
    }

    /// Settles at `used` tokens.
    fn adjust(self, used: i64) {
        let [_, refunded, charged] = &self.counters;
        let delta = used.saturating_sub(i64::from(self.reserved));
        match delta.cmp(&0) {
            std::cmp::Ordering::Less => refunded.inc_by(delta.unsigned_abs()),
            std::cmp::Ordering::Greater => charged.inc_by(delta.unsigned_abs()),
            std::cmp::Ordering::Equal => return,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let settle = Settle {
                key: self.key,
                tier: &self.tier,
                identity: &self.identity,
                limit: self.limit,
                window_ms: self.window_ms,
                window: self.window,
                delta,
            };
            let now_ms = self.clock.now_ms();
            if let Err(e) = self.store.settle(settle, now_ms).await {
                tracing::debug!(error = %e, "settling a token reservation failed; it stands");
            }
        });
    }
}

/// How an answer's body is read.
enum Reading {
    /// A JSON answer, copied aside up to [`MAX_ANSWER_COPY`] (`None` past it).
    Json(Option<Vec<u8>>),
    /// An event stream: the line being completed, whether to take out the
    /// usage the client did not ask for, and whether the blank line ending
    /// a removed event is still to come.
    Events {
        line: Vec<u8>,
        strip: bool,
        skip_blank: bool,
    },
}

/// An answer body on its way to the client, read for its usage; settles its
/// request's reservation when dropped.
pub(super) struct Metered {
    inner: Body,
    reading: Reading,
    usage: Option<Usage>,
    /// Taken when the answer ends (or is dropped before).
    settlement: Option<Settlement>,
}

impl Metered {
    /// `events`: the answer is `text/event-stream`; `strip`: its client did
    /// not ask for usage.
    pub(super) fn new(inner: Body, events: bool, strip: bool, settlement: Settlement) -> Self {
        Self {
            inner,
            reading: if events {
                Reading::Events {
                    line: Vec::new(),
                    strip,
                    skip_blank: false,
                }
            } else {
                Reading::Json(Some(Vec::new()))
            },
            usage: None,
            settlement: Some(settlement),
        }
    }

    /// Reads one piece; what to pass on (`None`: all of it as it came).
    fn read(&mut self, data: &Bytes) -> Option<Bytes> {
        match &mut self.reading {
            Reading::Json(copy) => {
                if let Some(kept) = copy {
                    if kept.len() + data.len() > MAX_ANSWER_COPY {
                        *copy = None;
                    } else {
                        kept.extend_from_slice(data);
                    }
                }
                None
            }
            Reading::Events {
                line,
                strip,
                skip_blank,
            } => {
                let strip = *strip;
                let mut out = Vec::new();
                let mut rest: &[u8] = data;
                while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                    let (piece, after) = rest.split_at(end + 1);
                    rest = after;
                    if line.is_empty() {
                        event_line(piece, strip, skip_blank, &mut self.usage, &mut out);
                    } else {
                        line.extend_from_slice(piece);
                        let whole = std::mem::take(line);
                        event_line(&whole, strip, skip_blank, &mut self.usage, &mut out);
                    }
                }
                if line.len() + rest.len() > MAX_LINE {
                    // Too long to be an event the agent reads: passed on as is.
                    out.append(line);
                    out.extend_from_slice(rest);
                } else {
                    line.extend_from_slice(rest);
                }
                strip.then(|| out.into())
            }
        }
    }

    /// The answer ended: what is left to pass on.
    fn finish(&mut self) -> Option<Bytes> {
        match &mut self.reading {
            Reading::Json(copy) => {
                if let Some(kept) = copy.take()
                    && let Ok(reported) = serde_json::from_slice::<Reported>(&kept)
                {
                    self.usage = reported.usage;
                }
                None
            }
            Reading::Events {
                line,
                strip,
                skip_blank,
            } => {
                if line.is_empty() {
                    return None;
                }
                let whole = std::mem::take(line);
                let mut out = Vec::new();
                event_line(&whole, *strip, skip_blank, &mut self.usage, &mut out);
                (*strip && !out.is_empty()).then(|| out.into())
            }
        }
    }
}

/// One event-stream line (with its line ending): its usage noted, and what
/// of it goes on appended to `out`.
fn event_line(
    line: &[u8],
    strip: bool,
    skip_blank: &mut bool,
    usage: &mut Option<Usage>,
    out: &mut Vec<u8>,
) {
    let content = line.trim_ascii_end();
    if std::mem::take(skip_blank) && content.is_empty() {
        return;
    }
    let data = content.strip_prefix(b"data:").map(<[u8]>::trim_ascii_start);
    let Some(data) = data.filter(|d| d.first() == Some(&b'{') && contains(d, b"\"usage\"")) else {
        out.extend_from_slice(line);
        return;
    };
    if strip && let Some(without) = without_null_usage(line) {
        out.extend_from_slice(&without);
        return;
    }
    match serde_json::from_slice::<Reported>(data) {
        Ok(Reported {
            usage: Some(reported),
            choices,
        }) => {
            *usage = Some(reported);
            if strip && choices.is_some_and(|c| c.is_empty()) {
                // The usage-only event the client did not ask for.
                *skip_blank = true;
                return;
            }
            out.extend_from_slice(line);
        }
        _ => out.extend_from_slice(line),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `line` (holding one JSON object) without its top-level `"usage": null`
/// member and one comma beside it, byte for byte otherwise; `None` when it
/// has no such member.
fn without_null_usage(line: &[u8]) -> Option<Vec<u8>> {
    let open = line.iter().position(|&b| b == b'{')?;
    let mut depth = 0usize;
    // The `{` or `,` before the depth-1 member being read.
    let mut before = open;
    let mut key_next = false;
    let mut i = open;
    while i < line.len() {
        match line[i] {
            b'"' => {
                let end = string_end(line, i)?;
                if depth == 1 && key_next {
                    key_next = false;
                    if &line[i + 1..end] == b"usage" {
                        return null_member_removed(line, before, end + 1);
                    }
                }
                i = end + 1;
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth == 1 {
                    key_next = true;
                    before = i;
                }
            }
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' if depth == 1 => {
                key_next = true;
                before = i;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The member whose key ends before `after_key` removed, if its value is
/// `null`; `before` is the `{` or `,` before it.
fn null_member_removed(line: &[u8], before: usize, after_key: usize) -> Option<Vec<u8>> {
    let skip = |mut at: usize| {
        while line.get(at).is_some_and(u8::is_ascii_whitespace) {
            at += 1;
        }
        at
    };
    let colon = skip(after_key);
    if line.get(colon) != Some(&b':') {
        return None;
    }
    let value = skip(colon + 1);
    if !line[value..].starts_with(b"null") {
        return None;
    }
    let next = skip(value + 4);
    let first = line[before] == b'{';
    let (cut_from, cut_to) = match line.get(next)? {
        // The first of several: the comma after it goes too.
        b',' if first => (before + 1, skip(next + 1)),
        // After another: the comma before it goes.
        b',' | b'}' if !first => (before, value + 4),
        // The only member.
        b'}' => (before + 1, next),
        _ => return None,
    };
    let mut out = Vec::with_capacity(line.len());
    out.extend_from_slice(&line[..cut_from]);
    out.extend_from_slice(&line[cut_to..]);
    Some(out)
}

/// The index of the quote closing the string opened at `open`.
fn string_end(line: &[u8], open: usize) -> Option<usize> {
    let mut i = open + 1;
    while i < line.len() {
        match line[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let left = this.finish();
                    if let Some(settlement) = this.settlement.take() {
                        settlement.settle(this.usage);
                    }
                    return Poll::Ready(left.map(|data| Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let Some(data) = frame.data_ref() else {
                return Poll::Ready(Some(Ok(frame)));
            };
            match this.read(data) {
                None => return Poll::Ready(Some(Ok(frame))),
                Some(kept) if kept.is_empty() => {}
                Some(kept) => return Poll::Ready(Some(Ok(Frame::data(kept)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // The end is where the usage is read and the settlement made.
        false
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Events { strip: true, .. } => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // A body of known length is dropped once its last byte is sent,
        // without being asked for its end: what was read is read now (a
        // JSON answer cut short does not parse). A client gone before the
        // usage came leaves it unknown, and the reservation stands.
        if let Some(settlement) = self.settlement.take() {
            let _ = self.finish();
            settlement.settle(self.usage);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, time::Duration};

    use super::*;

    fn budget(reserve: Reserve) -> TokenBudget {
        TokenBudget {
            limit: NonZeroU32::new(90_000).unwrap(),
            window: Duration::from_mins(1),
            reserve,
            default_max_tokens: 4096,
            prompt_bytes_per_token: NonZeroU32::new(1).unwrap(),
            usage: vec![UsageField::Total],
            max_request_bytes: 1 << 20,
        }
    }

    fn planned(body: &str, reserve: Reserve) -> Result<Plan, Unreadable> {
        plan(Bytes::from(body.to_owned()), &budget(reserve))
    }

    #[test]
    fn a_reservation_is_the_completion_bound_times_n_plus_the_body() {
        let body = r#"{"model":"m","max_tokens":100,"messages":[]}"#;
        let p = planned(body, Reserve::MaxTokens).unwrap();
        assert_eq!(p.tokens, 100 + body.len() as u32);
        assert!(!p.strip);
        assert_eq!(p.body, body.as_bytes());
        let body = r#"{"max_completion_tokens":50,"max_tokens":100,"n":3}"#;
        assert_eq!(
            planned(body, Reserve::MaxTokens).unwrap().tokens,
            150 + body.len() as u32,
            "max_completion_tokens wins, times n"
        );
        let body = r#"{"messages":[]}"#;
        assert_eq!(
            planned(body, Reserve::MaxTokens).unwrap().tokens,
            4096 + body.len() as u32,
            "no bound: the default"
        );
        assert_eq!(planned(body, Reserve::Fixed(700)).unwrap().tokens, 700);
        let huge = r#"{"max_tokens":99999999999999}"#;
        assert_eq!(planned(huge, Reserve::MaxTokens).unwrap().tokens, u32::MAX);
    }

    #[test]
    fn a_body_the_upstream_could_read_differently_is_refused() {
        for body in [
            "not json",
            "[1,2]",
            r#"{"max_tokens":10,"max_tokens":100000}"#,
            r#"{"max_tokens":-1}"#,
            r#"{"max_tokens":"10"}"#,
            r#"{"stream":"yes"}"#,
            r#"{"n":1.5}"#,
        ] {
            assert!(planned(body, Reserve::MaxTokens).is_err(), "{body}");
        }
    }

    #[test]
    fn a_stream_without_usage_asks_for_it_upstream_and_strips_it() {
        let p = planned(r#"{ "stream": true, "max_tokens": 5 }"#, Reserve::MaxTokens).unwrap();
        assert!(p.strip);
        assert_eq!(
            &p.body[..],
            br#"{"stream_options":{"include_usage":true}, "stream": true, "max_tokens": 5 }"#
        );
        let p = planned(
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            Reserve::MaxTokens,
        )
        .unwrap();
        assert!(p.strip);
        let sent: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
        let asked = r#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        let p = planned(asked, Reserve::MaxTokens).unwrap();
        assert!(!p.strip, "asked for: passed on");
        assert_eq!(p.body, asked.as_bytes());
    }

    #[test]
    fn a_null_usage_member_is_taken_out_byte_for_byte() {
        for (with, without) in [
            (r#"{"a":1,"usage":null}"#, r#"{"a":1}"#),
            (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
            (r#"{"a":1,"usage":null,"b":[2]}"#, r#"{"a":1,"b":[2]}"#),
            (r#"{"a": 1, "usage" : null }"#, r#"{"a": 1 }"#),
            (r#"{"usage":null}"#, "{}"),
            (
                r#"data: {"x":{"usage":null},"s":"\"usage\":null","usage":null}"#,
                r#"data: {"x":{"usage":null},"s":"\"usage\":null"}"#,
            ),
        ] {
            assert_eq!(
                without_null_usage(with.as_bytes()).as_deref(),
                Some(without.as_bytes()),
                "{with}"
            );
        }
        for kept in [
            r#"{"usage":{"total_tokens":3}}"#,
            r#"{"a":{"usage":null}}"#,
            r#"{"a":"usage"}"#,
            r#"{"usage":nul"#,
        ] {
            assert_eq!(without_null_usage(kept.as_bytes()), None, "{kept}");
        }
    }

    /// Reads `pieces` as one event stream; what passes, and the usage seen.
    fn stream(pieces: &[&str], strip: bool) -> (String, Option<Usage>) {
        let mut reading = Reading::Events {
            line: Vec::new(),
            strip,
            skip_blank: false,
        };
        let mut usage = None;
        let mut passed = Vec::new();
        let mut meter = |data: &[u8], reading: &mut Reading| {
            let Reading::Events {
                line,
                strip,
                skip_blank,
            } = reading
            else {
                unreachable!()
            };
            let mut rest = data;
            while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&rest[..=end]);
                rest = &rest[end + 1..];
                let whole = std::mem::take(line);
                event_line(&whole, *strip, skip_blank, &mut usage, &mut passed);
            }
            line.extend_from_slice(rest);
        };
        for piece in pieces {
            meter(piece.as_bytes(), &mut reading);
        }
        (String::from_utf8(passed).unwrap(), usage)
    }

    #[test]
    fn the_usage_only_event_and_null_members_are_stripped_when_not_asked_for() {
        let upstream = [
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"us",
            "age\":null}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
            "data: [DONE]\n\n",
        ];
        let (passed, usage) = stream(&upstream, true);
        assert_eq!(
            passed,
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
             data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
             data: [DONE]\n\n"
        );
        assert_eq!(usage.unwrap().sum(&[UsageField::Total]), 11);
        let (passed, usage) = stream(&upstream, false);
        assert_eq!(passed, upstream.concat(), "asked for: every byte passes");
        assert_eq!(
            usage
                .unwrap()
                .sum(&[UsageField::Prompt, UsageField::Completion]),
            11
        );
    }
}
