//! The admin API: the fleet's per-key overrides, bans and allow entries,
//! read and changed at runtime (`docs/admin-api.md`). Every call needs
//! `Authorization: Bearer <token>` from `[admin] token_file`; without a
//! token file, reads are open (the listener is on loopback) and writes are
//! refused. A refused change changes nothing and says why in JSON.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Fleet, FleetError, MAX_SECONDS,
    record::{Allow, Override},
};
use crate::{answers::error_body, proxy::unix_ms, route::canonicalize};

/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;
/// Longest a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest free text kept (reasons).
const MAX_REASON: usize = 256;

type Answer = Response<Full<Bytes>>;

/// A refused call: its status and JSON error.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn answer(self) -> Answer {
        error(self.status, self.code, &self.message)
    }
}

/// Whether `path` is the API's.
#[must_use]
pub fn owns(path: &str) -> bool {
    ["/overrides", "/bans", "/allow", "/changes"]
        .iter()
        .any(|p| {
            path == *p
                || path
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
}

/// Answers one API call.
pub async fn handle(fleet: &Fleet, req: Request<Incoming>) -> Answer {
    let write = req.method() == Method::PUT || req.method() == Method::DELETE;
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    if !read && !write {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD",
            "GET, PUT or DELETE",
        );
    }
    let state = fleet.proxy.state();
    let tokens = &state.config.live.admin_tokens;
    let who = if tokens.is_empty() {
        if write {
            return error(
                StatusCode::FORBIDDEN,
                "NO_TOKENS",
                "[admin] token_file is not set: changes are refused",
            );
        }
        "anonymous".to_owned()
    } else {
        let offered = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| crate::admin::offered_token(v.as_bytes()));
        let Some(name) = offered.and_then(|t| tokens.who(&t)) else {
            let mut answer = error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "Authorization: Bearer <a token of [admin] token_file> is required",
            );
            answer.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return answer;
        };
        name.to_owned()
    };
    let path = req.uri().path().to_owned();
    let (collection, item) = match path[1..].split_once('/') {
        Some((collection, item)) => (collection.to_owned(), Some(item.to_owned())),
        None => (path[1..].to_owned(), None),
    };
    let method = req.method().clone();
    let body = if method == Method::PUT {
        match read_body(req).await {
            Ok(body) => Some(body),
            Err(refusal) => return refusal.answer(),
        }
    } else {
        None
    };
    let outcome = match (collection.as_str(), item, method) {
        ("changes", None, _) if read => Ok(ok(&json!({ "changes": fleet.view().changes }))),
        ("overrides", None, _) if read => Ok(ok(&list_overrides(fleet))),
        ("bans", None, _) if read => Ok(ok(&list_bans(fleet))),
        ("allow", None, _) if read => {
            Ok(ok(&json!({ "allow": named(&fleet.view().allow, "net") })))
        }
        ("overrides", Some(key), m) => overrides(fleet, &key, &m, body.as_deref(), &who).await,
        ("bans", Some(net), m) => bans(fleet, &net, &m, body.as_deref(), &who).await,
        ("allow", Some(net), m) => allow(fleet, &net, &m, body.as_deref(), &who).await,
        _ => Err(Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "METHOD",
            message: "use GET on a list, GET, PUT or DELETE on an entry".into(),
        }),
    };
    outcome.unwrap_or_else(Refusal::answer)
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(_)) => Err(Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "TOO_LARGE",
            message: "the body is over 64 KiB".into(),
        }),
        Err(_) => Err(Refusal {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "TIMEOUT",
            message: "the body did not arrive in time".into(),
        }),
    }
}

fn list_overrides(fleet: &Fleet) -> Value {
    json!({ "overrides": named(&fleet.view().overrides, "key_sha256") })
}

fn list_bans(fleet: &Fleet) -> Value {
    let view = fleet.view();
    let skipped: BTreeMap<String, &str> = fleet.skipped().into_iter().collect();
    let mut bans = named(&view.bans, "net");
    for ban in &mut bans {
        if let Some(why) = ban["net"].as_str().and_then(|n| skipped.get(n)) {
            ban["not_applied_here"] = json!(why);
        }
    }
    json!({ "bans": bans, "node": fleet.node() })
}

