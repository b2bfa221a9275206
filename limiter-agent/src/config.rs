//! The TOML configuration: parsed with serde, validated once into typed values
//! ([`Config`]) so raw strings never reach the request path.

use std::{collections::HashMap, net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    identity::ClientIpHeader,
    route::{PathPolicy, RouteTable},
};

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
    /// A field has a value outside what it accepts.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    xdp: RawXdp,
    #[serde(default)]
    tier: Vec<RawTier>,
    #[serde(default)]
    key: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    #[serde(default = "default_upstream")]
    upstream: String,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    ietf_headers: bool,
    #[serde(default)]
    upstream_paths: Option<String>,
    #[serde(default = "default_upstream_timeout")]
    upstream_timeout: String,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout: String,
    #[serde(default = "default_body_read_timeout")]
    body_read_timeout: String,
    #[serde(default = "default_max_header_bytes")]
    max_header_bytes: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    /// With no request in flight, how long a connection stays open.
    #[serde(default = "default_idle_timeout")]
    idle_timeout: String,
    /// Connections one source (address, IPv6 prefix) may hold open.
    #[serde(default = "default_max_connections_per_source")]
    max_connections_per_source: usize,
    /// Connections one trusted proxy may hold open; default `max_connections`.
    #[serde(default)]
    max_connections_per_proxy: Option<usize>,
}

fn default_upstream() -> String {
    "http://127.0.0.1:9000".into()
}
fn default_upstream_timeout() -> String {
    "30s".into()
}
fn default_body_read_timeout() -> String {
    "30s".into()
}
fn default_header_read_timeout() -> String {
    "10s".into()
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_idle_timeout() -> String {
    "60s".into()
}
fn default_max_connections_per_source() -> usize {
    100
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(default = "default_key_headers")]
    api_key_headers: Vec<String>,
    #[serde(default = "default_ipv6_prefix")]
    ipv6_prefix: u8,
    /// The one header a trusted proxy writes the client address into.
    #[serde(default = "default_client_ip_header")]
    client_ip_header: String,
    /// When a key is a bucket of its own: `upstream`, `config` or `none`.
    #[serde(default = "default_verify_keys")]
    verify_keys: String,
    #[serde(default = "default_verified_keys_max")]
    verified_keys_max: usize,
    #[serde(default = "default_verified_key_ttl")]
    verified_key_ttl: String,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            api_key_headers: default_key_headers(),
            ipv6_prefix: default_ipv6_prefix(),
            client_ip_header: default_client_ip_header(),
            verify_keys: default_verify_keys(),
            verified_keys_max: default_verified_keys_max(),
            verified_key_ttl: default_verified_key_ttl(),
        }
    }
}

fn default_client_ip_header() -> String {
    "x-forwarded-for".into()
}
fn default_verify_keys() -> String {
    "upstream".into()
}
fn default_verified_keys_max() -> usize {
    100_000
}
fn default_verified_key_ttl() -> String {
    "1h".into()
}

fn default_key_headers() -> Vec<String> {
    vec!["authorization".into(), "x-api-key".into()]
}
fn default_ipv6_prefix() -> u8 {
    64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default = "default_store_kind")]
    kind: String,
    url: Option<String>,
    #[serde(default = "default_on_error")]
    on_error: String,
    #[serde(default = "default_max_buckets")]
    max_buckets: usize,
    /// Redis Cluster seed nodes (`redis://host:port`); set, the store talks Cluster.
    #[serde(default)]
    cluster_nodes: Vec<String>,
    #[serde(default = "default_key_prefix")]
    key_prefix: String,
    #[serde(default = "default_store_timeout")]
    timeout: String,
    #[serde(default = "default_breaker_failures")]
    breaker_failures: u32,
    #[serde(default = "default_breaker_cooldown")]
    breaker_cooldown: String,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            kind: default_store_kind(),
            url: None,
            on_error: default_on_error(),
            max_buckets: default_max_buckets(),
            cluster_nodes: Vec::new(),
            key_prefix: default_key_prefix(),
            timeout: default_store_timeout(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown: default_breaker_cooldown(),
        }
    }
}

