//! The validated configuration: typed values only, split into what the
//! process takes once at start ([`StartupSettings`]) and what a reload applies
//! ([`LiveSettings`]).

use std::{collections::HashMap, net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use super::envoy::EnvoyDomain;
use crate::{identity::ClientIpHeader, limit::RedisSettings, net::Networks, route::PathPolicy};

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Taken once, at start; a reload logs what changed here and keeps these.
    pub startup: StartupSettings,
    /// Everything a reload applies.
    pub live: LiveSettings,
}

/// Declares settings that need a restart, each beside the file key that names
/// it, and generates `changed` from that one list: a field cannot be added
/// without saying how a reload reports its change. `nested` fields are such
/// structs themselves and report their own keys.
macro_rules! restart_settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* $field:ident : $ty:ty => $key:tt, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $name {
            /// The file keys of the settings that differ from `running`, in
            /// declaration order.
            #[must_use]
            pub fn changed(&self, running: &Self) -> Vec<&'static str> {
                let mut changed = Vec::new();
                $( restart_settings!(@diff changed, self.$field, running.$field, $key); )*
                changed
            }
        }
    };
    (@diff $out:ident, $new:expr, $old:expr, nested) => {
        $out.extend($new.changed(&$old))
    };
    (@diff $out:ident, $new:expr, $old:expr, $key:literal) => {
        if $new != $old {
            $out.push($key);
        }
    };
}

restart_settings! {
    /// Sockets, TLS, store and table sizes, and where XDP attaches: all fixed
    /// for the life of the process.
    pub struct StartupSettings {
        listen: SocketAddr => "server.listen",
        admin_listen: SocketAddr => "admin.listen",
        /// Serve the live page at `/` (and sample for it).
        dashboard: bool => "admin.dashboard",
        /// This host's name in the fleet: the origin of its bans and changes.
        node: String => "admin.node",
        /// Where runtime changes persist when the store is in memory.
        state_file: PathBuf => "admin.state_file",
        /// The admin listener's certificate chain and key files.
        admin_tls: Option<(PathBuf, PathBuf)> => "admin.tls_cert/tls_key",
        /// Certificate chain and key files.
        tls: Option<(PathBuf, PathBuf)> => "server.tls_cert/tls_key",
        max_header_bytes: usize => "server.max_header_bytes",
        max_connections: usize => "server.max_connections",
        max_concurrent_streams: u32 => "server.max_concurrent_streams",
        max_requests_in_flight: usize => "server.max_requests_in_flight",
        max_upstream_connections: usize => "server.max_upstream_connections",
        store: StoreKind => "store",
        max_buckets: usize => "store.max_buckets",
        /// (key, tier) verifications remembered at most.
        verified_keys_max: usize => "identity.verified_keys_max",
        /// How long an upstream's acceptance of a key is trusted.
        verified_key_ttl: Duration => "identity.verified_key_ttl",
        /// Envoy's rate limit service listener; `None` = not served.
        rls_listen: Option<SocketAddr> => "rls.listen",
        rls_tls: Option<(PathBuf, PathBuf)> => "rls.tls_cert/tls_key",
        xdp: XdpAttach => nested,
    }
}

restart_settings! {
    /// `[xdp]`: whether and where the program is attached.
    pub struct XdpAttach {
        enabled: bool => "xdp.enabled",
        interfaces: Vec<String> => "xdp.interfaces",
        /// Names the pin directory `/sys/fs/bpf/limiter/<instance>/`.
        instance: String => "xdp.instance",
        /// Leave the program attached (links pinned) when the agent exits.
        persist: bool => "xdp.persist",
    }
}

