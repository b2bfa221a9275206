//! The config file's shape as serde reads it: strings and numbers as written,
//! each section's defaults in one `impl Default`.

use std::{collections::HashMap, path::PathBuf};

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub xdp: RawXdp,
    #[serde(default)]
    pub rls: RawRls,
    #[serde(default)]
    pub tier: Vec<RawTier>,
    #[serde(default)]
    pub key: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawServer {
    /// Required; `None` is refused when validating.
    pub listen: Option<String>,
    pub upstream: String,
    pub trusted_proxies: Vec<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub ietf_headers: bool,
    /// `enforce` or `observe` (dry run) for every tier.
    pub mode: String,
    pub upstream_paths: Option<String>,
    pub upstream_timeout: String,
    pub header_read_timeout: String,
    pub body_read_timeout: String,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// With no request in flight, how long a connection stays open.
    pub idle_timeout: String,
    /// Connections one source (address, IPv6 prefix) may hold open.
    pub max_connections_per_source: usize,
    /// Connections one trusted proxy may hold open; default `max_connections`.
    pub max_connections_per_proxy: Option<usize>,
    /// Longest an answer may wait for the client to take its next piece.
    pub send_timeout: String,
    /// Bytes per second a request body must average, past `body_read_timeout`.
    pub body_min_rate: u64,
    /// Streams one HTTP/2 connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Requests in flight to the upstream, every client together.
    pub max_requests_in_flight: usize,
    /// Requests in flight to the upstream for one client address.
    pub max_requests_in_flight_per_source: usize,
    /// Connections to the upstream, busy and idle together.
    pub max_upstream_connections: usize,
    /// Longest a request waits for an upstream connection when all are busy.
    pub upstream_wait: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: None,
            upstream: "http://127.0.0.1:9000".into(),
            trusted_proxies: Vec::new(),
            tls_cert: None,
            tls_key: None,
            ietf_headers: false,
            mode: "enforce".into(),
            upstream_paths: None,
            upstream_timeout: "30s".into(),
            header_read_timeout: "10s".into(),
            body_read_timeout: "30s".into(),
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            idle_timeout: "60s".into(),
            max_connections_per_source: 100,
            max_connections_per_proxy: None,
            send_timeout: "30s".into(),
            body_min_rate: 1024,
            max_concurrent_streams: 100,
            max_requests_in_flight: 10_000,
            max_requests_in_flight_per_source: 100,
            max_upstream_connections: 1_000,
            upstream_wait: "1s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub listen: String,
    /// The live page at `/` and its once-a-second sampler.
    pub dashboard: bool,
    /// The admin API's bearer tokens, one per line (`name:token`).
    pub token_file: Option<PathBuf>,
    /// This host's name in the fleet; default the host name.
    pub node: Option<String>,
    /// Where runtime changes persist with the in-memory store.
    pub state_file: PathBuf,
    /// With `tls_key`, the admin listener speaks TLS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            dashboard: true,
            token_file: None,
            node: None,
            state_file: "/var/lib/limiter/runtime.json".into(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub api_key_headers: Vec<String>,
    pub ipv6_prefix: u8,
    /// The one header a trusted proxy writes the client address into.
    pub client_ip_header: String,
    /// When a key is a bucket of its own: `upstream`, `config` or `none`.
    pub verify_keys: String,
    pub verified_keys_max: usize,
    pub verified_key_ttl: String,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            api_key_headers: vec!["authorization".into(), "x-api-key".into()],
            ipv6_prefix: 64,
            client_ip_header: "x-forwarded-for".into(),
            verify_keys: "upstream".into(),
            verified_keys_max: 100_000,
            verified_key_ttl: "1h".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawStore {
    pub kind: String,
    pub url: Option<String>,
    pub on_error: String,
    pub max_buckets: usize,
    /// Redis Cluster seed nodes (`redis://host:port`); set, the store talks Cluster.
    pub cluster_nodes: Vec<String>,
    pub key_prefix: String,
    pub timeout: String,
    pub breaker_failures: u32,
    pub breaker_cooldown: String,
    pub lease: String,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            kind: "memory".into(),
            url: None,
            on_error: "allow".into(),
            max_buckets: 4_000_000,
            cluster_nodes: Vec::new(),
            key_prefix: "limiter:".into(),
            timeout: "50ms".into(),
            breaker_failures: 5,
            breaker_cooldown: "1s".into(),
            lease: "30s".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "the file's shape: each bool is an independent on/off key of [xdp]"
)]
pub(super) struct RawXdp {
    pub enabled: bool,
    pub interfaces: Vec<String>,
    /// `enforce` or `observe`.
    pub mode: String,
    pub ports: Vec<u16>,
    pub max_packets_per_second: u32,
    pub max_syns_per_second: u32,
    pub escalate_after_rejections: u32,
    pub max_new_sources_per_second: u32,
    pub ban_seconds: u64,
    /// `IP` or `IP/LEN` each.
    pub allow: Vec<String>,
    pub instance: String,
    pub persist: bool,
    pub ban_keyed_clients: bool,
    pub max_ban_seconds: u64,
    pub autoban_after_seconds: u16,
    pub syn_challenge: bool,
    pub max_syn_acks_per_second: u32,
}

impl Default for RawXdp {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: vec!["lo".into()],
            mode: "enforce".into(),
            ports: Vec::new(),
            max_packets_per_second: 0,
            max_syns_per_second: 0,
            escalate_after_rejections: 0,
            max_new_sources_per_second: 0,
            ban_seconds: 60,
            allow: Vec::new(),
            instance: "default".into(),
            persist: false,
            ban_keyed_clients: false,
            max_ban_seconds: 3600,
            autoban_after_seconds: 3,
            syn_challenge: true,
            max_syn_acks_per_second: 0,
        }
    }
}

