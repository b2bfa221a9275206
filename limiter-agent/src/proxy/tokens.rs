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
    fmt::Write as _,
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
const MAX_ANSWER_COPY: usize = 1024 * 1024;
/// Longest event-stream line kept to read; a longer one is passed on unread.
const MAX_LINE: usize = 1024 * 1024;

/// What a request asks for, as far as its cost goes: every field an
/// OpenAI-compatible server reads a completion's bound, its multiplicity or
/// its prompts from.
#[derive(Deserialize)]
struct Asked {
    stream: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    stream_options: Field<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    /// llama.cpp's own bound.
    n_predict: Option<i64>,
    n: Option<u64>,
    best_of: Option<u64>,
    /// The completions endpoint's prompt, or prompts.
    prompt: Option<serde_json::Value>,
    messages: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// A field absent, `null` or with a value: an upstream that takes the last
/// of two members would read a `null` it was sent after an added one.
#[derive(Default)]
enum Field<T> {
    #[default]
    Absent,
    Null,
    Value(T),
}

/// Reads a field that is there (`null` included).
fn present<'de, D, T>(deserializer: D) -> Result<Field<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.map_or(Field::Null, Field::Value))
}

/// What a request reserves and what goes upstream.
#[derive(Debug)]
pub(super) struct Plan {
    /// Tokens held until the answer settles them.
    pub(super) tokens: u32,
    /// The body to forward: the client's, or with a completion bound and
    /// `include_usage` added.
    pub(super) body: Bytes,
    /// The client did not ask for usage in its stream: take it out.
    pub(super) strip: bool,
}

/// A body this endpoint cannot read a cost from: 400.
#[derive(Debug, thiserror::Error)]
#[error(
    "the body must be a JSON object with a well-formed stream, stream_options, max_tokens, max_completion_tokens, n_predict, n, best_of and prompt, and no bound of 0: {0}"
)]
pub(super) struct Unreadable(String);

/// Reads a request body: its reservation, and the body to forward.
///
/// `reserve = "max_tokens"`: the completion bound times the completions
/// asked for, plus the prompt estimate. The bound is the largest of
/// `max_completion_tokens`, `max_tokens` and `n_predict` (servers differ on
/// which wins); with none, `default_max_tokens`, written into the forwarded
/// body (`max_completion_tokens` for a chat, `max_tokens` otherwise) so the
/// upstream keeps to what was reserved. The completions asked for: `n` (or
/// `best_of`, the larger) times the prompts of a completions request. The
/// prompt estimate: the body's bytes divided by `prompt_bytes_per_token`,
/// rounded up (with 1, an upper bound on a text prompt's tokens, since every
/// token of a byte-level tokenizer covers at least one byte, and the JSON
/// around each message outweighs its framing tokens).
///
/// # Errors
/// The body is not a JSON object, or names a field twice, or gives one of
/// the fields above a value of the wrong type, or a bound of 0 (read as
/// "unbounded" by some servers): the upstream could read a different cost
/// from it than the agent.
pub(super) fn plan(body: &Bytes, budget: &TokenBudget) -> Result<Plan, Unreadable> {
    let asked: Asked = serde_json::from_slice(body).map_err(|e| Unreadable(e.to_string()))?;
    let n_predict = asked
        .n_predict
        .map(|n| u64::try_from(n).map_err(|_| Unreadable("n_predict is negative".into())))
        .transpose()?;
    let bounds = [asked.max_completion_tokens, asked.max_tokens, n_predict];
    if bounds.contains(&Some(0)) {
        return Err(Unreadable("a completion bound of 0".into()));
    }
    let stated = bounds.into_iter().flatten().max();
    let completion = stated.unwrap_or(u64::from(budget.default_max_tokens));
    let prompts = match &asked.prompt {
        Some(serde_json::Value::Array(items))
            if items.first().is_some_and(|i| i.is_string() || i.is_array()) =>
        {
            items.len() as u64
        }
        _ => 1,
    };
    let choices = asked.n.unwrap_or(1).max(asked.best_of.unwrap_or(1)).max(1);
    let tokens = match budget.reserve {
        Reserve::Fixed(n) => u64::from(n),
        Reserve::MaxTokens => {
            let prompt =
                (body.len() as u64).div_ceil(u64::from(budget.prompt_bytes_per_token.get()));
            completion
                .saturating_mul(choices)
                .saturating_mul(prompts)
                .saturating_add(prompt)
        }
    };
    let tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
    // Members added at the front of the body; the client's follow byte
    // for byte.
    let mut added = String::new();
    if stated.is_none() && budget.reserve == Reserve::MaxTokens {
        let name = if asked.messages.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let _ = write!(added, "\"{name}\":{completion}");
    }
    let asked_usage = matches!(
        &asked.stream_options,
        Field::Value(StreamOptions {
            include_usage: Some(true)
        })
    );
    let strip = asked.stream == Some(true) && !asked_usage;
    let body = match (strip, &asked.stream_options) {
        (true, Field::Absent) => {
            if !added.is_empty() {
                added.push(',');
            }
            added.push_str(r#""stream_options":{"include_usage":true}"#);
            with_members(body, &added)
        }
        // `stream_options` there (`null`, or without `include_usage: true`):
        // rewritten through a parse, the bound added the same way.
        (true, Field::Null | Field::Value(_)) => with_include_usage(&with_members(body, &added))?,
        (false, _) => with_members(body, &added),
    };
    Ok(Plan {
        tokens,
        body,
        strip,
    })
}

/// `body` (an object) with `members` (JSON members, comma-separated) as its
/// first; the rest is the client's, byte for byte.
fn with_members(body: &Bytes, members: &str) -> Bytes {
    if members.is_empty() {
        return body.clone();
    }
    let open = body.iter().position(|&b| b == b'{').unwrap_or(0);
    let empty = body[open + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    let mut out = Vec::with_capacity(body.len() + members.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(members.as_bytes());
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&body[open + 1..]);
    out.into()
}

/// `body` with `stream_options.include_usage` set, through a parse (a client
/// that sent `stream_options` without it, or as `null`: rare).
fn with_include_usage(body: &[u8]) -> Result<Bytes, Unreadable> {
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Unreadable(e.to_string()))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| Unreadable("not an object".into()))?;
    let options = object
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if options.is_null() {
        *options = serde_json::json!({});
    }
    options
        .as_object_mut()
        .ok_or_else(|| Unreadable("stream_options is not an object".into()))?
        .insert("include_usage".into(), true.into());
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| Unreadable(e.to_string()))
}