fn default_store_kind() -> String {
    "memory".into()
}
fn default_on_error() -> String {
    "allow".into()
}
fn default_max_buckets() -> usize {
    4_000_000
}
fn default_key_prefix() -> String {
    "limiter:".into()
}
fn default_store_timeout() -> String {
    "50ms".into()
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> String {
    "1s".into()
}

/// `[xdp]`: read and validated here; the kernel side applies it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdpSection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_interfaces")]
    pub interfaces: Vec<String>,
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub max_packets_per_second: u32,
    #[serde(default)]
    pub max_syns_per_second: u32,
    #[serde(default)]
    pub escalate_after_rejections: u32,
    /// Sources the kernel may start tracking per second, all CPUs together;
    /// 0 = derived from the per-source map's capacity.
    #[serde(default)]
    pub max_new_sources_per_second: u32,
    #[serde(default = "default_ban_seconds")]
    pub ban_seconds: u64,
    #[serde(default)]
    pub allow: Vec<String>,
    /// Names the pin directory `/sys/fs/bpf/limiter/<instance>/`.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// Leave the program attached (links pinned) when the agent exits.
    #[serde(default)]
    pub persist: bool,
    /// Escalate clients identified by API key to a ban of their source address
    /// (off: behind a shared NAT that would ban everyone else too).
    #[serde(default)]
    pub ban_keyed_clients: bool,
    /// Cap on an escalation ban, which doubles with each repeat offence.
    #[serde(default = "default_max_ban_seconds")]
    pub max_ban_seconds: u64,
    /// Consecutive seconds over a ceiling before the kernel bans a source itself.
    #[serde(default = "default_autoban_after")]
    pub autoban_after_seconds: u16,
}

type RawXdp = XdpSection;

impl Default for XdpSection {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: default_interfaces(),
            mode: default_mode(),
            ports: Vec::new(),
            max_packets_per_second: 0,
            max_syns_per_second: 0,
            escalate_after_rejections: 0,
            max_new_sources_per_second: 0,
            ban_seconds: default_ban_seconds(),
            allow: Vec::new(),
            instance: default_instance(),
            persist: false,
            ban_keyed_clients: false,
            max_ban_seconds: default_max_ban_seconds(),
            autoban_after_seconds: default_autoban_after(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_interfaces() -> Vec<String> {
    vec!["lo".into()]
}
fn default_mode() -> String {
    "enforce".into()
}
fn default_ban_seconds() -> u64 {
    60
}
fn default_instance() -> String {
    "default".into()
}
fn default_max_ban_seconds() -> u64 {
    3600
}
fn default_autoban_after() -> u16 {
    3
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    route: String,
    limit: u32,
    window: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    key_sha256: String,
    multiplier: Option<f64>,
    #[serde(default)]
    limits: HashMap<String, u32>,
}

/// One rate-limit tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub route: String,
    pub limit: NonZeroU32,
    pub window: Duration,
}

/// Per-key limits ("enterprise limits"): a multiplier and/or exact limits per route.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyOverride {
    pub multiplier: Option<f64>,
    /// Limit by tier index.
    pub limits: HashMap<usize, NonZeroU32>,
}

/// Which store decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis(RedisSettings),
}

/// `[store] kind = "redis"`: where the shared counters live and how hard to try.
/// Its `Debug` (the startup line) hides URL passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL of one server (or the first Cluster seed).
    pub url: Option<String>,
    /// Redis Cluster seed nodes; non-empty means Cluster mode.
    pub cluster_nodes: Vec<String>,
    /// Prepended to every key, outside the hash tag.
    pub key_prefix: String,
    /// Budget for one decision's round trip.
    pub timeout: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before one probe is let through.
    pub breaker_cooldown: Duration,
}

