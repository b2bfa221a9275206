//! A request on a tier, in order: its client's in-flight slot on the tier
//! (`max_in_flight`), its body read for what it may cost (a token budget),
//! its charge, its token reservation, the agent's own caps, the upstream,
//! the cost the upstream reports (`cost_header`), and the headers that tell
//! the client where it stands. Each refusal gives back what was taken
//! before it: a rejected request consumes nothing.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use super::{
    Body, Charge, Charged, Outgoing, Peer, Proxy, Slots, State, TierState,
    charge::store_full,
    forward::{NotSent, client_body_answer},
    in_flight::TierLease,
    keys::KeyCheck,
    respond::{error, json_response, too_many, unavailable},
    state::TokenState,
    tokens::{self, Metered, Settlement},
};
use crate::{
    answers,
    body::{ClientBody, client_fault},
    config::OnError,
    fields::Fields,
    identity::{Identity, Requester},
    limit::{Algorithm, Ask, Decision, LeaseAsk, Settle, Spend, Store},
};

/// A token reservation held for a forwarded request.
pub(super) struct Held {
    decision: Decision,
    settlement: Settlement,
    /// The client did not ask for usage in its stream.
    strip: bool,
}

/// How a token reservation came out.
enum Reservation {
    /// Boxed: it lives across the upstream's answer in the request's future.
    Held(Box<Held>),
    /// Over the budget on a tier in a dry run: forwarded, nothing held.
    DryRun,
    Refused(Response<Body>),
}

/// What a request's body says it may cost.
struct Planned {
    tokens: u32,
    strip: bool,
}

/// A request its tier admitted, and what it holds until it is answered.
pub(super) struct Admitted {
    identity: Identity,
    check: KeyCheck,
    limit: u32,
    decision: Decision,
    /// The store that decided, which settles what the answer reports.
    decider: Arc<dyn Store>,
    pub(super) slots: Slots,
}

/// A request limit's standing as its answer leaves: the `X-RateLimit-*`
/// fields (and the IETF ones) to add to the answer's head.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    decision: Decision,
    now: crate::limit::Now,
}

impl Stamp {
    /// Sets the fields in `headers` (replacing the upstream's own).
    pub(super) fn apply(&self, headers: &mut HeaderMap, tier: &TierState) {
        answers::apply(
            headers,
            &self.decision,
            tier.window_ms,
            self.now,
            tier.policy.as_ref(),
        );
    }

    /// The wall clock it was stamped with, Unix ms.
    pub(super) fn unix_ms(&self) -> u64 {
        self.now.unix_ms
    }

    /// Writes the fields as head lines into `out`.
    pub(super) fn write(&self, out: &mut Vec<u8>, tier: &TierState) {
        answers::limits(
            &mut answers::Head(out),
            &self.decision,
            tier.window_ms,
            self.now,
            tier.policy.as_ref(),
        );
    }
}

/// A request its tier did not admit.
pub(super) enum Gated {
    /// Over the tier's limit: the 429, made by whoever writes the answer;
    /// and the monotonic time it was decided at (when the store answered).
    TooMany(Decision, u64),
    /// Any other refusal, whole.
    Answer(Box<Response<Body>>),
}

impl Proxy {
    /// Serves a request on the tier `tier_index` from `client`.
    pub(super) async fn limited(
        &self,
        state: &State,
        req: Request<Incoming>,
        peer: &Peer,
        tier_index: usize,
        client: Requester,
    ) -> (Response<Body>, Option<Slots>) {
        let tier = &state.tiers[tier_index];
        let mut outgoing = Outgoing::Streamed(req);
        if let Some(name) = &tier.cost_header {
            // Only the upstream says what a request cost.
            outgoing.headers_mut().remove(name);
        }
        // A request with a body on a tier with a token budget is metered;
        // one without (a `GET`) has nothing to generate.
        let metered = tier.tokens.is_some() && outgoing.has_body();
        let preflight = outgoing.method() == http::Method::OPTIONS;
        let admitted = match self
            .gate(state, tier_index, client, preflight, metered)
            .await
        {
            Ok(admitted) => admitted,
            Err(Gated::TooMany(decision, decided_ms)) => {
                let now = crate::limit::Now {
                    mono_ms: decided_ms,
                    unix_ms: self.clock.unix_ms(),
                };
                return (
                    too_many(&decision, tier.window_ms, now, tier.policy.as_ref()),
                    None,
                );
            }
            Err(Gated::Answer(refused)) => return (*refused, None),
        };
        let (outgoing, reserved, _buffered) = match (&tier.tokens, metered) {
            (Some(tokens), true) => {
                let read = match Box::pin(self.read_plan(outgoing, tokens, state)).await {
                    Ok(read) => read,
                    Err(refused) => {
                        self.give_back(tier, &admitted);
                        return (*refused, None);
                    }
                };
                let (outgoing, planned, buffered) = read;
                let reserving = self.reserve(
                    state,
                    tier,
                    tokens,
                    &admitted.identity,
                    &planned,
                    &admitted.decision,
                    self.clock.now_ms(),
                );
                match Box::pin(reserving).await {
                    Reservation::Held(held) => (outgoing, Some(held), Some(buffered)),
                    Reservation::DryRun => (outgoing, None, Some(buffered)),
                    Reservation::Refused(refused) => {
                        self.give_back(tier, &admitted);
                        return (refused, None);
                    }
                }
            }
            _ => (outgoing, None, None),
        };
        let response = self.forward(state, outgoing, peer).await;
        let (response, slots, _) = self
            .finish(state, tier, admitted, reserved, response, true)
            .await;
        (response, slots)
    }

