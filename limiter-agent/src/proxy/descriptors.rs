//! Decisions asked for by descriptor rather than by request (Envoy's rate
//! limit service): the same tiers, identities, buckets, counters, offenders
//! and escalation as the proxy's own requests, so a client counted through
//! Envoy and through the proxy spends one bucket.
//!
//! Two kinds of domain:
//! - `[rls] domain` (`limiter`): a descriptor's `path` entry is routed to its
//!   tier through the proxy's canonicaliser; `api_key` (one header's value,
//!   read by the proxy's grammar: [`hashed_key_in`]) and `remote_address`
//!   pick the identity by the proxy's rules. Other entries are ignored.
//! - envoyproxy/ratelimit domains (`[rls] envoy_config`): the descriptor walks
//!   the domain's tree entry by entry; the node it ends on holds the limit,
//!   and its entries (key and value each) name the bucket.

use std::{collections::hash_map::RandomState, net::IpAddr};

use super::{Charge, Charged, Proxy, State, TierState};
use crate::{
    answers::PolicyName,
    config::{EnvoyDescriptor, EnvoyDomain, EnvoyLimit, LimitMode},
    identity::{Identity, Requester, hashed_key_in, sha256_hex},
    limit::{Decision, Spend},
    metrics::Metrics,
    route::canonical,
};

/// What a descriptor came to.
#[derive(Debug)]
pub enum Answer {
    /// No limit applies (unknown domain, no tier for the path, an unmatched
    /// or unlimited node): the reference server's OK without a limit.
    NoLimit,
    Decided(Verdict),
    /// Refused without counting: a path or identity the proxy would answer
    /// 400, or a new bucket in a full store. Never waved through.
    Refused {
        code: &'static str,
        message: String,
    },
    /// The shared store failed and `on_error = "deny"`.
    Unavailable,
}

/// A counted descriptor.
#[derive(Debug)]
pub struct Verdict {
    pub decision: Decision,
    pub window_ms: u64,
    /// A dry run (`mode = "observe"`, `shadow_mode`): over the limit is
    /// reported as OK and counted as `would_reject`.
    pub observe: bool,
    /// The limit's name (`current_limit.name`): the tier's route, or the
    /// node's `name`/entries.
    pub name: String,
    pub policy: Option<PolicyName>,
}

impl Verdict {
    /// Over the limit and enforced.
    #[must_use]
    pub fn over_limit(&self) -> bool {
        !self.decision.allowed && !self.observe
    }
}

/// An envoyproxy/ratelimit domain ready for lookups.
pub(super) struct EnvoyRules {
    domain: String,
    nodes: Vec<Node>,
}

struct Node {
    key: String,
    value: Option<String>,
    limit: NodeLimit,
    children: Vec<Node>,
}

enum NodeLimit {
    None,
    Unlimited,
    Limit(Box<TierState>),
}

impl EnvoyRules {
    pub(super) fn new(
        domain: &EnvoyDomain,
        hasher: &RandomState,
        metrics: &Metrics,
        ietf_headers: bool,
    ) -> Self {
        fn build(
            domain: &str,
            path: &str,
            nodes: &[EnvoyDescriptor],
            hasher: &RandomState,
            metrics: &Metrics,
            ietf_headers: bool,
        ) -> Vec<Node> {
            nodes
                .iter()
                .map(|d| {
                    let step = match &d.value {
                        Some(value) => format!("{}={value}", d.key),
                        None => d.key.clone(),
                    };
                    let path = if path.is_empty() {
                        step
                    } else {
                        format!("{path}/{step}")
                    };
                    let limit = match &d.limit {
                        None => NodeLimit::None,
                        Some(EnvoyLimit::Unlimited) => NodeLimit::Unlimited,
                        Some(EnvoyLimit::Limit {
                            requests,
                            window,
                            name,
                        }) => {
                            let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
                            let id = format!("envoy|{domain}|{path}|{window_ms}");
                            let label = name.clone().unwrap_or_else(|| format!("{domain}:{path}"));
                            let mode = if d.shadow_mode {
                                LimitMode::Observe
                            } else {
                                LimitMode::Enforce
                            };
                            NodeLimit::Limit(Box::new(TierState::new(
                                id,
                                label,
                                *requests,
                                window_ms,
                                mode,
                                hasher,
                                metrics,
                                ietf_headers,
                            )))
                        }
                    };
                    Node {
                        key: d.key.clone(),
                        value: d.value.clone(),
                        limit,
                        children: build(
                            domain,
                            &path,
                            &d.descriptors,
                            hasher,
                            metrics,
                            ietf_headers,
                        ),
                    }
                })
                .collect()
        }
        Self {
            domain: domain.domain.clone(),
            nodes: build(
                &domain.domain,
                "",
                &domain.descriptors,
                hasher,
                metrics,
                ietf_headers,
            ),
        }
    }