/// When an API key is a bucket of its own (`[identity] verify_keys`); until
/// then its requests are charged to the client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyVerification {
    /// Keys declared in `[[key]]`, and keys the upstream accepted (answered
    /// 2xx or 3xx), per tier.
    Upstream,
    /// Only keys declared in `[[key]]`.
    Config,
    /// Every well-formed key, unverified (one address can mint buckets).
    Off,
}

/// What to do when the shared store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Fall back to the local in-memory store.
    Allow,
    /// Refuse with 503.
    Deny,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: http::Uri,
    pub trusted_proxies: Vec<IpNet>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub ietf_headers: bool,
    pub path_policy: PathPolicy,
    pub upstream_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// With no request in flight (HTTP/1 between requests, HTTP/2 with no
    /// open stream; pings are not requests), how long a connection stays open.
    pub idle_timeout: Duration,
    /// Connections one source (IPv4 address, IPv6 `ipv6_prefix`) may hold.
    pub max_connections_per_source: usize,
    /// Connections one trusted proxy may hold (it carries many clients).
    pub max_connections_per_proxy: usize,
    pub admin_listen: SocketAddr,
    pub api_key_headers: Vec<http::HeaderName>,
    pub ipv6_prefix: u8,
    pub client_ip_header: ClientIpHeader,
    pub verify_keys: KeyVerification,
    /// (key, tier) verifications remembered at most.
    pub verified_keys_max: usize,
    /// How long an upstream's acceptance of a key is trusted.
    pub verified_key_ttl: Duration,
    pub store: StoreKind,
    pub on_error: OnError,
    pub max_buckets: usize,
    pub xdp: XdpSection,
    pub tiers: Vec<Tier>,
    /// Overrides by lowercase hex SHA-256 of the key.
    pub keys: HashMap<String, KeyOverride>,
}

/// Parses a duration like `500ms`, `10s`, `1m`, `1h`, `1d`.
#[must_use]
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let millis = match unit.trim() {
        "ms" => number,
        "s" => number.checked_mul(1_000)?,
        "m" => number.checked_mul(60_000)?,
        "h" => number.checked_mul(3_600_000)?,
        "d" => number.checked_mul(86_400_000)?,
        _ => return None,
    };
    (millis > 0).then(|| Duration::from_millis(millis))
}

fn duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).ok_or_else(|| {
        invalid(
            field,
            format!("`{text}` is not a duration (a positive whole number with ms, s, m, h or d)"),
        )
    })
}

fn socket_addr(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(field, format!("`{text}` is not an IP:port address")))
}

