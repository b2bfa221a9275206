//! Domains in the config shape of envoyproxy/ratelimit (the reference rate
//! limit service), read from its YAML files so an Envoy fleet's existing
//! limits move over as they are:
//!
//! ```yaml
//! domain: chat
//! descriptors:
//!   - key: remote_address
//!     rate_limit: { unit: second, unit_multiplier: 10, requests_per_unit: 40 }
//!   - key: plan
//!     value: free
//!     descriptors:
//!       - key: user
//!         shadow_mode: true
//!         rate_limit: { unit: minute, requests_per_unit: 60 }
//! ```
//!
//! A node with a `value` matches that value only (a value ending in `*`, any
//! value with that prefix); without, any value, each value counted on its
//! own. `unit_multiplier` stretches the unit (the windows the reference server
//! cannot express: 40 per 10 s); `requests_per_unit: 0` refuses everything.
//! `replaces`, `share_threshold`, `quota_mode` and calendar units (`month`,
//! `year`) are refused rather than served differently.

use std::{path::Path, time::Duration};

use serde::Deserialize;

use super::{ConfigError, invalid};

/// One domain: its descriptor tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyDomain {
    pub domain: String,
    pub descriptors: Vec<EnvoyDescriptor>,
}

/// A node of the tree: matches one descriptor entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyDescriptor {
    pub key: String,
    /// `None`: any value, each counted apart; ending in `*`: any value with
    /// that prefix, each counted apart.
    pub value: Option<String>,
    /// The limit of descriptors that end at this node.
    pub limit: Option<EnvoyLimit>,
    /// Counted and reported, never over the limit (on the node whose limit it is).
    pub shadow_mode: bool,
    pub descriptors: Vec<EnvoyDescriptor>,
}

/// `rate_limit:` of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvoyLimit {
    /// `unlimited: true`: matched, never counted.
    Unlimited,
    Limit {
        /// 0 refuses every request.
        requests: u32,
        /// The unit times `unit_multiplier`.
        window: Duration,
        /// `name:`, reported in `current_limit`.
        name: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    domain: String,
    #[serde(default)]
    descriptors: Vec<RawDescriptor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "the reference file's shape: independent flags"
)]
struct RawDescriptor {
    key: String,
    /// A scalar: `value: 200` and `value: true` are the strings they spell.
    value: Option<serde_norway::Value>,
    rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    shadow_mode: bool,
    /// Per-value metrics in the reference server; every node has its own here.
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "accepted for compatibility; metrics are per node anyway"
    )]
    detailed_metric: bool,
    /// Metric naming in the reference server.
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "accepted for compatibility; metrics are per node anyway"
    )]
    value_to_metric: bool,
    /// Wildcard values sharing one bucket: not served.
    #[serde(default)]
    share_threshold: bool,
    #[serde(default)]
    descriptors: Vec<RawDescriptor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    unit: Option<String>,
    requests_per_unit: Option<u32>,
    unit_multiplier: Option<u32>,
    name: Option<String>,
    #[serde(default)]
    unlimited: bool,
    replaces: Option<serde_norway::Value>,
    /// Over-limit answered OK with a quota: not served.
    #[serde(default)]
    quota_mode: bool,
}

impl EnvoyDomain {
    /// Reads and checks one envoyproxy/ratelimit YAML file.
    ///
    /// # Errors
    /// The file can't be read or parsed, or uses what is not served.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| e.within(path.display()))
    }

    /// Parses and checks one domain's YAML.
    ///
    /// # Errors
    /// Not the shape, or uses what is not served.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawDomain =
            serde_norway::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        if raw.domain.is_empty() {
            return Err(invalid("domain", "must not be empty"));
        }
        Ok(Self {
            domain: raw.domain,
            descriptors: nodes("descriptors", raw.descriptors)?,
        })
    }
}

fn nodes(field: &str, raw: Vec<RawDescriptor>) -> Result<Vec<EnvoyDescriptor>, ConfigError> {
    let mut out: Vec<EnvoyDescriptor> = Vec::with_capacity(raw.len());
    for (i, node) in raw.into_iter().enumerate() {
        let field = format!("{field}[{i}]");
        if node.key.is_empty() {
            return Err(invalid(format!("{field}.key"), "must not be empty"));
        }
        if node.share_threshold {
            return Err(invalid(
                format!("{field}.share_threshold"),
                "not supported: each value is counted apart",
            ));
        }
        let value = match node.value {
            None | Some(serde_norway::Value::Null) => None,
            Some(serde_norway::Value::String(s)) => Some(s),
            Some(serde_norway::Value::Number(n)) => Some(n.to_string()),
            Some(serde_norway::Value::Bool(b)) => Some(b.to_string()),
            Some(_) => return Err(invalid(format!("{field}.value"), "must be a scalar")),
        }
        .filter(|v| !v.is_empty());
        if out.iter().any(|o| o.key == node.key && o.value == value) {
            return Err(invalid(field, "the same key and value twice"));
        }
        let limit = node
            .rate_limit
            .map(|l| limit(&format!("{field}.rate_limit"), l))
            .transpose()?;
        out.push(EnvoyDescriptor {
            key: node.key,
            value,
            limit,
            shadow_mode: node.shadow_mode,
            descriptors: nodes(&format!("{field}.descriptors"), node.descriptors)?,
        });
    }
    Ok(out)
}