    /// A request's way through its tier up to the upstream, whoever parsed
    /// it: its in-flight slot on the tier, its charge (a reservation when
    /// the answer or its body settles the cost: `metered`), and the agent's
    /// own caps. Refused, it holds nothing.
    pub(super) async fn gate(
        &self,
        state: &State,
        tier_index: usize,
        client: Requester,
        preflight: bool,
        metered: bool,
    ) -> Result<Admitted, Gated> {
        let started = Instant::now();
        let tier = &state.tiers[tier_index];
        let source = client.ip;
        let now_ms = self.clock.now_ms_at(started);
        let (identity, check) = self.identify(state, client, tier, preflight, now_ms).await;
        let limit = state.effective_limit(&self.runtime.load(), &identity, tier_index);
        // What only some tiers do is boxed, and only built where it is
        // done: the futures of the common path stay small, since each is
        // moved whole as it is awaited.
        let lease = if tier.max_in_flight.is_some() {
            Box::pin(self.lease(state, tier, &identity, limit, now_ms))
                .await
                .map_err(Gated::Answer)?
        } else {
            None
        };
        let charge = Charge {
            identity: &identity,
            limit,
            hits: tier.cost,
            spend: if tier.cost_header.is_some() || metered {
                Spend::Reserve
            } else {
                Spend::Admit
            },
            source: Some((source, &identity)),
        };
        let charged = self.charge(state, tier, charge, now_ms).await;
        // When the store answered: the decision's time, which its 429 is
        // stamped with (after a shared store's round trip, not before it).
        let answered_at = Instant::now();
        self.metrics
            .decision_seconds
            .observe(answered_at.saturating_duration_since(started).as_secs_f64());
        let (decision, decider) = match charged {
            Charged::Decided(decision, decider) => (decision, decider),
            Charged::Full => return Err(Gated::Answer(Box::new(store_full()))),
            Charged::Unavailable => return Err(Gated::Answer(Box::new(unavailable()))),
        };
        if !decision.allowed && !tier.observe {
            return Err(Gated::TooMany(decision, self.clock.now_ms_at(answered_at)));
        }
        // Only what goes upstream takes a slot (a 429 holds nothing there),
        // before a body is read whole: the caps bound what bodies held at
        // once take. A request the tier admitted and a cap refuses has spent
        // its unit, as one the upstream itself refused would have.
        let slots = match self.admit(state, source) {
            Ok(slots) => slots.with_tier(lease),
            Err(refused) => return Err(Gated::Answer(refused)),
        };
        Ok(Admitted {
            identity,
            check,
            limit,
            decision,
            decider,
            slots,
        })
    }

