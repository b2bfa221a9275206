//! One request's charge to its bucket, and what follows from the store's
//! answer, the same for the proxy and Envoy's rate limit service: the
//! tier's counters, the offenders board, escalation of a sent rejection,
//! and the local fallback when a shared store fails.

use std::{
    hash::{BuildHasher as _, Hash as _, Hasher as _},
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
};

use http::{Response, StatusCode};

use super::{Body, Proxy, State, respond::error, state::TierState};
use crate::{
    config::OnError,
    identity::Identity,
    limit::{Ask, BucketKey, Decision, Spend, Store, StoreError},
};

/// One request's charge to a bucket.
#[derive(Clone, Copy)]
pub(super) struct Charge<'a> {
    pub(super) identity: &'a Identity,
    pub(super) limit: u32,
    /// Units the request is worth (the tier's `cost` for an HTTP request).
    pub(super) hits: u32,
    /// How units that do not fit are counted.
    pub(super) spend: Spend,
    /// The source address to escalate, and as whom, when the rejection is sent.
    pub(super) source: Option<(IpAddr, &'a Identity)>,
}

/// How a charge came out.
pub(super) enum Charged {
    /// Admitted, or rejected (sent, or in a dry run: see the tier's mode),
    /// and by the store that will settle it.
    Decided(Decision, Arc<dyn Store>),
    /// A new bucket, and the store full of live windows.
    Full,
    /// The shared store failed and `on_error = "deny"`.
    Unavailable,
}

impl Proxy {
    /// Charges a request to its bucket in `tier` and does what follows from
    /// the answer, the same for the proxy and Envoy's rate limit service:
    /// the tier's counters, the offenders board and, for a rejection that is
    /// sent, escalation of the source. A shared store that fails decides in
    /// the local fallback when `on_error = "allow"`.
    pub(super) async fn charge(
        &self,
        state: &State,
        tier: &TierState,
        charge: Charge<'_>,
        now_ms: u64,
    ) -> Charged {
        let ask = Ask {
            key: self.bucket(charge.identity, tier.hash),
            tier: &tier.id,
            identity: charge.identity,
            limit: charge.limit,
            hits: charge.hits,
            window_ms: tier.window_ms,
            spend: charge.spend,
            algorithm: tier.algorithm_for(charge.limit),
        };
        let (decision, decider) = match self.decide(state, ask, now_ms).await {
            Ok(decided) => decided,
            Err(failed) => {
                match failed {
                    Charged::Full => self.note_full(tier),
                    _ => {
                        tier.store_error.inc();
                    }
                }
                return failed;
            }
        };
        if decision.allowed {
            tier.allowed.inc();
        } else if tier.observe {
            // Dry run: counted, told in the headers, served, never escalated.
            tier.would_reject.inc();
            self.offenders
                .note(&tier.route, charge.identity, &decision, now_ms);
        } else {
            tier.rejected.inc();
            self.offenders
                .note(&tier.route, charge.identity, &decision, now_ms);
            if let (Some(sink), Some((addr, as_identity))) = (&self.rejections, charge.source) {
                sink.rejected(addr, as_identity, &decision, tier.window_ms, &tier.route);
            }
        }
        Charged::Decided(decision, decider)
    }

    /// Asks the store, or the local fallback when the shared store fails
    /// and `on_error = "allow"`; the decision and the store that made it.
    /// `Err` is [`Charged::Full`] or [`Charged::Unavailable`].
    pub(super) async fn decide(
        &self,
        state: &State,
        ask: Ask<'_>,
        now_ms: u64,
    ) -> Result<(Decision, Arc<dyn Store>), Charged> {
        match self.store.decide(ask, now_ms).await {
            Ok(decision) => Ok((decision, self.store.clone())),
            Err(StoreError::Full) => Err(Charged::Full),
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::debug!(error = %e, "store failed");
                match &self.fallback {
                    Some(fallback) if state.config.live.on_error == OnError::Allow => fallback
                        .decide_ask(&ask, now_ms)
                        .map(|decision| (decision, fallback.clone() as Arc<dyn Store>))
                        .map_err(|_| Charged::Full),
                    _ => Err(Charged::Unavailable),
                }
            }
        }
    }

    /// Counts a new client refused by a full store, and says so in the log
    /// at most every 10 s.
    fn note_full(&self, tier: &TierState) {
        self.metrics.refuse("store_full");
        tier.store_error.inc();
        let now = self.clock.now_ms();
        let last = self.full_logged.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self
                .full_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                max_buckets = self.state().config.startup.max_buckets,
                "bucket store full of live windows: new clients refused (raise [store] max_buckets)"
            );
        }
    }

    pub(super) fn bucket(&self, identity: &Identity, tier_hash: u64) -> BucketKey {
        let mut h = self.hasher.build_hasher();
        identity.hash(&mut h);
        tier_hash.hash(&mut h);
        BucketKey(h.finish())
    }
}

