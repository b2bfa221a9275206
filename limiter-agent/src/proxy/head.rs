//! Requests the HTTP/1 front end read itself: a head without a body, its
//! fields borrowed from the connection's read buffer. They take the same
//! way as hyper's requests (`route`, the tier's `gate` and `finish`), and
//! go upstream on a head written from the fields as they came: no
//! `Request`, `Uri` or `HeaderMap` on the way in.

use std::sync::Arc;

use super::{
    Body, Peer, Proxy, Routed, Slots, State,
    forward::{Forwarded, Relayed},
    limited::{Gated, Stamp, reported_cost},
    too_many,
};
use crate::{
    answers,
    fields::Raw,
    limit::{Decision, Now},
    timer::Timer,
};

/// A request head the front end parsed, with no body to come.
pub struct Head<'h, 'b> {
    pub method: &'b str,
    /// Origin form: `/path?query`.
    pub target: &'b str,
    pub fields: Raw<'h, 'b>,
    /// The client sent `Content-Length: 0` (forwarded as such; any other
    /// length is not a request without a body).
    pub empty_length: bool,
}

/// How the request path answered a [`Head`].
pub enum Served {
    /// The answer, and the in-flight slots a forwarded request holds until
    /// it is sent.
    Answer(http::Response<Body>, Option<Slots>),
    /// An answer the agent made for a request on a tier (the upstream
    /// failed), the slots it holds, and the tier's standing for the writer
    /// to add to the head.
    Stamped(http::Response<Body>, Option<Slots>, Standing),
    /// The upstream's answer, to relay as it came, the slots it holds, and
    /// its tier's standing (none off every tier).
    Relayed(Relayed, Slots, Option<Standing>),
    /// Over the tier's limit: the 429, for the front end to write itself.
    TooMany(TooMany),
}

/// A tier's standing as an answer leaves: its `X-RateLimit-*` fields.
pub struct Standing {
    state: Arc<State>,
    tier: usize,
    stamp: Stamp,
}

impl Standing {
    /// Whether the field `name` (in any case) is one [`Self::write`] writes:
    /// an upstream's own of that name is left out.
    #[must_use]
    pub fn writes(&self, name: &[u8]) -> bool {
        let ietf = self.state.tiers[self.tier].policy.is_some();
        let is = |field: &str| name.eq_ignore_ascii_case(field.as_bytes());
        is("x-ratelimit-limit")
            || is("x-ratelimit-remaining")
            || is("x-ratelimit-reset")
            || (ietf && (is("ratelimit-policy") || is("ratelimit")))
    }

    /// Writes the fields as head lines into `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        self.stamp.write(out, &self.state.tiers[self.tier]);
    }

    /// The wall clock the standing was stamped with, in Unix seconds (the
    /// answer's `Date` shares it).
    #[must_use]
    pub fn unix_secs(&self) -> u64 {
        self.stamp.unix_ms() / 1000
    }
}

/// A request its tier rejected.
pub struct TooMany {
    state: Arc<State>,
    tier: usize,
    decision: Decision,
    /// The monotonic time it was decided at (microseconds before its answer
    /// is written: the answer is stamped with it, not with another read).
    decided_ms: u64,
}

impl TooMany {
    /// Both clocks for the answer: the decision's monotonic time, and the
    /// wall clock read now (which the `Date` field can share).
    #[must_use]
    pub fn now(&self, proxy: &Proxy) -> Now {
        Now {
            mono_ms: self.decided_ms,
            unix_ms: proxy.clock.unix_ms(),
        }
    }

    /// The 429's fields after its status line, and its body, stamped `now`.
    pub fn write(&self, out: &mut Vec<u8>, now: Now) {
        let tier = &self.state.tiers[self.tier];
        answers::write_too_many(
            out,
            &self.decision,
            tier.window_ms,
            now,
            tier.policy.as_ref(),
        );
    }

    /// The same answer as a response (for an HTTP/1.0 client, or a test).
    #[must_use]
    pub fn response(&self, proxy: &Proxy) -> http::Response<Body> {
        let tier = &self.state.tiers[self.tier];
        too_many(
            &self.decision,
            tier.window_ms,
            self.now(proxy),
            tier.policy.as_ref(),
        )
    }
}

impl Proxy {
    /// Serves a request without a body that the HTTP/1 front end read;
    /// `upstream` times its wait for the upstream (the connection's timer
    /// for its requests' upstream deadlines).
    pub async fn serve_head(
        &self,
        head: &Head<'_, '_>,
        peer: &Peer,
        upstream: &mut Timer,
    ) -> Served {
        let state = self.state.load_full();
        let (tier_index, admitted) = match self.route(&state, &head.fields, head.target, peer) {
            Routed::Refused(refused) => return Served::Answer(*refused, None),
            Routed::Unlimited(slots) => {
                let forwarded =
                    Box::pin(self.forward_head(&state, head, peer, None, upstream)).await;
                return match forwarded {
                    Forwarded::Relayed(relayed) => Served::Relayed(relayed, slots, None),
                    Forwarded::Made(answer) => Served::Answer(answer, Some(slots)),
                };
            }
            Routed::Limited(tier_index, client) => {
                let preflight = head.method == "OPTIONS";
                match self
                    .gate(&state, tier_index, client, preflight, false)
                    .await
                {
                    Ok(admitted) => (tier_index, admitted),
                    Err(Gated::TooMany(decision, decided_ms)) => {
                        return Served::TooMany(TooMany {
                            state,
                            tier: tier_index,
                            decision,
                            decided_ms,
                        });
                    }
                    Err(Gated::Answer(refused)) => return Served::Answer(*refused, None),
                }
            }
        };
        let tier = &state.tiers[tier_index];
        let forwarded = self
            .forward_head(&state, head, peer, tier.cost_header.as_ref(), upstream)
            .await;
        let response = match forwarded {
            Forwarded::Relayed(relayed) => {
                let reported = tier
                    .cost_header
                    .as_ref()
                    .and_then(|name| reported_cost(&relayed.head, name));
                let status = relayed.head.status();
                let (slots, stamp) = self
                    .finish_relayed(&state, tier, admitted, status, reported)
                    .await;
                let standing = Standing {
                    state,
                    tier: tier_index,
                    stamp,
                };
                return Served::Relayed(relayed, slots, Some(standing));
            }
            Forwarded::Made(response) => response,
        };
        let (response, slots, stamp) = self
            .finish(&state, tier, admitted, None, response, false)
            .await;
        match stamp {
            Some(stamp) => Served::Stamped(
                response,
                slots,
                Standing {
                    state,
                    tier: tier_index,
                    stamp,
                },
            ),
            None => Served::Answer(response, slots),
        }
    }
}