/// What a reload swaps in whole: upstream, identity rules, timeouts, per-source
/// caps, tiers and overrides, and the kernel's policy.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    pub upstream: http::Uri,
    pub trusted_proxies: Networks,
    pub ietf_headers: bool,
    pub path_policy: PathPolicy,
    pub upstream_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_read_timeout: Duration,
    /// With no request in flight (HTTP/1 between requests, HTTP/2 with no
    /// open stream; pings are not requests), how long a connection stays open.
    pub idle_timeout: Duration,
    /// Connections one source (IPv4 address, IPv6 `ipv6_prefix`) may hold.
    pub max_connections_per_source: usize,
    /// Connections one trusted proxy may hold (it carries many clients).
    pub max_connections_per_proxy: usize,
    /// Longest an answer may wait for the client to take its next piece
    /// (a shut HTTP/2 window, a full socket buffer): then the connection is cut.
    pub send_timeout: Duration,
    /// Bytes per second a request body must average once it has had
    /// `body_read_timeout` of waiting (a body trickled in stalls past it).
    pub body_min_rate: u64,
    /// Requests one client address (behind trusted proxies, the forwarded
    /// one; IPv6 grouped by `ipv6_prefix`) may have in flight to the upstream.
    pub max_requests_in_flight_per_source: usize,
    /// Longest a request waits for an upstream connection when
    /// `max_upstream_connections` are all busy: then 503.
    pub upstream_wait: Duration,
    pub api_key_headers: Vec<http::HeaderName>,
    pub ipv6_prefix: u8,
    pub client_ip_header: ClientIpHeader,
    pub verify_keys: KeyVerification,
    pub on_error: OnError,
    pub xdp: XdpPolicy,
    /// `[rls]`: how Envoy's descriptors are read.
    pub rls: RlsPolicy,
    pub tiers: Vec<Tier>,
    /// Overrides by lowercase hex SHA-256 of the key.
    pub keys: HashMap<String, KeyOverride>,
    /// Who may use the admin API (none: reads open, writes refused); a
    /// reload re-reads the file, so a token is revoked without a restart.
    pub admin_tokens: AdminTokens,
}

/// `[rls]`'s live part: the domain mapped onto the tiers, who may call, and
/// the domains read from envoyproxy/ratelimit config files.
#[derive(Debug, Clone, PartialEq)]
pub struct RlsPolicy {
    pub domain: String,
    pub clients: Networks,
    pub envoy: Vec<EnvoyDomain>,
    /// The secret every call must carry (`secret_file`, read at start and
    /// on reload). Without one, calls are counted but never escalate to a
    /// kernel ban: any local user could otherwise name an address to ban.
    pub secret: Option<RlsSecret>,
}

/// The RLS callers' shared secret; never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct RlsSecret(Vec<u8>);

impl RlsSecret {
    /// Shortest secret accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    #[must_use]
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Whether `offered` is the secret, in time that does not depend on
    /// where the two first differ.
    #[must_use]
    pub fn matches(&self, offered: &[u8]) -> bool {
        if offered.len() != self.0.len() {
            return false;
        }
        offered
            .iter()
            .zip(&self.0)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for RlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RlsSecret(***)")
    }
}

/// `[admin] token_file`: the admin API's bearer tokens, each with the name
/// its changes are recorded under; never shown.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminTokens(Vec<(String, RlsSecret)>);

impl AdminTokens {
    /// Shortest token accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    #[must_use]
    pub fn new(tokens: Vec<(String, Vec<u8>)>) -> Self {
        Self(
            tokens
                .into_iter()
                .map(|(name, token)| (name, RlsSecret::new(token)))
                .collect(),
        )
    }

    /// Whether any token is configured (without one, writes are refused).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of the token `offered` is, comparing with every token in
    /// time that does not depend on where they differ.
    #[must_use]
    pub fn who(&self, offered: &[u8]) -> Option<&str> {
        let mut found = None;
        for (name, token) in &self.0 {
            if token.matches(offered) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| format!("{name}:***")))
            .finish()
    }
}

/// `[xdp]`: what the attached program enforces (a reload pushes it into the maps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpPolicy {
    pub mode: XdpMode,
    /// The API ports; empty = the listen port.
    pub ports: Vec<u16>,
    /// 0 = derived from the tier table.
    pub max_packets_per_second: u32,
    /// 0 = derived from the tier table.
    pub max_syns_per_second: u32,
    /// 0 = the bucket's own limit, at least 10.
    pub escalate_after_rejections: u32,
    /// Sources the kernel may start tracking per second, all CPUs together;
    /// 0 = derived from the per-source map's capacity.
    pub max_new_sources_per_second: u32,
    pub ban_seconds: u64,
    /// Never counted or banned.
    pub allow: Networks,
    /// Escalate clients identified by API key to a ban of their source address
    /// (off: behind a shared NAT that would ban everyone else too).
    pub ban_keyed_clients: bool,
    /// Cap on an escalation ban, which doubles with each repeat offence.
    pub max_ban_seconds: u64,
    /// Consecutive seconds over a ceiling before the kernel bans a source itself.
    pub autoban_after_seconds: u16,
    /// While the new-source budget is spent, answer unknown sources' SYNs
    /// with the SYN challenge (`limiter_common::challenge`) instead of
    /// dropping them.
    pub syn_challenge: bool,
    /// Challenge SYN-ACKs the kernel may send per second, all CPUs
    /// together; 0 = derived from the probation map's capacity.
    pub max_syn_acks_per_second: u32,
}