/// 503 for a new client when every bucket slot holds a live window: the
/// store never forgets a window that has counted requests to make room.
pub(super) fn store_full() -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "STORE_FULL",
        "The rate limiter is at capacity; try again later.",
    )
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        sync::{Arc, Mutex},
    };

    use super::*;
    use crate::{
        config::Config,
        limit::{FakeClock, LeaseAsk, LeaseFuture, Settle, StoreFuture},
        metrics::Metrics,
        proxy::RejectionSink,
    };

    const TIER: &str = "[server]\nlisten = \"127.0.0.1:8080\"\n[[tier]]\nroute = \"/api/chat\"\nlimit = 2\nwindow = \"1m\"\n";
    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    /// A shared store that fails every call with the error `.0` makes.
    struct Failing(fn() -> StoreError);

    impl Store for Failing {
        fn decide<'a>(&'a self, _ask: Ask<'a>, _now_ms: u64) -> StoreFuture<'a> {
            Box::pin(std::future::ready(Err((self.0)())))
        }

        fn settle<'a>(&'a self, _settle: Settle<'a>, _now_ms: u64) -> StoreFuture<'a> {
            Box::pin(std::future::ready(Err((self.0)())))
        }

        fn acquire<'a>(&'a self, _ask: LeaseAsk<'a>) -> LeaseFuture<'a> {
            Box::pin(std::future::ready(Err((self.0)())))
        }
    }

    /// The sources escalation was told about.
    #[derive(Default)]
    struct Sink(Mutex<Vec<IpAddr>>);

    impl RejectionSink for Sink {
        fn rejected(&self, peer: IpAddr, _: &Identity, _: &Decision, _: u64, _: &str) {
            self.0.lock().unwrap().push(peer);
        }
    }

    fn built(extra: &str, store: Option<Arc<dyn Store>>) -> (Proxy, Arc<Sink>) {
        let config = Config::parse(&format!("{TIER}{extra}")).unwrap();
        let sink = Arc::new(Sink::default());
        let proxy = Proxy::new(config, Arc::new(FakeClock::new(0)), store, Metrics::new())
            .unwrap()
            .with_rejection_sink(sink.clone());
        (proxy, sink)
    }

    /// Charges one request of `identity` to the first tier; escalation is
    /// told `PEER` when `escalate`.
    async fn charge(proxy: &Proxy, identity: &Identity, escalate: bool) -> Charged {
        let state = proxy.state();
        let tier = &state.tiers[0];
        let charge = Charge {
            identity,
            limit: tier.limit,
            hits: 1,
            spend: Spend::Admit,
            source: escalate.then_some((PEER, identity)),
        };
        proxy.charge(&state, tier, charge, 1_000).await
    }

    fn decided(charged: &Charged) -> Option<bool> {
        match charged {
            Charged::Decided(decision, _) => Some(decision.allowed),
            Charged::Full | Charged::Unavailable => None,
        }
    }

    fn client() -> Identity {
        Identity::Ip(PEER)
    }

    #[tokio::test]
    async fn a_sent_rejection_is_counted_boarded_and_escalated() {
        let (proxy, sink) = built("", None);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(decided(&charge(&proxy, &client(), true).await));
        }
        assert_eq!(seen, [Some(true), Some(true), Some(false)]);
        // Without a source to escalate (a keyed RLS call, say): counted only.
        assert_eq!(
            decided(&charge(&proxy, &client(), false).await),
            Some(false)
        );
        let state = proxy.state();
        let tier = &state.tiers[0];
        assert_eq!((tier.allowed.get(), tier.rejected.get()), (2, 2));
        assert_eq!(tier.would_reject.get(), 0);
        assert_eq!(*sink.0.lock().unwrap(), [PEER], "escalated once");
        let board = proxy.offenders().top(1_000);
        assert_eq!(board.len(), 1);
        assert_eq!(board[0]["rejected"], 2);
    }

    #[tokio::test]
    async fn a_dry_run_rejection_is_counted_and_boarded_but_never_escalated() {
        let (proxy, sink) = built("mode = \"observe\"\n", None);
        for _ in 0..3 {
            charge(&proxy, &client(), true).await;
        }
        let state = proxy.state();
        let tier = &state.tiers[0];
        assert_eq!((tier.allowed.get(), tier.rejected.get()), (2, 0));
        assert_eq!(tier.would_reject.get(), 1);
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(proxy.offenders().top(1_000).len(), 1);
    }

    #[tokio::test]
    async fn a_failing_shared_store_falls_back_to_exact_local_windows_when_allowed() {
        let failing = || StoreError::Backend("down".into());
        let (proxy, sink) = built(
            "[store]\non_error = \"allow\"\n",
            Some(Arc::new(Failing(failing))),
        );
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(decided(&charge(&proxy, &client(), true).await));
        }
        assert_eq!(
            seen,
            [Some(true), Some(true), Some(false)],
            "the tier's limit, locally"
        );
        assert_eq!(proxy.metrics().store_errors.get(), 3);
        assert_eq!(
            *sink.0.lock().unwrap(),
            [PEER],
            "a fallback rejection escalates too"
        );
    }

    #[tokio::test]
    async fn a_failing_shared_store_refuses_when_denied_and_a_full_one_says_so() {
        let (proxy, sink) = built(
            "[store]\non_error = \"deny\"\n",
            Some(Arc::new(Failing(|| StoreError::Timeout))),
        );
        assert!(matches!(
            charge(&proxy, &client(), true).await,
            Charged::Unavailable
        ));
        let state = proxy.state();
        assert_eq!(state.tiers[0].store_error.get(), 1);
        assert_eq!(state.tiers[0].allowed.get(), 0);

        let (full, _) = built("", Some(Arc::new(Failing(|| StoreError::Full))));
        assert!(matches!(
            charge(&full, &client(), true).await,
            Charged::Full
        ));
        assert_eq!(full.state().tiers[0].store_error.get(), 1);
        assert_eq!(
            full.metrics().store_errors.get(),
            0,
            "full is not a failure"
        );
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