fn cidr(field: &str, text: &str) -> Result<IpNet, ConfigError> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| invalid(field, format!("`{text}` is not an IP address or CIDR")))
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string().trim().into()))?;
        raw.validate()
    }

    /// The settings that differ from `running` but take effect only on
    /// restart (a reload applies everything else and logs these).
    #[must_use]
    pub fn needs_restart(&self, running: &Self) -> Vec<&'static str> {
        [
            ("server.listen", self.listen != running.listen),
            ("admin.listen", self.admin_listen != running.admin_listen),
            ("server.tls_cert/tls_key", self.tls != running.tls),
            (
                "server.max_header_bytes",
                self.max_header_bytes != running.max_header_bytes,
            ),
            (
                "server.max_connections",
                self.max_connections != running.max_connections,
            ),
            ("store", self.store != running.store),
            ("store.max_buckets", self.max_buckets != running.max_buckets),
            (
                "identity.verified_keys_max",
                self.verified_keys_max != running.verified_keys_max,
            ),
            (
                "identity.verified_key_ttl",
                self.verified_key_ttl != running.verified_key_ttl,
            ),
            ("xdp.enabled", self.xdp.enabled != running.xdp.enabled),
            (
                "xdp.interfaces",
                self.xdp.interfaces != running.xdp.interfaces,
            ),
            ("xdp.instance", self.xdp.instance != running.xdp.instance),
            ("xdp.persist", self.xdp.persist != running.xdp.persist),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// The tier table as a route table (tier indexes into `tiers`).
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

impl RawConfig {
    #[expect(
        clippy::too_many_lines,
        reason = "one flat pass over the sections reads better than a helper per field"
    )]
    fn validate(self) -> Result<Config, ConfigError> {
        let server = self.server;
        let listen = socket_addr("server.listen", &server.listen)?;
        let upstream: http::Uri = server.upstream.parse().map_err(|_| {
            invalid(
                "server.upstream",
                format!("`{}` is not a URL", server.upstream),
            )
        })?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            return Err(invalid(
                "server.upstream",
                format!("`{}` must be an http://host:port URL", server.upstream),
            ));
        }
        let trusted_proxies = server
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, t)| cidr(&format!("server.trusted_proxies[{i}]"), t))
            .collect::<Result<_, _>>()?;
        let tls = match (server.tls_cert, server.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("server.tls_key", "required with tls_cert")),
            (None, Some(_)) => return Err(invalid("server.tls_cert", "required with tls_key")),
        };
        let path_policy = match server.upstream_paths.as_deref() {
            None | Some("lenient") => PathPolicy::Lenient,
            Some("strict") => PathPolicy::Strict,
            Some(other) => {
                return Err(invalid(
                    "server.upstream_paths",
                    format!("`{other}` is not \"lenient\" or \"strict\""),
                ));
            }
        };
        if server.max_header_bytes < 1024 {
            return Err(invalid("server.max_header_bytes", "must be at least 1024"));
        }
        if server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if server.max_connections_per_source == 0 {
            return Err(invalid(
                "server.max_connections_per_source",
                "must be at least 1",
            ));
        }
        let max_connections_per_proxy = server
            .max_connections_per_proxy
            .unwrap_or(server.max_connections);
        if max_connections_per_proxy == 0 {
            return Err(invalid(
                "server.max_connections_per_proxy",
                "must be at least 1",
            ));
        }
        let api_key_headers = self
            .identity
            .api_key_headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    invalid(
                        format!("identity.api_key_headers[{i}]"),
                        format!("`{h}` is not a header name"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        if self.identity.ipv6_prefix == 0 || self.identity.ipv6_prefix > 128 {
            return Err(invalid("identity.ipv6_prefix", "must be between 1 and 128"));
        }
        let client_ip_header = http::HeaderName::from_bytes(
            self.identity
                .client_ip_header
                .to_ascii_lowercase()
                .as_bytes(),
        )
        .map(ClientIpHeader::new)
        .map_err(|_| {
            invalid(
                "identity.client_ip_header",
                format!("`{}` is not a header name", self.identity.client_ip_header),
            )
        })?;
        let verify_keys = match self.identity.verify_keys.as_str() {
            "upstream" => KeyVerification::Upstream,
            "config" => KeyVerification::Config,
            "none" => KeyVerification::Off,
            other => {
                return Err(invalid(
                    "identity.verify_keys",
                    format!("`{other}` is not \"upstream\", \"config\" or \"none\""),
                ));
            }
        };
        if self.identity.verified_keys_max == 0 {
            return Err(invalid("identity.verified_keys_max", "must be at least 1"));
        }
        let verified_key_ttl =
            duration("identity.verified_key_ttl", &self.identity.verified_key_ttl)?;
        let (on_error, max_buckets) = (self.store.on_error.clone(), self.store.max_buckets);
        let store = match self.store.kind.as_str() {
            "memory" => StoreKind::Memory,
            "redis" => StoreKind::Redis(redis_settings(self.store)?),
            other => {
                return Err(invalid(
                    "store.kind",
                    format!("`{other}` is not \"memory\" or \"redis\""),
                ));
            }
        };
        let on_error = match on_error.as_str() {
            "allow" => OnError::Allow,
            "deny" => OnError::Deny,
            other => {
                return Err(invalid(
                    "store.on_error",
                    format!("`{other}` is not \"allow\" or \"deny\""),
                ));
            }
        };
        if max_buckets == 0 {
            return Err(invalid("store.max_buckets", "must be at least 1"));
        }
        let xdp = self.xdp;
        if !matches!(xdp.mode.as_str(), "enforce" | "observe") {
            return Err(invalid(
                "xdp.mode",
                format!("`{}` is not \"enforce\" or \"observe\"", xdp.mode),
            ));
        }
        if xdp.ports.len() > limiter_common::MAX_PORTS || xdp.ports.contains(&0) {
            return Err(invalid(
                "xdp.ports",
                format!("at most {} non-zero ports", limiter_common::MAX_PORTS),
            ));
        }
        for (i, a) in xdp.allow.iter().enumerate() {
            cidr(&format!("xdp.allow[{i}]"), a)?;
        }
        if !valid_instance(&xdp.instance) {
            return Err(invalid(
                "xdp.instance",
                "use 1 to 64 letters, digits, `-` or `_`",
            ));
        }
        if xdp.ban_seconds == 0 {
            return Err(invalid("xdp.ban_seconds", "must be at least 1"));
        }
        if xdp.max_ban_seconds < xdp.ban_seconds {
            return Err(invalid(
                "xdp.max_ban_seconds",
                "must be at least xdp.ban_seconds",
            ));
        }
        if self.tier.is_empty() {
            return Err(invalid("tier", "at least one [[tier]] is required"));
        }
        let tiers = self
            .tier
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Ok(Tier {
                    route: t.route.clone(),
                    limit: NonZeroU32::new(t.limit)
                        .ok_or_else(|| invalid(format!("tier[{i}].limit"), "must be at least 1"))?,
                    window: duration(&format!("tier[{i}].window"), &t.window)?,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let mut config = Config {
            listen,
            upstream,
            trusted_proxies,
            tls,
            ietf_headers: server.ietf_headers,
            path_policy,
            upstream_timeout: duration("server.upstream_timeout", &server.upstream_timeout)?,
            header_read_timeout: duration(
                "server.header_read_timeout",
                &server.header_read_timeout,
            )?,
            body_read_timeout: duration("server.body_read_timeout", &server.body_read_timeout)?,
            max_header_bytes: server.max_header_bytes,
            max_connections: server.max_connections,
            idle_timeout: duration("server.idle_timeout", &server.idle_timeout)?,
            max_connections_per_source: server.max_connections_per_source,
            max_connections_per_proxy,
            admin_listen: socket_addr("admin.listen", &self.admin.listen)?,
            api_key_headers,
            ipv6_prefix: self.identity.ipv6_prefix,
            client_ip_header,
            verify_keys,
            verified_keys_max: self.identity.verified_keys_max,
            verified_key_ttl,
            store,
            on_error,
            max_buckets,
            xdp,
            tiers,
            keys: HashMap::new(),
        };
        // Compiling the table here rejects ambiguous tables at load time.
        config.route_table()?;
        config.keys = validate_keys(&self.key, &config.tiers, config.path_policy)?;
        Ok(config)
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn redact(url: &str) -> String {
            match (url.find("://"), url.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    format!("{}***{}", &url[..scheme + 3], &url[at..])
                }
                _ => url.to_owned(),
            }
        }
        f.debug_struct("RedisSettings")
            .field("url", &self.url.as_deref().map(redact))
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|u| redact(u))
                    .collect::<Vec<_>>(),
            )
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .finish()
    }
}

