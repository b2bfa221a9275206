//! Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService`):
//! Envoy, Istio and Envoy Gateway ask the agent over gRPC, and get the proxy's
//! decisions: the same store, tiers, identities, counters and escalation to
//! a kernel ban (descriptor mapping in [`crate::proxy::Answer`]'s module).
//!
//! Served on its own listener (`[rls] listen`, TLS optional) by hyper's HTTP/2
//! server with tonic's gRPC framing and the `envoy-types` messages (the call
//! read leniently, see [`Call`]); only `[rls] clients` may call, since a
//! caller names the addresses counted and banned.
//!
//! Answers, as the reference server (envoyproxy/ratelimit) gives them:
//! - `OK` or `OVER_LIMIT` overall, a status per descriptor with
//!   `current_limit`, `limit_remaining` and `duration_until_reset`; the
//!   proxy's `X-RateLimit-*` headers (and `Retry-After` when over) in
//!   `response_headers_to_add`, from the descriptor with the least left; the
//!   proxy's exact 429 body in `raw_body`.
//! - No descriptors or no domain: `INVALID_ARGUMENT`. A failed shared store
//!   with `on_error = "deny"`: `UNAVAILABLE`, so Envoy's `failure_mode_deny`
//!   decides.
//! - A descriptor the proxy would refuse (a path spelling it answers 400, an
//!   ambiguous identity) or a new client in a full store: `OVER_LIMIT` with
//!   the proxy's error body, never a pass.

use std::{net::SocketAddr, sync::Arc};

use envoy_types::pb::{
    envoy::{
        config::core::v3::HeaderValue as EnvoyHeader,
        service::ratelimit::v3::{
            RateLimitResponse,
            rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit},
        },
    },
    google::protobuf::{Duration as PbDuration, UInt64Value},
};
use http::{HeaderMap, HeaderValue, header};

mod listener;

pub use self::listener::serve;
use crate::{
    answers,
    proxy::{Answer, Proxy, State, Verdict},
};

/// `RateLimitRequest` as the service reads it: the same wire format as
/// `envoy.service.ratelimit.v3.RateLimitRequest`, but entries as bytes. Envoy
/// copies header values (bytes ≥ 0x80 included) into the proto's strings; a
/// strict decoder would fail the whole call, and Envoy would then let the
/// request through unless `failure_mode_deny` is set. Read as bytes, such an
/// entry is refused like the proxy refuses the header.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Call {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<CallDescriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`, entries as
/// bytes; its `limit` override (tag 2) is not read: limits come from the
/// agent's config.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CallDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<CallEntry>,
    #[prost(message, optional, tag = "3")]
    pub hits_addend: Option<UInt64Value>,
    #[prost(bool, tag = "4")]
    pub is_negative_hits: bool,
}

/// One descriptor entry, as bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CallEntry {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// The service: a handle on the proxy whose decisions it shares.
#[derive(Clone)]
pub struct RateLimitServer {
    proxy: Arc<Proxy>,
}