    /// The node a descriptor ends on: each entry matches a node of its exact
    /// value first, else one whose value ends in `*` and is a prefix of it,
    /// else one for any value; an entry that matches none leaves the
    /// descriptor unlimited (the reference server's rule).
    fn lookup(&self, entries: &[(&str, &str)]) -> Option<&Node> {
        let mut level = &self.nodes;
        let mut found = None;
        for (key, value) in entries {
            let same_key = |n: &&Node| n.key == *key;
            let node = level
                .iter()
                .filter(same_key)
                .find(|n| n.value.as_deref() == Some(*value))
                .or_else(|| {
                    level.iter().filter(same_key).find(|n| {
                        n.value
                            .as_deref()
                            .and_then(|v| v.strip_suffix('*'))
                            .is_some_and(|prefix| value.starts_with(prefix))
                    })
                })
                .or_else(|| level.iter().filter(same_key).find(|n| n.value.is_none()))?;
            found = Some(node);
            level = &node.children;
        }
        found
    }
}

/// The one value of `key` among the entries; two different ones are
/// ambiguous (which would the upstream see?).
fn entry<'a>(entries: &[(&str, &'a str)], key: &str) -> Result<Option<&'a str>, String> {
    let mut found: Option<&str> = None;
    for (k, v) in entries {
        if *k == key {
            match found {
                Some(f) if f != *v => return Err(format!("two different `{key}` entries")),
                _ => found = Some(v),
            }
        }
    }
    Ok(found)
}

impl Proxy {
    /// Decides one descriptor of a rate limit service call, charging `hits`.
    pub async fn decide_descriptor(
        &self,
        state: &State,
        domain: &str,
        entries: &[(&str, &str)],
        hits: u32,
    ) -> Answer {
        let remote = match entry(entries, "remote_address") {
            Ok(Some(text)) => {
                let Some(ip) = remote_address(text) else {
                    self.metrics.refuse("client_address");
                    return refused(
                        "BAD_IDENTITY",
                        format!("remote_address `{text}` is not an IP address"),
                    );
                };
                Some(ip)
            }
            Ok(None) => None,
            Err(message) => return refused("BAD_IDENTITY", message),
        };
        // A banned client (the fleet's bans) is over every limit, before
        // anything is counted, as the proxy answers it.
        if let Some(ip) = remote
            && self.runtime.load().bans.left_ms(ip).is_some()
        {
            self.metrics.refuse("banned");
            return refused(
                "BANNED",
                "This client is banned for ignoring rate limits.".into(),
            );
        }
        if domain == state.config.live.rls.domain {
            return self.decide_route(state, entries, remote, hits).await;
        }
        let Some(rules) = state.envoy.iter().find(|r| r.domain == domain) else {
            return Answer::NoLimit;
        };
        // The address in one spelling (IPv4-mapped, zone, case, brackets)
        // to match the domain's nodes, and grouped by `ipv6_prefix` as the
        // proxy counts clients to name the bucket, so a client can't mint
        // buckets by rotating addresses or spellings.
        let canonical = remote.map(|ip| ip.to_string());
        let grouped = remote.map(|ip| state.identity.group(ip).to_string());
        let with_address = |address: &Option<String>| -> Vec<(&str, String)> {
            entries
                .iter()
                .map(|&(k, v)| match (k, address) {
                    ("remote_address", Some(text)) => (k, text.clone()),
                    _ => (k, v.to_owned()),
                })
                .collect()
        };
        let matched = with_address(&canonical);
        let matched: Vec<(&str, &str)> = matched.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let Some(node) = rules.lookup(&matched) else {
            return Answer::NoLimit;
        };
        let named = with_address(&grouped);
        let entries: Vec<(&str, &str)> = named.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let entries = entries.as_slice();
        let tier = match &node.limit {
            NodeLimit::Limit(tier) => tier,
            NodeLimit::None | NodeLimit::Unlimited => return Answer::NoLimit,
        };
        // The bucket is the descriptor itself, every value of it.
        let mut named = String::with_capacity(64);
        for (k, v) in entries {
            named.push_str(k);
            named.push('\u{1f}');
            named.push_str(v);
            named.push('\u{1e}');
        }
        let identity = Identity::Key(sha256_hex(named.as_bytes()));
        let source = remote
            .filter(|_| may_escalate(state))
            .map(|ip| (ip, Identity::Ip(state.identity.group(ip))));
        let charge = Charge {
            identity: &identity,
            limit: tier.limit,
            hits,
            spend: Spend::Reported,
            source: source.as_ref().map(|(ip, as_identity)| (*ip, as_identity)),
        };
        self.verdict(state, tier, charge).await
    }

