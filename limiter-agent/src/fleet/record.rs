//! What the fleet shares: bans, per-key overrides and allow entries, each
//! saying who made it, on which host and when, and the last changes made.
//! Stored as JSON, one entry per field of the shared store's hashes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A ban on a network at every host's API ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// When it ends, Unix time in ms (hosts' clocks are kept by NTP; the
    /// kernel's deadline is derived from it on each host).
    pub until_ms: u64,
    /// The host it was made on (`[admin] node`).
    pub origin: String,
    /// `escalation`, or the admin token's name.
    pub by: String,
    pub reason: String,
    /// The tier whose 429s the client ignored (escalation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// When it was made, Unix ms.
    pub at_ms: u64,
}

/// A key's limits, replacing its `[[key]]` entry while in force.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// Every tier's limit times this (rounded, at least the tier's cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Exact limits by tier route (as configured); before the multiplier.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, u32>,
    /// When it lapses, Unix ms; `None`: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    pub origin: String,
    pub by: String,
    pub at_ms: u64,
}

/// A network the kernel never counts or bans, beside `[xdp] allow`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    #[serde(default)]
    pub reason: String,
    pub origin: String,
    pub by: String,
    pub at_ms: u64,
}

/// Which of the shared lists an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Bans,
    Overrides,
    Allow,
}

impl Kind {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Bans => "bans",
            Self::Overrides => "overrides",
            Self::Allow => "allow",
        }
    }
}

/// One change, as recorded for the dashboard and the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub at_ms: u64,
    pub origin: String,
    pub by: String,
    /// `put` or `delete`.
    pub action: String,
    pub kind: Kind,
    /// The network or key hash.
    pub target: String,
}

/// Changes kept, newest first.
pub const CHANGES_KEPT: usize = 100;

/// Everything the fleet shares, as read at one version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shared {
    #[serde(default)]
    pub bans: BTreeMap<String, Ban>,
    #[serde(default)]
    pub overrides: BTreeMap<String, Override>,
    #[serde(default)]
    pub allow: BTreeMap<String, Allow>,
    /// Newest first, at most [`CHANGES_KEPT`].
    #[serde(default)]
    pub changes: Vec<Change>,
}

impl Shared {
    /// Entries of `kind` whose deadline passed by `now_ms`: (name, its JSON).
    #[must_use]
    pub fn expired(&self, now_ms: u64) -> Vec<(Kind, String, String)> {
        let mut out = Vec::new();
        for (name, ban) in &self.bans {
            if ban.until_ms <= now_ms {
                out.push((Kind::Bans, name.clone(), json(ban)));
            }
        }
        for (name, entry) in &self.overrides {
            if entry.until_ms.is_some_and(|until| until <= now_ms) {
                out.push((Kind::Overrides, name.clone(), json(entry)));
            }
        }
        for (name, entry) in &self.allow {
            if entry.until_ms.is_some_and(|until| until <= now_ms) {
                out.push((Kind::Allow, name.clone(), json(entry)));
            }
        }
        out
    }

    /// Sets (`Some`) or removes `name` in `kind`'s list from its JSON;
    /// whether it was there. An entry that does not parse is dropped.
    pub fn set(&mut self, kind: Kind, name: &str, value: Option<&str>) -> bool {
        fn apply<T: serde::de::DeserializeOwned>(
            list: &mut BTreeMap<String, T>,
            name: &str,
            value: Option<&str>,
        ) -> bool {
            match value.map(serde_json::from_str::<T>) {
                Some(Ok(entry)) => list.insert(name.to_owned(), entry).is_some(),
                Some(Err(_)) | None => list.remove(name).is_some(),
            }
        }
        match kind {
            Kind::Bans => apply(&mut self.bans, name, value),
            Kind::Overrides => apply(&mut self.overrides, name, value),
            Kind::Allow => apply(&mut self.allow, name, value),
        }
    }

    /// Entries in `kind`'s list.
    #[must_use]
    pub fn len(&self, kind: Kind) -> usize {
        match kind {
            Kind::Bans => self.bans.len(),
            Kind::Overrides => self.overrides.len(),
            Kind::Allow => self.allow.len(),
        }
    }

    /// The JSON of `name` in `kind`'s list.
    #[must_use]
    pub fn get_json(&self, kind: Kind, name: &str) -> Option<String> {
        match kind {
            Kind::Bans => self.bans.get(name).map(json),
            Kind::Overrides => self.overrides.get(name).map(json),
            Kind::Allow => self.allow.get(name).map(json),
        }
    }

    /// Records `change` at the front, keeping [`CHANGES_KEPT`].
    pub fn record(&mut self, change: Change) {
        self.changes.insert(0, change);
        self.changes.truncate(CHANGES_KEPT);
    }
}

/// An entry's stored form.
#[must_use]
pub fn json<T: Serialize>(entry: &T) -> String {
    serde_json::to_string(entry).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(until_ms: u64) -> Ban {
        Ban {
            until_ms,
            origin: "a".into(),
            by: "escalation".into(),
            reason: "r".into(),
            tier: Some("/api".into()),
            at_ms: 1,
        }
    }

    #[test]
    fn entries_round_trip_and_expire() {
        let mut shared = Shared::default();
        assert!(!shared.set(Kind::Bans, "10.0.0.1/32", Some(&json(&ban(100)))));
        assert!(shared.set(Kind::Bans, "10.0.0.1/32", Some(&json(&ban(200)))));
        assert_eq!(shared.bans["10.0.0.1/32"].until_ms, 200);
        assert!(shared.expired(199).is_empty());
        assert_eq!(
            shared.expired(200),
            vec![(
                Kind::Bans,
                "10.0.0.1/32".to_owned(),
                shared.get_json(Kind::Bans, "10.0.0.1/32").unwrap()
            )]
        );
        assert!(shared.set(Kind::Bans, "10.0.0.1/32", None));
        assert!(!shared.set(Kind::Bans, "10.0.0.1/32", Some("not json")));
        assert!(shared.bans.is_empty());
        for n in 0..150 {
            shared.record(Change {
                at_ms: n,
                origin: "a".into(),
                by: "b".into(),
                action: "put".into(),
                kind: Kind::Allow,
                target: String::new(),
            });
        }
        assert_eq!(shared.changes.len(), CHANGES_KEPT);
        assert_eq!(shared.changes[0].at_ms, 149, "newest first");
    }
}