/// An answer's `usage`, the fields a settlement may count.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[expect(clippy::struct_field_names, reason = "OpenAI's names")]
pub(super) struct Usage {
    total_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl Usage {
    /// The sum of `fields`; `None` when one is missing (another API's
    /// usage, say): then the answer reported no usage the tier reads.
    fn sum(self, fields: &[UsageField]) -> Option<u64> {
        fields
            .iter()
            .map(|field| match field {
                UsageField::Total => self.total_tokens,
                UsageField::Prompt => self.prompt_tokens,
                UsageField::Completion => self.completion_tokens,
            })
            .try_fold(0_u64, |sum, n| n.map(|n| sum.saturating_add(n)))
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
    /// or charged. A usage that is not `last` (the answer's end never came:
    /// a client gone, a stream cut) only ever charges: the upstream may have
    /// gone on generating. No usage (an upstream error, a client gone before
    /// it came, an answer that reported none the tier reads): the
    /// reservation stands.
    fn settle(self, usage: Option<Usage>, last: bool) {
        let Some(used) = usage.and_then(|u| u.sum(&self.fields)) else {
            return;
        };
        self.counters[0].inc_by(used);
        let used = i64::try_from(used).unwrap_or(i64::MAX);
        if last || used > i64::from(self.reserved) {
            self.adjust(used);
        }
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
        /// The rest of a line too long to read is passed on unread.
        skip_line: bool,
    },
}

/// An answer body on its way to the client, read for its usage; settles its
/// request's reservation when dropped.
pub(super) struct Metered {
    inner: Body,
    reading: Reading,
    usage: Option<Usage>,
    /// The usage read is the answer's last word: its end was read, or (a
    /// stream) the usage came in its usage-only event.
    last: bool,
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
                    skip_line: false,
                }
            } else {
                Reading::Json(Some(Vec::new()))
            },
            usage: None,
            last: false,
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
                skip_line,
            } => {
                let strip = *strip;
                let mut out = Vec::new();
                let mut rest: &[u8] = data;
                let mut events = Events {
                    strip,
                    skip_blank,
                    usage: &mut self.usage,
                    last: &mut self.last,
                };
                while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                    let (piece, after) = rest.split_at(end + 1);
                    rest = after;
                    if std::mem::take(skip_line) {
                        out.extend_from_slice(piece);
                    } else if line.is_empty() {
                        events.line(piece, &mut out);
                    } else {
                        line.extend_from_slice(piece);
                        let whole = std::mem::take(line);
                        events.line(&whole, &mut out);
                    }
                }
                if *skip_line {
                    out.extend_from_slice(rest);
                } else if line.len() + rest.len() > MAX_LINE {
                    // Too long to be an event the agent reads: passed on
                    // unread, to its end.
                    out.append(line);
                    out.extend_from_slice(rest);
                    *skip_line = true;
                } else {
                    line.extend_from_slice(rest);
                }
                strip.then(|| out.into())
            }
        }
    }

    /// The answer ended (`end`) or is dropped: what is left to pass on.
    fn finish(&mut self, end: bool) -> Option<Bytes> {
        match &mut self.reading {
            Reading::Json(copy) => {
                // A copy that parses is the whole answer (one cut short does
                // not), whether or not its end was asked for.
                if let Some(kept) = copy.take()
                    && let Ok(reported) = serde_json::from_slice::<Reported>(&kept)
                {
                    self.usage = reported.usage;
                    self.last = true;
                }
                None
            }
            Reading::Events {
                line,
                strip,
                skip_blank,
                skip_line,
            } => {
                if end {
                    self.last = true;
                }
                if line.is_empty() || *skip_line {
                    return None;
                }
                let whole = std::mem::take(line);
                let mut out = Vec::new();
                Events {
                    strip: *strip,
                    skip_blank,
                    usage: &mut self.usage,
                    last: &mut self.last,
                }
                .line(&whole, &mut out);
                (*strip && !out.is_empty()).then(|| out.into())
            }
        }
    }
}