/// The `[store]` keys of `kind = "redis"`.
fn redis_settings(raw: RawStore) -> Result<RedisSettings, ConfigError> {
    if raw.url.is_none() && raw.cluster_nodes.is_empty() {
        return Err(invalid(
            "store.url",
            "required with kind = \"redis\" (or give store.cluster_nodes)",
        ));
    }
    if let Some(url) = &raw.url {
        redis_url("store.url", url)?;
    }
    for (i, node) in raw.cluster_nodes.iter().enumerate() {
        redis_url(&format!("store.cluster_nodes[{i}]"), node)?;
    }
    if raw.key_prefix.contains(['{', '}']) {
        return Err(invalid(
            "store.key_prefix",
            "must not contain `{` or `}` (the store adds the hash tag itself)",
        ));
    }
    if raw.breaker_failures == 0 {
        return Err(invalid("store.breaker_failures", "must be at least 1"));
    }
    Ok(RedisSettings {
        url: raw.url,
        cluster_nodes: raw.cluster_nodes,
        key_prefix: raw.key_prefix,
        timeout: duration("store.timeout", &raw.timeout)?,
        breaker_failures: raw.breaker_failures,
        breaker_cooldown: duration("store.breaker_cooldown", &raw.breaker_cooldown)?,
    })
}