    /// The upstream's answer (or the agent's for it) as it goes to the
    /// client: what it teaches about the key, the cost it reports settled,
    /// the request limit's standing as the answer leaves (the
    /// `X-RateLimit-*` fields: set in the response's map with `in_map`,
    /// else returned for whoever writes the head), and a token
    /// reservation's headers and its settlement as its body is read.
    pub(super) async fn finish(
        &self,
        state: &State,
        tier: &TierState,
        admitted: Admitted,
        reserved: Option<Box<Held>>,
        mut response: Response<Body>,
        in_map: bool,
    ) -> (Response<Body>, Option<Slots>, Option<Stamp>) {
        // The cost field is taken out whatever it holds.
        let reported = tier.cost_header.as_ref().and_then(|name| {
            let reported = reported_cost(response.headers(), name);
            response.headers_mut().remove(name);
            reported
        });
        let (slots, stamp) = self
            .finish_relayed(state, tier, admitted, response.status(), reported)
            .await;
        let Stamp { decision, now } = stamp;
        let stamp = if in_map {
            stamp.apply(response.headers_mut(), tier);
            None
        } else {
            Some(stamp)
        };
        let not_sent = response.extensions().get::<NotSent>().is_some();
        match (reserved, &tier.tokens) {
            // The agent answered for an upstream it could not reach with the
            // request (503): nothing was generated.
            (Some(held), _) if not_sent => held.settlement.refund(),
            (Some(held), Some(tokens)) => {
                let budget = answers::TokenState {
                    decision: &held.decision,
                    window_ms: tokens.window_ms,
                    policy: tokens.policy.as_ref(),
                };
                answers::apply_tokens(response.headers_mut(), &decision, budget, now);
                let headers = response.headers();
                let events = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim_start().get(..17))
                    .is_some_and(|v| v.eq_ignore_ascii_case("text/event-stream"));
                let encoded = headers
                    .get_all(header::CONTENT_ENCODING)
                    .iter()
                    .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
                // An answer in a coding the agent did not ask for cannot be
                // read: passed on as it is, the reservation standing.
                if !encoded {
                    if events && held.strip {
                        response.headers_mut().remove(header::CONTENT_LENGTH);
                    }
                    response = response.map(|body| {
                        Metered::new(body, events, held.strip, held.settlement).boxed()
                    });
                }
            }
            _ => {}
        }
        (response, Some(slots), stamp)
    }

    /// What [`Self::finish`] does for any answer (`status`, and the cost its
    /// `cost_header` reported): the lesson about the key, the cost settled,
    /// and the standing, stamped with both clocks read as the answer leaves
    /// (the reset is told as the wall clock now plus the monotonic time
    /// left: the upstream took some of it). All of it for an answer the
    /// front end relays as it came: no token budget rides on one (the
    /// request had no body to reserve by), and the writer leaves the cost
    /// field out and adds the limit fields.
    pub(super) async fn finish_relayed(
        &self,
        state: &State,
        tier: &TierState,
        admitted: Admitted,
        status: StatusCode,
        reported: Option<u32>,
    ) -> (Slots, Stamp) {
        let Admitted {
            identity,
            check,
            limit,
            decision,
            decider,
            slots,
        } = admitted;
        self.learn(state, tier, check, status).await;
        let decision = match reported {
            Some(cost) => {
                let settling = self.settle_cost(tier, &identity, limit, decision, &decider, cost);
                Box::pin(settling).await
            }
            None => decision,
        };
        let now = self.clock.now();
        (slots, Stamp { decision, now })
    }

    /// The client's in-flight slot on `tier` when the tier caps them
    /// (`Ok(None)` when it does not, or in a dry run over the cap), or the
    /// answer that refuses the request: 429 over the cap, 503 without a
    /// store to ask.
    async fn lease(
        &self,
        state: &State,
        tier: &TierState,
        identity: &Identity,
        limit: u32,
        now_ms: u64,
    ) -> Result<Option<TierLease>, Box<Response<Body>>> {
        let Some(max) = tier.max_in_flight else {
            return Ok(None);
        };
        let ask = LeaseAsk {
            key: self.bucket(identity, tier.hash),
            tier: &tier.id,
            identity,
            limit: max,
        };
        let leased = match self.store.acquire(ask).await {
            Ok(leased) => leased,
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::debug!(error = %e, "store failed to lease an in-flight slot");
                match &self.fallback {
                    Some(fallback) if state.config.live.on_error == OnError::Allow => {
                        fallback.lease(ask.key, max)
                    }
                    _ => {
                        tier.store_error.inc();
                        return Err(Box::new(unavailable()));
                    }
                }
            }
        };
        match leased {
            Some(lease) => Ok(Some(TierLease::new(lease, &tier.in_flight))),
            None if tier.observe => {
                tier.would_reject.inc();
                Ok(None)
            }
            None => {
                tier.in_flight_rejected.inc();
                let refusing = self.too_many_in_flight(state, tier, identity, limit, now_ms);
                Err(Box::new(Box::pin(refusing).await))
            }
        }
    }

    /// The 429 of a client over `max_in_flight`: `CONCURRENCY_LIMIT_EXCEEDED`,
    /// `Retry-After: 1`, and the request limit's headers as they stand
    /// (asked without a charge).
    async fn too_many_in_flight(
        &self,
        state: &State,
        tier: &TierState,
        identity: &Identity,
        limit: u32,
        now_ms: u64,
    ) -> Response<Body> {
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            answers::concurrency_limit_body().to_owned(),
        );
        let ask = Ask {
            key: self.bucket(identity, tier.hash),
            tier: &tier.id,
            identity,
            limit,
            hits: 0,
            window_ms: tier.window_ms,
            spend: Spend::Admit,
            algorithm: tier.algorithm_for(limit),
        };
        if let Ok((decision, _)) = self.decide(state, ask, now_ms).await {
            answers::apply(
                response.headers_mut(),
                &decision,
                tier.window_ms,
                self.clock.now(),
                tier.policy.as_ref(),
            );
        }
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1));
        response
    }

    /// Reserves `planned` tokens of the client's budget.
    #[expect(clippy::too_many_arguments, reason = "the request's whole standing")]
    async fn reserve(
        &self,
        state: &State,
        tier: &TierState,
        tokens: &TokenState,
        identity: &Identity,
        planned: &Planned,
        requests: &Decision,
        now_ms: u64,
    ) -> Reservation {
        let limit = tokens.budget.limit.get();
        let ask = Ask {
            key: self.bucket(identity, tokens.hash),
            tier: &tokens.id,
            identity,
            limit,
            hits: planned.tokens,
            window_ms: tokens.window_ms,
            spend: Spend::Reserve,
            algorithm: Algorithm::Fixed,
        };
        let (decision, store) = match self.decide(state, ask, now_ms).await {
            Ok(decided) => decided,
            Err(Charged::Full) => return Reservation::Refused(store_full()),
            Err(_) => return Reservation::Refused(unavailable()),
        };
        if decision.allowed {
            tokens.reserved.inc_by(u64::from(planned.tokens));
            return Reservation::Held(Box::new(Held {
                decision,
                strip: planned.strip,
                settlement: Settlement {
                    store,
                    key: ask.key,
                    tier: tokens.id.as_str().into(),
                    identity: identity.clone(),
                    limit,
                    window_ms: tokens.window_ms,
                    window: decision.window,
                    reserved: planned.tokens,
                    fields: tokens.budget.usage.clone(),
                    counters: [
                        tokens.used.clone(),
                        tokens.refunded.clone(),
                        tokens.charged.clone(),
                    ],
                    clock: self.clock.clone(),
                },
            }));
        }
        if tier.observe {
            tier.would_reject.inc();
            return Reservation::DryRun;
        }
        tokens.rejected.inc();
        Reservation::Refused(self.too_many_tokens(
            tier,
            tokens,
            planned.tokens,
            &decision,
            requests,
        ))
    }

    /// The 429 of a request its budget cannot hold now: the request limit's
    /// headers as they stand once its unit is given back, the budget's, and
    /// `Retry-After` until the budget's window resets.
    fn too_many_tokens(
        &self,
        tier: &TierState,
        tokens: &TokenState,
        requested: u32,
        budget: &Decision,
        requests: &Decision,
    ) -> Response<Body> {
        let now = self.clock.now();
        let retry = answers::retry_after_secs(budget, now);
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            answers::token_limit_body(retry, requested, budget.remaining, budget.limit),
        );
        // The request's units went back (see `give_back`): a fixed window's
        // only.
        let given_back = if tier.algorithm == Algorithm::Fixed {
            tier.cost
        } else {
            0
        };
        let requests = Decision {
            remaining: requests
                .remaining
                .saturating_add(given_back)
                .min(requests.limit),
            ..*requests
        };
        answers::apply(
            response.headers_mut(),
            &requests,
            tier.window_ms,
            now,
            tier.policy.as_ref(),
        );
        let state = answers::TokenState {
            decision: budget,
            window_ms: tokens.window_ms,
            policy: tokens.policy.as_ref(),
        };
        answers::apply_tokens(response.headers_mut(), &requests, state, now);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry));
        response
    }

    /// Gives back the units an admitted request was charged, off the answer's
    /// path, to the window that took them. Only a fixed window has one: on
    /// a sliding or GCRA tier the units stay spent (their buckets hold
    /// other state, which a settlement would not read).
    fn give_back(&self, tier: &TierState, admitted: &Admitted) {
        let Admitted {
            identity,
            limit,
            decision,
            decider: store,
            ..
        } = admitted;
        let limit = *limit;
        if !decision.allowed || tier.algorithm != Algorithm::Fixed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, clock) = (store.clone(), self.clock.clone());
        let (key, tier_id, identity) = (
            self.bucket(identity, tier.hash),
            tier.id.clone(),
            identity.clone(),
        );
        let (window_ms, window, delta) = (tier.window_ms, decision.window, -i64::from(tier.cost));
        runtime.spawn(async move {
            let settle = Settle {
                key,
                tier: &tier_id,
                identity: &identity,
                limit,
                window_ms,
                window,
                delta,
            };
            if let Err(e) = store.settle(settle, clock.now_ms()).await {
                tracing::debug!(error = %e, "giving back a request's units failed");
            }
        });
    }

    /// Charges or refunds what the upstream says the request cost (`cost`,
    /// from the answer's `cost_header`) beyond or below the tier's `cost`;
    /// the request limit's state after.
    async fn settle_cost(
        &self,
        tier: &TierState,
        identity: &Identity,
        limit: u32,
        decision: Decision,
        store: &Arc<dyn Store>,
        cost: u32,
    ) -> Decision {
        let delta = i64::from(cost) - i64::from(tier.cost);
        // A dry run's rejection charged nothing to correct.
        if delta == 0 || !decision.allowed {
            return decision;
        }
        let settle = Settle {
            key: self.bucket(identity, tier.hash),
            tier: &tier.id,
            identity,
            limit,
            window_ms: tier.window_ms,
            window: decision.window,
            delta,
        };
        match store.settle(settle, self.clock.now_ms()).await {
            Ok(after) => Decision {
                allowed: true,
                rejected: decision.rejected,
                ..after
            },
            Err(e) => {
                tracing::debug!(error = %e, "charging a reported cost failed");
                decision
            }
        }
    }
}

