//! The TOML configuration: the file's shape ([`raw`]), validated once
//! ([`validate`]) into typed values ([`model`]) so raw strings never reach
//! the request path or the kernel, with `run`'s flags laid over it
//! ([`overlay`]).

mod envoy;
mod model;
mod overlay;
mod raw;
mod validate;

use std::path::{Path, PathBuf};

pub use envoy::{EnvoyDescriptor, EnvoyDomain, EnvoyLimit};
pub use model::{
    AdminTokens, Config, KeyOverride, KeyVerification, LimitMode, LiveSettings, OnError, Reserve,
    RlsPolicy, RlsSecret, StartupSettings, StoreKind, Tier, TokenBudget, UsageField, XdpAttach,
    XdpMode, XdpPolicy,
};
pub use validate::parse_duration;

use crate::route::RouteTable;

/// Why a config file was refused. Each message names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a field of the wrong type or name.
    #[error("{0}")]
    Parse(String),
    /// A field (or a command-line flag) has a value outside what it accepts.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The config from `origin` (a file, the built-in config) was refused.
    #[error("{origin}: {error}")]
    In {
        origin: String,
        error: Box<ConfigError>,
    },
}

impl ConfigError {
    /// This error, said to come from `origin`.
    #[must_use]
    pub fn within(self, origin: impl std::fmt::Display) -> Self {
        Self::In {
            origin: origin.to_string(),
            error: Box::new(self),
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Whether `name` can name a pin directory (letters, digits, `-`, `_`).
#[must_use]
pub fn valid_instance(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Config {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// The file can't be read, or is refused (the message names the field).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates config text.
    ///
    /// # Errors
    /// The text is refused (the message names the field).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string().trim().into()))?;
        raw.validate()
    }
}

impl LiveSettings {
    /// The tier table as a route table (tier indexes into `tiers`).
    ///
    /// # Errors
    /// Two tiers whose routes the table can't tell apart.
    pub fn route_table(&self) -> Result<RouteTable, ConfigError> {
        let routes: Vec<(&str, usize)> = self
            .tiers
            .iter()
            .enumerate()
            .map(|(i, tier)| (tier.route.as_str(), i))
            .collect();
        RouteTable::new(&routes, self.path_policy).map_err(|e| invalid("tier", e.to_string()))
    }
}

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