/// A map's entries as objects, each with its name under `field`.
fn named<T: serde::Serialize>(map: &BTreeMap<String, T>, field: &str) -> Vec<Value> {
    map.iter()
        .map(|(name, entry)| {
            let mut value = serde_json::to_value(entry).unwrap_or_default();
            value[field] = json!(name);
            value
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideBody {
    multiplier: Option<f64>,
    limits: Option<BTreeMap<String, u64>>,
    seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BanBody {
    seconds: u64,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowBody {
    seconds: Option<u64>,
    reason: Option<String>,
}

async fn overrides(
    fleet: &Fleet,
    key: &str,
    method: &Method,
    body: Option<&[u8]>,
    who: &str,
) -> Result<Answer, Refusal> {
    let key = key.to_ascii_lowercase();
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("the key is named by the 64 hex digits of its SHA-256"));
    }
    match *method {
        Method::GET | Method::HEAD => match fleet.view().overrides.get(&key) {
            Some(entry) => Ok(ok(&named_one(entry, "key_sha256", &key))),
            None => Err(not_found(&key)),
        },
        Method::DELETE => match fleet.delete_override(&key, who).await {
            Ok(true) => Ok(ok(&json!({ "deleted": key }))),
            Ok(false) => Err(not_found(&key)),
            Err(e) => Err(failed(&e)),
        },
        _ => {
            let body: OverrideBody = parse(body)?;
            if body.multiplier.is_none() && body.limits.is_none() {
                return Err(bad("give `multiplier`, `limits` or both"));
            }
            if let Some(m) = body.multiplier
                && !(m.is_finite() && m > 0.0 && m <= 1e6)
            {
                return Err(bad(
                    "`multiplier` must be a number above 0, at most 1000000",
                ));
            }
            let state = fleet.proxy.state();
            let policy = state.config.live.path_policy;
            let mut limits = BTreeMap::new();
            for (route, limit) in body.limits.unwrap_or_default() {
                let canonical =
                    canonicalize(&route, policy).map_err(|e| bad(&format!("`{route}`: {e}")))?;
                let tier = state
                    .config
                    .live
                    .tiers
                    .iter()
                    .find(|t| canonicalize(&t.route, policy).ok().as_deref() == Some(&canonical))
                    .ok_or_else(|| bad(&format!("`{route}` is not the route of a tier")))?;
                let limit = u32::try_from(limit)
                    .ok()
                    .filter(|l| *l >= 1)
                    .ok_or_else(|| bad(&format!("`{route}`: a limit is 1 to {}", u32::MAX)))?;
                limits.insert(tier.route.clone(), limit);
            }
            let now = unix_ms();
            let until_ms = match body.seconds {
                Some(s) => Some(now.saturating_add(seconds(s)? * 1000)),
                None => None,
            };
            let entry = Override {
                multiplier: body.multiplier,
                limits,
                until_ms,
                origin: fleet.node().to_owned(),
                by: who.to_owned(),
                at_ms: now,
            };
            match fleet.put_override(&key, entry, who).await {
                Ok(entry) => Ok(ok(&named_one(&entry, "key_sha256", &key))),
                Err(e) => Err(failed(&e)),
            }
        }
    }
}

async fn bans(
    fleet: &Fleet,
    net: &str,
    method: &Method,
    body: Option<&[u8]>,
    who: &str,
) -> Result<Answer, Refusal> {
    let net = network(net)?;
    match *method {
        Method::GET | Method::HEAD => {
            let name = crate::net::widen(net, fleet.proxy.state().config.live.ipv6_prefix);
            match fleet.view().bans.get(&name.to_string()) {
                Some(ban) => Ok(ok(&named_one(ban, "net", &name.to_string()))),
                None => Err(not_found(&name.to_string())),
            }
        }
        Method::DELETE => match fleet.delete_ban(net, who).await {
            Ok(true) => Ok(ok(&json!({ "deleted": net.to_string() }))),
            Ok(false) => Err(not_found(&net.to_string())),
            Err(e) => Err(failed(&e)),
        },
        _ => {
            let body: BanBody = parse(body)?;
            let seconds = seconds(body.seconds)?;
            let reason = reason(body.reason)?;
            // As the kernel will hold it: IPv6 widened to the grouping.
            let widened = crate::net::widen(net, fleet.proxy.state().config.live.ipv6_prefix);
            if too_wide(widened) {
                return Err(bad(&format!(
                    "{widened}: a ban is at most a /8 (IPv4) or a /16 (IPv6): wider would ban the world"
                )));
            }
            match fleet.put_ban(net, seconds, reason, who).await {
                Ok((name, ban)) => Ok(ok(&named_one(&ban, "net", &name))),
                Err(e) => Err(failed(&e)),
            }
        }
    }
}

async fn allow(
    fleet: &Fleet,
    net: &str,
    method: &Method,
    body: Option<&[u8]>,
    who: &str,
) -> Result<Answer, Refusal> {
    let net = network(net)?;
    let name = net.trunc().to_string();
    match *method {
        Method::GET | Method::HEAD => match fleet.view().allow.get(&name) {
            Some(entry) => Ok(ok(&named_one(entry, "net", &name))),
            None => Err(not_found(&name)),
        },
        Method::DELETE => match fleet.delete_allow(net, who).await {
            Ok(true) => Ok(ok(&json!({ "deleted": name }))),
            Ok(false) => Err(not_found(&name)),
            Err(e) => Err(failed(&e)),
        },
        _ => {
            let body: AllowBody = parse(body)?;
            if too_wide(net) {
                return Err(bad(
                    "an allow entry is at most a /8 (IPv4) or a /16 (IPv6): wider would exempt the world",
                ));
            }
            let now = unix_ms();
            let until_ms = match body.seconds {
                Some(s) => Some(now.saturating_add(seconds(s)? * 1000)),
                None => None,
            };
            let entry = Allow {
                until_ms,
                reason: reason(body.reason)?,
                origin: fleet.node().to_owned(),
                by: who.to_owned(),
                at_ms: now,
            };
            match fleet.put_allow(net, entry.clone(), who).await {
                Ok(name) => Ok(ok(&named_one(&entry, "net", &name))),
                Err(e) => Err(failed(&e)),
            }
        }
    }
}

/// Wider than a /8 (IPv4) or a /16 (IPv6).
fn too_wide(net: IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.prefix_len() < 8,
        IpNet::V6(n) => n.prefix_len() < 16,
    }
}

fn named_one<T: serde::Serialize>(entry: &T, field: &str, name: &str) -> Value {
    let mut value = serde_json::to_value(entry).unwrap_or_default();
    value[field] = json!(name);
    value
}

/// A path segment naming a network: `IP` or `IP/LEN`, the `/` sent as
/// `%2F` (IPv6 colons may be sent as `%3A`).
fn network(segment: &str) -> Result<IpNet, Refusal> {
    let mut text = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(at) = rest.find('%') {
        text.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3).unwrap_or("");
        match code.to_ascii_uppercase().as_str() {
            "2F" => text.push('/'),
            "3A" => text.push(':'),
            _ => return Err(bad("a network is `IP` or `IP%2FLEN`")),
        }
        rest = &rest[at + 3..];
    }
    text.push_str(rest);
    if text.contains('/') && segment.contains('/') {
        return Err(bad("send the `/` of a network as %2F"));
    }
    crate::net::parse_net(&text).map_err(|e| bad(&e.to_string()))
}

fn seconds(s: u64) -> Result<u64, Refusal> {
    if (1..=MAX_SECONDS).contains(&s) {
        Ok(s)
    } else {
        Err(bad(&format!("`seconds` is 1 to {MAX_SECONDS}")))
    }
}

fn reason(text: Option<String>) -> Result<String, Refusal> {
    let text = text.unwrap_or_default();
    if text.chars().count() > MAX_REASON || text.chars().any(char::is_control) {
        return Err(bad(&format!(
            "`reason` is at most {MAX_REASON} characters, none of them control characters"
        )));
    }
    Ok(text)
}

fn parse<T: serde::de::DeserializeOwned>(body: Option<&[u8]>) -> Result<T, Refusal> {
    serde_json::from_slice(body.unwrap_or_default())
        .map_err(|e| bad(&format!("the body is not what this call takes: {e}")))
}

fn ok(value: &Value) -> Answer {
    answer(StatusCode::OK, value.to_string())
}

fn bad(message: &str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        code: "BAD_REQUEST",
        message: message.to_owned(),
    }
}