/// The cost an answer reports in its field `name`: digits, nothing else.
pub(super) fn reported_cost(fields: &impl Fields, name: &HeaderName) -> Option<u32> {
    fields
        .values(name)
        .next()
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u32>().ok())
}

/// Bytes of request bodies the agent holds at once to read their cost, in
/// all; beyond it, 503.
pub(super) const MAX_BUFFERED_BYTES: usize = 256 * 1024 * 1024;

impl Proxy {
    /// Reads the body of a request on a tier with a token budget: the
    /// request to forward with it, what it may cost, and its share of
    /// [`MAX_BUFFERED_BYTES`] (held until the request is forwarded).
    /// Refused: 413 over `max_request_bytes`, 503 with every buffer byte
    /// held, 408 or 400 for a body that stalls or breaks, 400 for one the
    /// agent cannot read a cost from.
    async fn read_plan(
        &self,
        outgoing: Outgoing,
        tokens: &TokenState,
        state: &State,
    ) -> Result<(Outgoing, Planned, OwnedSemaphorePermit), Box<Response<Body>>> {
        let Outgoing::Streamed(req) = outgoing else {
            unreachable!("a request's body is read once");
        };
        let max = tokens.budget.max_request_bytes;
        let too_large = || {
            Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "REQUEST_TOO_LARGE",
                "The request body is larger than this endpoint reads.",
            ))
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        // What the body may take: its declared length, else the most.
        let room = declared.map_or(max, |n| usize::try_from(n).unwrap_or(max));
        let kib = u32::try_from(room.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let Ok(buffered) = self.buffered.clone().try_acquire_many_owned(kib) else {
            self.metrics.refuse("buffered_bytes");
            return Err(Box::new(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "OVERLOADED",
                "Too many request bodies are being read; try again later.",
            )));
        };
        let live = &state.config.live;
        let (mut parts, body) = req.into_parts();
        let body = ClientBody::new(body, live.body_read_timeout, live.body_min_rate);
        let body: Bytes = match Limited::new(body, room).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return Err(match client_fault(&*e) {
                    Some(fault) => Box::new(client_body_answer(fault)),
                    None => too_large(),
                });
            }
        };
        // The answer is read for its usage on the way: asked for as it is,
        // not compressed.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let plan = tokens::plan(&body, &tokens.budget).map_err(|e| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &e.to_string(),
            ))
        })?;
        Ok((
            Outgoing::Whole(parts, plan.body),
            Planned {
                tokens: plan.tokens,
                strip: plan.strip,
            },
            buffered,
        ))
    }
}