/// What reading an event stream's lines updates.
struct Events<'a> {
    strip: bool,
    skip_blank: &'a mut bool,
    usage: &'a mut Option<Usage>,
    last: &'a mut bool,
}

impl Events<'_> {
    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        event_line(
            line,
            self.strip,
            self.skip_blank,
            self.usage,
            self.last,
            out,
        );
    }
}

/// One event-stream line (with its line ending): its usage noted, and what
/// of it goes on appended to `out`.
fn event_line(
    line: &[u8],
    strip: bool,
    skip_blank: &mut bool,
    usage: &mut Option<Usage>,
    last: &mut bool,
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
            let usage_only = choices.is_some_and(|c| c.is_empty());
            // The usage-only event closes the stream's generation: its
            // usage is the whole answer's.
            *last |= usage_only;
            if strip && usage_only {
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
                    let left = this.finish(true);
                    if let Some(settlement) = this.settlement.take() {
                        settlement.settle(this.usage, this.last);
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
        // usage came leaves it unknown, and the reservation stands; one gone
        // after a usage that was not the last word is charged for it only
        // beyond the reservation.
        if let Some(settlement) = self.settlement.take() {
            let _ = self.finish(false);
            settlement.settle(self.usage, self.last);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, time::Duration};

    use http_body_util::{BodyExt as _, Full};

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
        plan(&Bytes::from(body.to_owned()), &budget(reserve))
    }

    fn sent(plan: &Plan) -> serde_json::Value {
        serde_json::from_slice(&plan.body).expect("the forwarded body is JSON")
    }

    #[test]
    fn a_reservation_is_the_largest_bound_times_the_completions_plus_the_body() {
        let body = r#"{"model":"m","max_tokens":100,"messages":[]}"#;
        let p = planned(body, Reserve::MaxTokens).unwrap();
        assert_eq!(p.tokens, 100 + body.len() as u32);
        assert!(!p.strip);
        assert_eq!(
            p.body,
            body.as_bytes(),
            "a stated bound: the body as it came"
        );
        for (body, completion) in [
            (
                r#"{"max_completion_tokens":50,"max_tokens":100,"n":3}"#,
                300,
            ),
            (r#"{"max_tokens":100,"n_predict":700}"#, 700),
            (r#"{"max_tokens":10,"n":2,"best_of":5}"#, 50),
            (r#"{"max_tokens":10,"prompt":["a","b","c"]}"#, 30),
            (r#"{"max_tokens":10,"prompt":[[1,2],[3]]}"#, 20),
            (r#"{"max_tokens":10,"prompt":[1,2,3]}"#, 10),
            (r#"{"max_tokens":10,"prompt":"one"}"#, 10),
        ] {
            assert_eq!(
                planned(body, Reserve::MaxTokens).unwrap().tokens,
                completion + body.len() as u32,
                "{body}"
            );
        }
        assert_eq!(planned(body, Reserve::Fixed(700)).unwrap().tokens, 700);
        let huge = r#"{"max_tokens":99999999999999}"#;
        assert_eq!(planned(huge, Reserve::MaxTokens).unwrap().tokens, u32::MAX);
    }

    #[test]
    fn a_request_without_a_bound_gets_the_one_reserved() {
        let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let p = planned(chat, Reserve::MaxTokens).unwrap();
        assert_eq!(p.tokens, 4096 + chat.len() as u32);
        assert_eq!(
            &p.body[..],
            format!(r#"{{"max_completion_tokens":4096,{}"#, &chat[1..]).as_bytes()
        );
        let completion = r#"{"model":"m","prompt":"hi"}"#;
        let p = planned(completion, Reserve::MaxTokens).unwrap();
        assert_eq!(
            sent(&p)["max_tokens"],
            4096,
            "the completions endpoint's name"
        );
        let p = planned(r#"{"stream":true,"messages":[]}"#, Reserve::MaxTokens).unwrap();
        assert_eq!(
            &p.body[..],
            br#"{"max_completion_tokens":4096,"stream_options":{"include_usage":true},"stream":true,"messages":[]}"#
        );
        let p = planned(chat, Reserve::Fixed(10)).unwrap();
        assert_eq!(
            p.body,
            chat.as_bytes(),
            "a fixed reservation changes nothing"
        );
    }

    #[test]
    fn a_body_the_upstream_could_read_differently_is_refused() {
        for body in [
            "not json",
            "[1,2]",
            r#"{"max_tokens":10,"max_tokens":100000}"#,
            r#"{"max_tokens":10,"max\u005ftokens":100000}"#,
            r#"{"max_tokens":-1}"#,
            r#"{"max_tokens":"10"}"#,
            r#"{"max_tokens":1e3}"#,
            r#"{"max_tokens":0}"#,
            r#"{"max_completion_tokens":0,"max_tokens":32000}"#,
            r#"{"n_predict":-1}"#,
            r#"{"stream":"yes"}"#,
            r#"{"stream":true,"stream_options":3}"#,
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
        for options in [r#"{"include_usage":false}"#, "{}", "null"] {
            let body = format!(r#"{{"stream":true,"max_tokens":5,"stream_options":{options}}}"#);
            let p = planned(&body, Reserve::MaxTokens).unwrap();
            assert!(p.strip, "{body}");
            assert_eq!(sent(&p)["stream_options"]["include_usage"], true, "{body}");
        }
        let asked = r#"{"stream":true,"max_tokens":5,"stream_options":{"include_usage":true}}"#;
        let p = planned(asked, Reserve::MaxTokens).unwrap();
        assert!(!p.strip, "asked for: passed on");
        assert_eq!(p.body, asked.as_bytes());
    }

    #[test]
    fn a_usage_missing_a_field_the_tier_counts_is_no_usage() {
        let usage: Usage = serde_json::from_str(r#"{"input_tokens":5,"output_tokens":7}"#).unwrap();
        assert_eq!(usage.sum(&[UsageField::Total]), None);
        let usage: Usage =
            serde_json::from_str(r#"{"prompt_tokens":5,"completion_tokens":7}"#).unwrap();
        assert_eq!(
            usage.sum(&[UsageField::Prompt, UsageField::Completion]),
            Some(12)
        );
        assert_eq!(usage.sum(&[UsageField::Total]), None);
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

    /// A settlement that counts nothing anywhere (no runtime: it is dropped).
    fn settlement() -> Settlement {
        Settlement {
            store: Arc::new(crate::limit::MemoryStore::new(10)),
            key: BucketKey(1),
            tier: "t".into(),
            identity: Identity::Ip(std::net::Ipv4Addr::LOCALHOST.into()),
            limit: 100,
            window_ms: 1000,
            window: 0,
            reserved: 50,
            fields: vec![UsageField::Total],
            counters: Default::default(),
            clock: Arc::new(crate::limit::FakeClock::new(0)),
        }
    }

    /// Streams `pieces` through a metered event-stream body; what the
    /// client gets, the usage read, and whether it was the last word.
    async fn metered(pieces: &[&str], strip: bool) -> (String, Option<Usage>, bool) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for piece in pieces {
            tx.send(Ok::<_, BoxError>(Frame::data(Bytes::from(
                (*piece).to_owned(),
            ))))
            .await
            .unwrap();
        }
        drop(tx);
        let mut rx = rx;
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let inner = http_body_util::StreamBody::new(stream).boxed();
        let mut body = Metered::new(inner, true, strip, settlement());
        let mut passed = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                passed.extend_from_slice(&data);
            }
        }
        let (usage, last) = (body.usage, body.last);
        (String::from_utf8(passed).unwrap(), usage, last)
    }

    const UPSTREAM: [&str; 4] = [
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"us",
        "age\":null}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n",
    ];

    #[tokio::test]
    async fn the_usage_only_event_and_null_members_are_stripped_when_not_asked_for() {
        let (passed, usage, last) = metered(&UPSTREAM, true).await;
        assert_eq!(
            passed,
            "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
             data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
             data: [DONE]\n\n"
        );
        assert_eq!(usage.unwrap().sum(&[UsageField::Total]), Some(11));
        assert!(last);
        let (passed, usage, _) = metered(&UPSTREAM, false).await;
        assert_eq!(passed, UPSTREAM.concat(), "asked for: every byte passes");
        assert_eq!(
            usage
                .unwrap()
                .sum(&[UsageField::Prompt, UsageField::Completion]),
            Some(11)
        );
    }

    #[tokio::test]
    async fn a_running_usage_is_not_the_last_word_and_crlf_streams_pass_intact() {
        // vLLM's continuous usage: in every chunk, choices not empty.
        let running = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"total_tokens\":3}}\r\n\r\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":{\"total_tokens\":4}}\r\n\r\n",
        ];
        let (passed, usage, last) = metered(&running, true).await;
        assert_eq!(passed, running.concat(), "CRLF lines pass byte for byte");
        assert_eq!(usage.unwrap().sum(&[UsageField::Total]), Some(4));
        assert!(last, "the stream's end was read");
        // Before its end, a running usage only ever charges.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        tx.send(Ok::<_, BoxError>(Frame::data(Bytes::from(running[0]))))
            .await
            .unwrap();
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut body = Metered::new(
            http_body_util::StreamBody::new(stream).boxed(),
            true,
            true,
            settlement(),
        );
        body.frame().await.unwrap().unwrap();
        assert_eq!(body.usage.unwrap().sum(&[UsageField::Total]), Some(3));
        assert!(
            !body.last,
            "a client gone now settles nothing below its reservation"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_line_too_long_to_read_is_passed_on_whole_and_unread() {
        let long = format!(
            "data: {{\"x\":\"{}\",\"usage\":null}}\n\n",
            "y".repeat(MAX_LINE + 10)
        );
        let (first, rest) = long.split_at(MAX_LINE / 2);
        let (second, third) = rest.split_at(MAX_LINE / 2 + 5);
        let (passed, usage, _) = metered(&[first, second, third, "data: [DONE]\n\n"], true).await;
        assert_eq!(passed, format!("{long}data: [DONE]\n\n"));
        assert_eq!(usage, None);
    }

    #[tokio::test]
    async fn a_json_answer_is_read_whole_whether_or_not_its_end_is_asked_for() {
        let answer = r#"{"id":"c","choices":[],"usage":{"total_tokens":42}}"#;
        let inner = Full::new(Bytes::from(answer))
            .map_err(|never| match never {})
            .boxed();
        let mut body = Metered::new(inner, false, false, settlement());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), answer.as_bytes());
        // hyper drops a body of known length after its last byte.
        let _ = body.finish(false);
        assert_eq!(body.usage.unwrap().sum(&[UsageField::Total]), Some(42));
        assert!(body.last);
        let cut = Full::new(Bytes::from(&answer[..20]))
            .map_err(|never| match never {})
            .boxed();
        let mut body = Metered::new(cut, false, false, settlement());
        let _ = body.frame().await;
        let _ = body.finish(false);
        assert_eq!(body.usage, None, "an answer cut short reports nothing");
    }
}