    /// `[rls] domain`: the tier of the `path` entry, the identity of the
    /// `api_key` and `remote_address` entries.
    async fn decide_route(
        &self,
        state: &State,
        entries: &[(&str, &str)],
        remote: Option<IpAddr>,
        hits: u32,
    ) -> Answer {
        let path = match entry(entries, "path") {
            Ok(Some(path)) => path,
            Ok(None) => return Answer::NoLimit,
            Err(message) => return refused("BAD_REQUEST", message),
        };
        let canonical = match canonical(path, state.config.live.path_policy) {
            Ok(canonical) => canonical,
            Err(e) => {
                self.metrics.refuse("path");
                return refused("BAD_REQUEST", e.to_string());
            }
        };
        let Some(tier_index) = state.routes.lookup(&canonical) else {
            state.unlimited.inc();
            return Answer::NoLimit;
        };
        let key = match entry(entries, "api_key").and_then(|k| {
            k.map_or(Ok(None), |k| {
                hashed_key_in(k).map_err(|_| "api_key: not one well-formed key".to_owned())
            })
        }) {
            Ok(key) => key,
            Err(message) => {
                self.metrics.refuse("api_key");
                return refused("BAD_IDENTITY", message);
            }
        };
        let tier = &state.tiers[tier_index];
        let now_ms = self.clock.now_ms();
        let requester = Requester {
            ip: remote.map_or(IpAddr::from([0, 0, 0, 0]), |ip| state.identity.group(ip)),
            key,
        };
        let (identity, _) = self.identify(state, requester, tier, false, now_ms).await;
        if remote.is_none() && matches!(identity, Identity::Ip(_)) {
            // Charging "no address" would put every such client in one bucket.
            self.metrics.refuse("client_address");
            return refused(
                "BAD_IDENTITY",
                "the descriptor needs a remote_address (or an api_key that is its own bucket)"
                    .into(),
            );
        }
        let charge = Charge {
            identity: &identity,
            limit: state.effective_limit(&self.runtime.load(), &identity, tier_index),
            hits,
            spend: Spend::Reported,
            source: remote
                .filter(|_| may_escalate(state))
                .map(|ip| (ip, &identity)),
        };
        self.verdict(state, tier, charge).await
    }

    async fn verdict(&self, state: &State, tier: &TierState, charge: Charge<'_>) -> Answer {
        let now_ms = self.clock.now_ms();
        match self.charge(state, tier, charge, now_ms).await {
            Charged::Decided(decision, _) => Answer::Decided(Verdict {
                decision,
                window_ms: tier.window_ms,
                observe: tier.observe,
                name: tier.route.clone(),
                policy: tier.policy.clone(),
            }),
            Charged::Full => refused(
                "STORE_FULL",
                "The rate limiter is at capacity; try again later.".into(),
            ),
            Charged::Unavailable => Answer::Unavailable,
        }
    }

    /// A descriptor refused before any decision (entries that are not UTF-8).
    #[must_use]
    pub fn refuse_descriptor(&self, message: &str) -> Answer {
        self.metrics.refuse("descriptor");
        refused("BAD_REQUEST", message.into())
    }
}

/// Whether a descriptor's rejections may escalate its `remote_address` to a
/// kernel ban: only when callers prove they are Envoy (`[rls] secret_file`),
/// since a caller names the address itself.
fn may_escalate(state: &State) -> bool {
    state.config.live.rls.secret.is_some()
}

/// A `remote_address` entry's address: brackets and an IPv6 zone (`%eth0`)
/// dropped, IPv4-mapped IPv6 as IPv4.
fn remote_address(text: &str) -> Option<IpAddr> {
    let text = text.trim_matches(['[', ']']);
    let text = text.split_once('%').map_or(text, |(addr, _zone)| addr);
    text.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn refused(code: &'static str, message: String) -> Answer {
    Answer::Refused { code, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_addresses_have_one_spelling() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        for (text, expected) in [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("[2001:DB8::1]", "2001:db8::1"),
            ("fe80::1%eth0", "fe80::1"),
            ("[fe80::1%25eth0]", "fe80::1"),
        ] {
            assert_eq!(remote_address(text), Some(ip(expected)), "{text}");
        }
        assert_eq!(remote_address("unknown"), None);
        assert_eq!(remote_address("%eth0"), None);
    }
}
