//! Responses the agent writes itself: the 429 with its headers, and small
//! JSON errors.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};

use super::Body;
use crate::{
    answers::{self, PolicyName},
    limit::{Decision, Now},
};

/// The 429: the exact body, `Retry-After` and the limit headers, stamped with
/// both clocks read at answer time (`now`).
pub(super) fn too_many(
    decision: &Decision,
    window_ms: u64,
    now: Now,
    policy: Option<&PolicyName>,
) -> Response<Body> {
    let retry = answers::retry_after_secs(decision, now);
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        answers::too_many_requests_body(retry),
    );
    answers::apply(response.headers_mut(), decision, window_ms, now, policy);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    response
}

/// A small JSON response.
#[must_use]
pub fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A JSON error response: `{"error":{"code":…,"message":…}}`.
#[must_use]
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, answers::error_body(code, message))
}

/// 503 when the shared store failed and `on_error = "deny"`.
pub(super) fn unavailable() -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "STORE_UNAVAILABLE",
        "The rate-limit store is unavailable; try again later.",
    )
}