fn not_found(name: &str) -> Refusal {
    Refusal {
        status: StatusCode::NOT_FOUND,
        code: "NOT_FOUND",
        message: format!("no entry for {name}"),
    }
}

fn failed(e: &FleetError) -> Refusal {
    match e {
        FleetError::Refused(why) => Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "REFUSED",
            message: why.clone(),
        },
        FleetError::Store(e) => Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "STORE",
            message: e.to_string(),
        },
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Answer {
    answer(status, error_body(code, message))
}

fn answer(status: StatusCode, body: String) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_networks() {
        assert!(owns("/bans"));
        assert!(owns("/bans/10.0.0.1"));
        assert!(!owns("/bansx"));
        assert!(!owns("/status"));
        assert_eq!(
            network("10.0.0.0%2F24").unwrap(),
            "10.0.0.0/24".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            network("2001%3Adb8%3A%3A%2f48").unwrap(),
            "2001:db8::/48".parse::<IpNet>().unwrap()
        );
        assert!(network("10.0.0.1%").is_err());
        assert!(network("10.0.0.1%41").is_err());
        assert!(network("not-an-ip").is_err());
        assert!(seconds(0).is_err());
        assert!(seconds(MAX_SECONDS + 1).is_err());
        assert!(reason(Some("a\nb".into())).is_err());
    }
}
