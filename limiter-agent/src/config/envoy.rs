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
//! A node with a `value` matches that value only; without, any value, each
//! value counted on its own. `unit_multiplier` stretches the unit (the windows
//! the reference server cannot express: 40 per 10 s). `replaces` and calendar
//! units (`month`, `year`) are refused rather than served differently.

use std::{num::NonZeroU32, path::Path, time::Duration};

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
    /// `None`: any value, each counted apart.
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
        requests: NonZeroU32,
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
struct RawDescriptor {
    key: String,
    value: Option<String>,
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
        if out
            .iter()
            .any(|o| o.key == node.key && o.value == node.value)
        {
            return Err(invalid(field, "the same key and value twice"));
        }
        let limit = node
            .rate_limit
            .map(|l| limit(&format!("{field}.rate_limit"), l))
            .transpose()?;
        out.push(EnvoyDescriptor {
            key: node.key,
            value: node.value.filter(|v| !v.is_empty()),
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
        .and_then(NonZeroU32::new)
        .ok_or_else(|| invalid(format!("{field}.requests_per_unit"), "must be at least 1"))?;
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
                requests: NonZeroU32::new(40).unwrap(),
                window: Duration::from_secs(10),
                name: None,
            })
        );
        assert_eq!(plan.value.as_deref(), Some("free"));
        assert!(plan.shadow_mode && plan.limit.is_none());
        assert_eq!(
            plan.descriptors[0].limit,
            Some(EnvoyLimit::Limit {
                requests: NonZeroU32::new(60).unwrap(),
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
                "domain: d\ndescriptors: [{key: a, rate_limit: {unit: second, requests_per_unit: 0}}]",
                "requests_per_unit",
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
    }
}