/// `[rls]`: Envoy's rate limit service, served when `listen` is set.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawRls {
    pub listen: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The domain whose descriptors map to the tiers.
    pub domain: String,
    /// Who may call (`IP` or `IP/LEN` each): a caller names the addresses
    /// to count and ban, so only the Envoy hosts should reach it.
    pub clients: Vec<String>,
    /// Files in the envoyproxy/ratelimit config shape (YAML), each a domain.
    pub envoy_config: Vec<PathBuf>,
    /// A file holding the secret every call must carry in its
    /// `x-limiter-rls-secret` metadata.
    pub secret_file: Option<PathBuf>,
}

impl Default for RawRls {
    fn default() -> Self {
        Self {
            listen: None,
            tls_cert: None,
            tls_key: None,
            domain: "limiter".into(),
            clients: vec!["127.0.0.0/8".into(), "::1".into()],
            envoy_config: Vec::new(),
            secret_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTier {
    pub route: String,
    pub limit: u32,
    pub window: String,
    /// `enforce` or `observe`; absent: enforce (unless `[server] mode` observes).
    pub mode: Option<String>,
    /// Requests of one client in flight on the tier at once.
    pub max_in_flight: Option<u32>,
    /// Units one request is worth; absent: 1.
    pub cost: Option<u32>,
    /// The upstream's answer header that reports a request's cost.
    pub cost_header: Option<String>,
    /// `[tier.tokens]`: a token budget beside the request limit.
    pub tokens: Option<RawTokens>,
    /// `fixed`, `sliding` or `gcra`; absent: fixed.
    pub algorithm: Option<String>,
    /// GCRA's burst; absent: the limit.
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    pub limit: u32,
    pub window: String,
    /// `"max_tokens"` or a fixed number of tokens.
    pub reserve: RawReserve,
    pub default_max_tokens: Option<u32>,
    pub prompt_bytes_per_token: Option<u32>,
    pub usage: Option<Vec<String>>,
    pub max_request_bytes: Option<usize>,
}

/// `reserve`: a name (`"max_tokens"`) or a number, told apart by the
/// value's TOML type.
#[derive(Debug)]
pub(super) enum RawReserve {
    Named(String),
    Fixed(i64),
}

impl<'de> Deserialize<'de> for RawReserve {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawReserve;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"max_tokens\" or a number of tokens")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawReserve, E> {
                Ok(RawReserve::Named(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawReserve, E> {
                Ok(RawReserve::Fixed(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawReserve, E> {
                Ok(RawReserve::Fixed(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        // TOML hands over what the value is, whatever is asked for.
        deserializer.deserialize_str(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub key_sha256: String,
    pub multiplier: Option<f64>,
    #[serde(default)]
    pub limits: HashMap<String, u32>,
}