fn limit(field: &str, raw: RawRateLimit) -> Result<EnvoyLimit, ConfigError> {
    if raw.replaces.is_some() {
        return Err(invalid(
            format!("{field}.replaces"),
            "not supported: each descriptor is decided on its own",
        ));
    }
    if raw.quota_mode {
        return Err(invalid(
            format!("{field}.quota_mode"),
            "not supported: over the limit is over the limit",
        ));
    }
    if raw.unlimited {
        return Ok(EnvoyLimit::Unlimited);
    }
    let unit_text = raw
        .unit
        .ok_or_else(|| invalid(format!("{field}.unit"), "required"))?;
    let unit_secs: u64 = match unit_text.to_ascii_lowercase().as_str() {
        "second" => 1,
        "minute" => 60,
        "hour" => 3_600,
        "day" => 86_400,
        "week" => 604_800,
        other => {
            return Err(invalid(
                format!("{field}.unit"),
                format!("`{other}` is not second, minute, hour, day or week"),
            ));
        }
    };
    let multiplier = raw.unit_multiplier.unwrap_or(1);
    if multiplier == 0 {
        return Err(invalid(
            format!("{field}.unit_multiplier"),
            "must be at least 1",
        ));
    }
    let requests = raw
        .requests_per_unit
        .ok_or_else(|| invalid(format!("{field}.requests_per_unit"), "required"))?;
    Ok(EnvoyLimit::Limit {
        requests,
        window: Duration::from_secs(unit_secs * u64::from(multiplier)),
        name: raw.name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reference_shape_with_multipliers_and_nesting() {
        let domain = EnvoyDomain::parse(
            "domain: chat
descriptors:
  - key: remote_address
    rate_limit: { unit: second, unit_multiplier: 10, requests_per_unit: 40 }
  - key: plan
    value: free
    shadow_mode: true
    descriptors:
      - key: user
        rate_limit: { unit: MINUTE, requests_per_unit: 60, name: free-users }
  - key: health
    rate_limit: { unlimited: true }
",
        )
        .unwrap();
        assert_eq!(domain.domain, "chat");
        let [remote, plan, health] = &domain.descriptors[..] else {
            panic!("three nodes: {domain:?}");
        };
        assert_eq!(
            remote.limit,
            Some(EnvoyLimit::Limit {
                requests: 40,
                window: Duration::from_secs(10),
                name: None,
            })
        );
        assert_eq!(plan.value.as_deref(), Some("free"));
        assert!(plan.shadow_mode && plan.limit.is_none());
        assert_eq!(
            plan.descriptors[0].limit,
            Some(EnvoyLimit::Limit {
                requests: 60,
                window: Duration::from_mins(1),
                name: Some("free-users".into()),
            })
        );
        assert_eq!(health.limit, Some(EnvoyLimit::Unlimited));
    }

    #[test]
    fn refuses_what_it_would_serve_differently() {
        for (yaml, field) in [
            (
                "domain: d\ndescriptors: [{key: a, rate_limit: {unit: month, requests_per_unit: 1}}]",
                "unit",
            ),
            (
                "domain: d\ndescriptors: [{key: a, rate_limit: {unit: second}}]",
                "requests_per_unit",
            ),
            (
                "domain: d\ndescriptors: [{key: a, rate_limit: {unit: second, requests_per_unit: 1, quota_mode: true}}]",
                "quota_mode",
            ),
            (
                "domain: d\ndescriptors: [{key: a, value: 'x*', share_threshold: true}]",
                "share_threshold",
            ),
            (
                "domain: d\ndescriptors: [{key: a, value: ''}, {key: a}]",
                "descriptors[1]",
            ),
            (
                "domain: d\ndescriptors: [{key: a, rate_limit: {unit: second, requests_per_unit: 1, unit_multiplier: 0}}]",
                "unit_multiplier",
            ),
            (
                "domain: d\ndescriptors: [{key: a, rate_limit: {unit: second, requests_per_unit: 1, replaces: [{name: x}]}}]",
                "replaces",
            ),
            (
                "domain: d\ndescriptors: [{key: a}, {key: a}]",
                "descriptors[1]",
            ),
            ("domain: ''", "domain"),
        ] {
            let error = EnvoyDomain::parse(yaml).unwrap_err().to_string();
            assert!(error.contains(field), "{yaml}: {error}");
        }
        assert!(EnvoyDomain::parse("domain: d\nbogus: 1").is_err());
        let scalars = EnvoyDomain::parse(
            "domain: d\ndescriptors: [{key: code, value: 200}, {key: beta, value: true}, {key: p, value: 'a*', rate_limit: {unit: hour, requests_per_unit: 0}}]",
        )
        .unwrap();
        let values: Vec<_> = scalars
            .descriptors
            .iter()
            .map(|d| d.value.as_deref())
            .collect();
        assert_eq!(values, [Some("200"), Some("true"), Some("a*")]);
    }
}