/// `[xdp] mode`: whether the program drops what it would drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Drop over-ceiling and banned packets.
    Enforce,
    /// Count what would be dropped, pass everything.
    Observe,
}

/// Whether a tier's rejections are sent (`[server] mode`, `[[tier]] mode`);
/// ordered so that a dry run asked for anywhere wins (`max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LimitMode {
    /// Over the limit: 429.
    Enforce,
    /// Dry run: decide and count as usual, send the limit headers, but
    /// forward what would be rejected and never escalate; counted as
    /// `decision="would_reject"`.
    Observe,
}

/// One rate-limit tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub route: String,
    pub limit: NonZeroU32,
    pub window: Duration,
    /// Its own mode, or observe when the whole agent observes.
    pub mode: LimitMode,
    /// Requests of one client in flight on the tier at once.
    pub max_in_flight: Option<NonZeroU32>,
    /// Units one request is worth (at most `limit`).
    pub cost: NonZeroU32,
    /// The upstream's answer header reporting a request's cost: charged
    /// beyond `cost` when more, and taken out before the client sees it.
    pub cost_header: Option<http::HeaderName>,
    /// `[tier.tokens]`: a token budget beside the request limit.
    pub tokens: Option<TokenBudget>,
    /// How the tier's buckets count; a GCRA burst is for the tier's own
    /// limit (a key's override scales it).
    pub algorithm: crate::limit::Algorithm,
}

impl Tier {
    /// How long the tier's buckets live after their last change when
    /// nothing renews them, which groups them in the store's expiry queues
    /// (see [`crate::limit::Algorithm::bucket_span_ms`]).
    #[must_use]
    pub fn bucket_span(&self) -> Duration {
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.algorithm.bucket_span_ms(self.limit.get(), window_ms))
    }
}

/// `[tier.tokens]`: tokens per window per client, reserved at admission
/// and settled from the answer's `usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBudget {
    pub limit: NonZeroU32,
    pub window: Duration,
    pub reserve: Reserve,
    /// The completion bound held when a request names none.
    pub default_max_tokens: u32,
    /// The prompt estimate's divisor: request body bytes per token held.
    pub prompt_bytes_per_token: NonZeroU32,
    /// The `usage` fields whose sum a request is settled at.
    pub usage: Vec<UsageField>,
    /// Largest request body read to find `max_tokens`; larger: 413.
    pub max_request_bytes: usize,
}

/// What a request holds of its client's token budget until it is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Its completion bound (`max_completion_tokens`, `max_tokens`, else
    /// `default_max_tokens`) times `n`, plus the prompt estimate.
    MaxTokens,
    /// A fixed number of tokens.
    Fixed(u32),
}

/// A field of an OpenAI `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageField {
    Total,
    Prompt,
    Completion,
}

impl UsageField {
    /// The field's name in `usage`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Total => "total_tokens",
            Self::Prompt => "prompt_tokens",
            Self::Completion => "completion_tokens",
        }
    }
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

impl Config {
    /// The settings that differ from `running` but take effect only on
    /// restart (a reload applies everything else and logs these).
    #[must_use]
    pub fn needs_restart(&self, running: &Self) -> Vec<&'static str> {
        self.startup.changed(&running.startup)
    }

    /// What a reload puts in force: this file's live settings on the running
    /// process's startup settings.
    #[must_use]
    pub fn reloaded_onto(self, running: &Self) -> Self {
        Self {
            startup: running.startup.clone(),
            live: self.live,
        }
    }
}