impl RateLimitServer {
    #[must_use]
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }

    /// Decides a whole call (see the module doc for the answers).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a call without domain or descriptors, or with
    /// negative hits; `UNAVAILABLE` when the shared store failed and
    /// `on_error = "deny"`.
    pub async fn decide(&self, call: &Call) -> Result<RateLimitResponse, tonic::Status> {
        self.decide_in(&self.proxy.state(), call).await
    }

    /// [`RateLimitServer::decide`] under the config `state`: one config for
    /// the whole call, its authentication included.
    async fn decide_in(
        &self,
        state: &State,
        call: &Call,
    ) -> Result<RateLimitResponse, tonic::Status> {
        if call.domain.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "rate limit domain must not be empty",
            ));
        }
        if call.descriptors.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "rate limit descriptor list must not be empty",
            ));
        }
        if call.descriptors.iter().any(|d| d.is_negative_hits) {
            // Refunds would let a caller hand quota back: not served.
            return Err(tonic::Status::invalid_argument(
                "negative hits are not supported",
            ));
        }
        let mut statuses = Vec::with_capacity(call.descriptors.len());
        let mut verdicts: Vec<Verdict> = Vec::new();
        let mut refusal: Option<String> = None;
        for descriptor in &call.descriptors {
            // The call's hits_addend: 0 is unset, so 1. A descriptor's own
            // is set when present, and 0 there is a check that counts nothing.
            let hits = descriptor
                .hits_addend
                .map_or(u64::from(call.hits_addend.max(1)), |h| h.value);
            let hits = u32::try_from(hits).unwrap_or(u32::MAX);
            let entries: Option<Vec<(&str, &str)>> = descriptor
                .entries
                .iter()
                .map(|e| {
                    Some((
                        std::str::from_utf8(&e.key).ok()?,
                        std::str::from_utf8(&e.value).ok()?,
                    ))
                })
                .collect();
            let answer = match entries {
                Some(entries) => {
                    self.proxy
                        .decide_descriptor(state, &call.domain, &entries, hits)
                        .await
                }
                None => self
                    .proxy
                    .refuse_descriptor("a descriptor entry is not UTF-8"),
            };
            statuses.push(match answer {
                Answer::NoLimit => DescriptorStatus {
                    code: Code::Ok.into(),
                    ..DescriptorStatus::default()
                },
                Answer::Decided(verdict) => {
                    let status = self.status(&verdict);
                    verdicts.push(verdict);
                    status
                }
                Answer::Refused { code, message } => {
                    refusal.get_or_insert_with(|| answers::error_body(code, &message));
                    DescriptorStatus {
                        code: Code::OverLimit.into(),
                        ..DescriptorStatus::default()
                    }
                }
                Answer::Unavailable => {
                    return Err(tonic::Status::unavailable(
                        "the rate-limit store is unavailable",
                    ));
                }
            });
        }
        let over = statuses
            .iter()
            .any(|s| s.code == i32::from(Code::OverLimit));
        // The headers of the descriptor that binds: an enforced rejection
        // first, then the least left.
        let binding = verdicts
            .iter()
            .min_by_key(|v| (!v.over_limit(), v.decision.remaining));
        let (headers, raw_body) = self.headers(binding, over, refusal);
        Ok(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok }.into(),
            statuses,
            response_headers_to_add: headers
                .iter()
                .map(|(name, value)| EnvoyHeader {
                    key: name.as_str().to_owned(),
                    value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    raw_value: Vec::new(),
                })
                .collect(),
            raw_body,
            ..RateLimitResponse::default()
        })
    }

    /// Whether `peer` is one of `[rls] clients` in the config in force;
    /// counts the refusal when not.
    fn admits(&self, peer: SocketAddr) -> bool {
        let admitted = self
            .proxy
            .state()
            .config
            .live
            .rls
            .clients
            .contains(peer.ip().to_canonical());
        if !admitted {
            self.proxy.metrics().rls_call("permission_denied");
        }
        admitted
    }

    /// Whether the call carries `[rls] secret_file`'s secret in its
    /// `x-limiter-rls-secret` metadata (always, when none is configured);
    /// counts the refusal when not.
    fn authenticated(&self, state: &State, metadata: &tonic::metadata::MetadataMap) -> bool {
        let Some(secret) = &state.config.live.rls.secret else {
            return true;
        };
        let offered = metadata.get_all(SECRET_METADATA).iter().collect::<Vec<_>>();
        let ok = matches!(offered.as_slice(), [one] if secret.matches(one.as_bytes()));
        if !ok {
            self.proxy.metrics().rls_call("permission_denied");
        }
        ok
    }

    /// The headers and body Envoy sends the client: those of the binding
    /// descriptor, the proxy's 429 body when it is over, else the refusal's.
    fn headers(
        &self,
        binding: Option<&Verdict>,
        over: bool,
        refusal: Option<String>,
    ) -> (HeaderMap, Vec<u8>) {
        let now = self.proxy.clock_now();
        let mut headers = HeaderMap::new();
        let mut raw_body = Vec::new();
        if let Some(v) = binding {
            answers::apply(
                &mut headers,
                &v.decision,
                v.window_ms,
                now,
                v.policy.as_ref(),
            );
            if v.over_limit() {
                let retry = answers::retry_after_secs(&v.decision, now);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry));
                raw_body = answers::too_many_requests_body(retry).into_bytes();
            }
        }
        if over {
            if raw_body.is_empty() {
                raw_body = refusal.unwrap_or_default().into_bytes();
            }
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        (headers, raw_body)
    }

    fn status(&self, verdict: &Verdict) -> DescriptorStatus {
        let until_reset_ms = verdict
            .decision
            .reset_ms
            .saturating_sub(self.proxy.now_ms());
        DescriptorStatus {
            code: if verdict.over_limit() {
                Code::OverLimit
            } else {
                Code::Ok
            }
            .into(),
            current_limit: Some(RateLimit {
                name: verdict.name.clone(),
                requests_per_unit: verdict.decision.limit,
                unit: unit(verdict.window_ms).into(),
            }),
            limit_remaining: verdict.decision.remaining,
            duration_until_reset: Some(PbDuration {
                seconds: i64::try_from(until_reset_ms / 1000).unwrap_or(i64::MAX),
                nanos: i32::try_from(until_reset_ms % 1000 * 1_000_000).unwrap_or(0),
            }),
            quota: None,
        }
    }
}