fn redis_url(field: &str, url: &str) -> Result<(), ConfigError> {
    use redis::IntoConnectionInfo as _;
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(invalid(
            field,
            format!("`{url}` is not a redis:// or rediss:// URL"),
        ));
    }
    url.into_connection_info()
        .map(drop)
        .map_err(|e| invalid(field, format!("`{url}`: {e}")))
}

fn validate_keys(
    keys: &[RawKey],
    tiers: &[Tier],
    policy: PathPolicy,
) -> Result<HashMap<String, KeyOverride>, ConfigError> {
    let canonical_routes: Vec<Option<String>> = tiers
        .iter()
        .map(|t| crate::route::canonicalize(&t.route, policy).ok())
        .collect();
    let mut out = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let field = |name: &str| format!("key[{i}].{name}");
        let hash = key.key_sha256.to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(field("key_sha256"), "must be 64 hex digits"));
        }
        if let Some(m) = key.multiplier
            && !(m.is_finite() && m > 0.0)
        {
            return Err(invalid(field("multiplier"), "must be a positive number"));
        }
        let mut limits = HashMap::new();
        for (route, limit) in &key.limits {
            let canonical = crate::route::canonicalize(route, policy)
                .map_err(|e| invalid(field("limits"), format!("`{route}`: {e}")))?;
            let tier = canonical_routes
                .iter()
                .position(|r| r.as_deref() == Some(canonical.as_str()))
                .ok_or_else(|| {
                    invalid(
                        field("limits"),
                        format!("`{route}` is not the route of a [[tier]]"),
                    )
                })?;
            let limit = NonZeroU32::new(*limit).ok_or_else(|| {
                invalid(field("limits"), format!("`{route}`: must be at least 1"))
            })?;
            limits.insert(tier, limit);
        }
        if out
            .insert(
                hash,
                KeyOverride {
                    multiplier: key.multiplier,
                    limits,
                },
            )
            .is_some()
        {
            return Err(invalid(field("key_sha256"), "listed twice"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[server]\nlisten = \"127.0.0.1:8080\"\n[[tier]]\nroute = \"/api/chat\"\nlimit = 10\nwindow = \"1m\"\n";

    fn error(text: &str) -> String {
        Config::parse(text)
            .expect_err("config must be refused")
            .to_string()
    }

    #[test]
    fn identity_settings_parse_and_default_safe() {
        let config = Config::parse(MINIMAL).unwrap();
        assert_eq!(config.verify_keys, KeyVerification::Upstream);
        assert_eq!(
            config.client_ip_header,
            ClientIpHeader::List(http::HeaderName::from_static("x-forwarded-for"))
        );
        let config = Config::parse(&format!(
            "{MINIMAL}[identity]\nclient_ip_header = \"Forwarded\"\nverify_keys = \"none\"\n"
        ))
        .unwrap();
        assert_eq!(config.client_ip_header, ClientIpHeader::Forwarded);
        assert_eq!(config.verify_keys, KeyVerification::Off);
        assert!(
            error(&format!("{MINIMAL}[identity]\nverify_keys = \"maybe\"\n"))
                .contains("identity.verify_keys")
        );
        assert!(
            error(&format!(
                "{MINIMAL}[identity]\nclient_ip_header = \"a b\"\n"
            ))
            .contains("identity.client_ip_header")
        );
    }

    #[test]
    fn a_reload_names_every_setting_that_needs_a_restart() {
        let running = Config::parse(MINIMAL).unwrap();
        assert!(running.needs_restart(&running).is_empty());
        let changed = Config::parse(&MINIMAL.replace(
            "[[tier]]",
            "max_connections = 5\nmax_header_bytes = 2048\n[store]\nmax_buckets = 64\non_error = \"deny\"\n[[tier]]",
        ))
        .unwrap();
        assert_eq!(
            changed.needs_restart(&running),
            [
                "server.max_header_bytes",
                "server.max_connections",
                "store.max_buckets"
            ]
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(config.ipv6_prefix, 64);
        assert_eq!(config.store, StoreKind::Memory);
        assert_eq!(config.on_error, OnError::Allow);
        assert_eq!(config.tiers[0].window, Duration::from_mins(1));
        assert_eq!(config.tiers[0].limit.get(), 10);
        assert!(config.xdp.enabled);
    }

    #[test]
    fn connection_settings_default_to_a_cap_per_source_and_proxies_exempt() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.idle_timeout, Duration::from_mins(1));
        assert_eq!(config.max_connections_per_source, 100);
        assert_eq!(config.max_connections_per_proxy, config.max_connections);
        let set = Config::parse(&MINIMAL.replace(
            "[[tier]]",
            "idle_timeout = \"5s\"\nmax_connections = 50\nmax_connections_per_source = 4\n\
             max_connections_per_proxy = 20\n[[tier]]",
        ))
        .expect("valid");
        assert_eq!(set.idle_timeout, Duration::from_secs(5));
        assert_eq!(
            (
                set.max_connections_per_source,
                set.max_connections_per_proxy
            ),
            (4, 20)
        );
        let with = |line: &str| MINIMAL.replace("[[tier]]", &format!("{line}\n[[tier]]"));
        assert!(error(&with("idle_timeout = \"0s\"")).contains("server.idle_timeout"));
        assert!(
            error(&with("max_connections_per_source = 0"))
                .contains("server.max_connections_per_source")
        );
        assert!(
            error(&with("max_connections_per_proxy = 0"))
                .contains("server.max_connections_per_proxy")
        );
    }

    #[test]
    fn redis_store_gets_defaults() {
        let text = format!("{MINIMAL}[store]\nkind = \"redis\"\nurl = \"rediss://cache:6380\"\n");
        let StoreKind::Redis(redis) = Config::parse(&text).expect("valid").store else {
            panic!("kind = \"redis\" must give the Redis store");
        };
        assert_eq!(redis.url.as_deref(), Some("rediss://cache:6380"));
        assert!(redis.cluster_nodes.is_empty());
        assert_eq!(redis.key_prefix, "limiter:");
        assert_eq!(redis.timeout, Duration::from_millis(50));
        assert_eq!(redis.breaker_failures, 5);
        assert_eq!(redis.breaker_cooldown, Duration::from_secs(1));
        let cluster = format!(
            "{MINIMAL}[store]\nkind = \"redis\"\ncluster_nodes = [\"redis://a:7000\", \"redis://b:7001\"]\n"
        );
        let StoreKind::Redis(redis) = Config::parse(&cluster).expect("valid").store else {
            panic!("kind = \"redis\" must give the Redis store");
        };
        assert_eq!(redis.url, None);
        assert_eq!(redis.cluster_nodes.len(), 2);
        let secret = format!(
            "{MINIMAL}[store]\nkind = \"redis\"\nurl = \"redis://user:hunter2@cache:6379/0\"\n"
        );
        let shown = format!("{:?}", Config::parse(&secret).expect("valid").store);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://***@cache:6379/0"), "{shown}");
    }

    #[test]
    fn reference_example_is_valid() {
        let text = include_str!("../../examples/concurred.toml");
        let config = Config::parse(text).expect("examples/concurred.toml is valid");
        assert_eq!(config.tiers.len(), 8);
        let shared = Config::parse(include_str!("../../examples/several-hosts.toml"))
            .expect("examples/several-hosts.toml is valid");
        assert_eq!(shared.tiers, config.tiers, "the same reference table");
        assert!(matches!(shared.store, StoreKind::Redis(_)));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_mins(1)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_hours(1)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("1w"), None);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(error("").contains("server"));
        assert!(error("[server]\nlisten = \"127.0.0.1:8080\"\n").contains("[[tier]]"));
        assert!(error(&MINIMAL.replace("10\n", "0\n")).contains("tier[0].limit"));
        assert!(error(&MINIMAL.replace("1m", "soon")).contains("tier[0].window"));
        assert!(error(&MINIMAL.replace("127.0.0.1:8080", "nowhere")).contains("server.listen"));
        assert!(error(&format!("{MINIMAL}[store]\nkind = \"disk\"\n")).contains("store.kind"));
        assert!(error(&format!("{MINIMAL}[store]\nkind = \"redis\"\n")).contains("store.url"));
        let redis =
            format!("{MINIMAL}[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n");
        assert!(error(&redis.replace("redis://", "http://")).contains("store.url"));
        assert!(error(&format!("{redis}timeout = \"fast\"\n")).contains("store.timeout"));
        assert!(error(&format!("{redis}key_prefix = \"a{{b}}:\"\n")).contains("store.key_prefix"));
        assert!(
            error(&format!("{redis}breaker_failures = 0\n")).contains("store.breaker_failures")
        );
        assert!(
            error(&format!(
                "{redis}cluster_nodes = [\"redis://a:1\", \"b:2\"]\n"
            ))
            .contains("store.cluster_nodes[1]")
        );
        assert!(error(&format!("{MINIMAL}[xdp]\nmode = \"block\"\n")).contains("xdp.mode"));
        assert!(error(&format!("{MINIMAL}[xdp]\nallow = [\"x\"]\n")).contains("xdp.allow[0]"));
        assert!(error(&format!("{MINIMAL}[identity]\nipv6_prefix = 0\n")).contains("ipv6_prefix"));
        assert!(error(&MINIMAL.replace("listen", "lisen")).contains("lisen"));
        let ambiguous =
            format!("{MINIMAL}[[tier]]\nroute = \"/api/chat\"\nlimit = 5\nwindow = \"1s\"\n");
        assert!(error(&ambiguous).contains("tier"));
    }

    #[test]
    fn key_overrides_resolve_routes_to_tiers() {
        let text = format!(
            "{MINIMAL}[[key]]\nkey_sha256 = \"{}\"\nlimits = {{ \"/api/chat\" = 100 }}\n",
            "ab".repeat(32)
        );
        let config = Config::parse(&text).expect("valid");
        let key = &config.keys[&"ab".repeat(32)];
        assert_eq!(key.limits[&0].get(), 100);
        let bad = format!(
            "{MINIMAL}[[key]]\nkey_sha256 = \"{}\"\nlimits = {{ \"/nope\" = 1 }}\n",
            "ab".repeat(32)
        );
        assert!(error(&bad).contains("key[0].limits"));
        let short = format!("{MINIMAL}[[key]]\nkey_sha256 = \"abc\"\nmultiplier = 2\n");
        assert!(error(&short).contains("key[0].key_sha256"));
    }
}