/// The API's unit for a window that is exactly one; `UNKNOWN` for the
/// others (10 s), whose length `duration_until_reset` and the headers tell.
fn unit(window_ms: u64) -> Unit {
    match window_ms {
        1_000 => Unit::Second,
        60_000 => Unit::Minute,
        3_600_000 => Unit::Hour,
        86_400_000 => Unit::Day,
        604_800_000 => Unit::Week,
        _ => Unit::Unknown,
    }
}

/// The call metadata that carries `[rls] secret_file`'s secret (Envoy's
/// `grpc_service.initial_metadata`).
pub const SECRET_METADATA: &str = "x-limiter-rls-secret";

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
        service::ratelimit::v3::RateLimitRequest,
    };
    use prost::Message as _;

    use super::*;
    use crate::{config::Config, limit::SystemClock, metrics::Metrics};

    fn server() -> RateLimitServer {
        let config = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[tier]]\nroute = \"/api/chat\"\nlimit = 2\nwindow = \"1m\"\n",
        )
        .expect("valid");
        let proxy =
            Proxy::new(config, Arc::new(SystemClock::new()), None, Metrics::new()).expect("proxy");
        RateLimitServer::new(Arc::new(proxy))
    }

    #[test]
    fn reads_what_envoys_types_write() {
        let sent = RateLimitRequest {
            domain: "limiter".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "path".into(),
                    value: "/api/chat".into(),
                }],
                hits_addend: Some(UInt64Value { value: 0 }),
                is_negative_hits: false,
                limit: None,
            }],
            hits_addend: 3,
        };
        let read = Call::decode(sent.encode_to_vec().as_slice()).expect("same wire format");
        assert_eq!(read.domain, "limiter");
        assert_eq!(read.hits_addend, 3);
        assert_eq!(read.descriptors[0].entries[0].value, b"/api/chat");
        assert_eq!(
            read.descriptors[0].hits_addend,
            Some(UInt64Value { value: 0 })
        );
    }

    #[tokio::test]
    async fn an_entry_that_is_not_utf8_is_over_the_limit_not_a_failed_call() {
        let server = server();
        let call = Call {
            domain: "limiter".into(),
            descriptors: vec![CallDescriptor {
                entries: vec![
                    CallEntry {
                        key: b"path".to_vec(),
                        value: b"/api/chat".to_vec(),
                    },
                    CallEntry {
                        key: b"api_key".to_vec(),
                        value: b"Espa\xf1a".to_vec(),
                    },
                    CallEntry {
                        key: b"remote_address".to_vec(),
                        value: b"10.0.0.1".to_vec(),
                    },
                ],
                hits_addend: None,
                is_negative_hits: false,
            }],
            hits_addend: 0,
        };
        for _ in 0..3 {
            let answer = server.decide(&call).await.expect("answered, not failed");
            assert_eq!(answer.overall_code, i32::from(Code::OverLimit));
            let body = String::from_utf8(answer.raw_body).unwrap();
            assert!(
                body.contains("BAD_REQUEST") && body.contains("UTF-8"),
                "{body}"
            );
        }
    }
}
