//! From the file's shape to the typed [`Config`]: every check, each error
//! naming the field at fault.

mod tiers;

use std::{collections::HashMap, net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use super::{
    ConfigError,
    envoy::EnvoyDomain,
    invalid,
    model::{
        AdminTokens, Config, KeyOverride, KeyVerification, LimitMode, LiveSettings, OnError,
        RlsPolicy, RlsSecret, StartupSettings, StoreKind, Tier, XdpAttach, XdpMode, XdpPolicy,
    },
    raw::{RawConfig, RawKey, RawRls, RawServer, RawStore, RawXdp},
    valid_instance,
};
use crate::{
    identity::ClientIpHeader,
    limit::RedisSettings,
    net::Networks,
    route::{PathPolicy, canonicalize},
};

impl RawConfig {
    #[expect(
        clippy::too_many_lines,
        reason = "one struct literal per settings half, each field beside its check"
    )]
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let server = self.server;
        let listen = socket_addr(
            "server.listen",
            server
                .listen
                .as_deref()
                .ok_or_else(|| invalid("server.listen", "required"))?,
        )?;
        let upstream = upstream("server.upstream", &server.upstream)?;
        let trusted_proxies = networks("server.trusted_proxies", &server.trusted_proxies)?;
        let tls = tls(server.tls_cert.clone(), server.tls_key.clone())?;
        let path_policy = one_of(
            "server.upstream_paths",
            server.upstream_paths.as_deref().unwrap_or("lenient"),
            &[
                ("lenient", PathPolicy::Lenient),
                ("strict", PathPolicy::Strict),
            ],
        )?;
        if server.max_header_bytes < 1024 {
            return Err(invalid("server.max_header_bytes", "must be at least 1024"));
        }
        let (per_source, per_proxy) = connection_caps(&server)?;
        let identity = self.identity;
        let api_key_headers = identity
            .api_key_headers
            .iter()
            .enumerate()
            .map(|(i, h)| header_name(&format!("identity.api_key_headers[{i}]"), h))
            .collect::<Result<_, _>>()?;
        if identity.ipv6_prefix == 0 || identity.ipv6_prefix > 128 {
            return Err(invalid("identity.ipv6_prefix", "must be between 1 and 128"));
        }
        let client_ip_header = header_name("identity.client_ip_header", &identity.client_ip_header)
            .map(ClientIpHeader::new)?;
        let verify_keys = one_of(
            "identity.verify_keys",
            &identity.verify_keys,
            &[
                ("upstream", KeyVerification::Upstream),
                ("config", KeyVerification::Config),
                ("none", KeyVerification::Off),
            ],
        )?;
        if identity.verified_keys_max == 0 {
            return Err(invalid("identity.verified_keys_max", "must be at least 1"));
        }
        let verified_key_ttl = duration("identity.verified_key_ttl", &identity.verified_key_ttl)?;
        let max_buckets = self.store.max_buckets;
        let (store, on_error) = store(self.store)?;
        let (xdp_attach, xdp_policy) = xdp(self.xdp)?;
        let agent_mode = limit_mode("server.mode", &server.mode)?;
        let tiers = tiers::tiers(&self.tier, agent_mode)?;
        let (rls_listen, rls_tls, rls) = rls(self.rls)?;
        let mut live = LiveSettings {
            upstream,
            trusted_proxies,
            ietf_headers: server.ietf_headers,
            path_policy,
            upstream_timeout: duration("server.upstream_timeout", &server.upstream_timeout)?,
            header_read_timeout: duration(
                "server.header_read_timeout",
                &server.header_read_timeout,
            )?,
            body_read_timeout: duration("server.body_read_timeout", &server.body_read_timeout)?,
            idle_timeout: duration("server.idle_timeout", &server.idle_timeout)?,
            max_connections_per_source: per_source,
            max_connections_per_proxy: per_proxy,
            send_timeout: duration("server.send_timeout", &server.send_timeout)?,
            body_min_rate: server.body_min_rate,
            max_requests_in_flight_per_source: at_least_one(
                "server.max_requests_in_flight_per_source",
                server.max_requests_in_flight_per_source,
            )?,
            upstream_wait: duration("server.upstream_wait", &server.upstream_wait)?,
            api_key_headers,
            ipv6_prefix: identity.ipv6_prefix,
            client_ip_header,
            verify_keys,
            on_error,
            xdp: xdp_policy,
            rls,
            tiers,
            keys: HashMap::new(),
            admin_tokens: AdminTokens::default(),
        };
        windows(&live, verified_key_ttl)?;
        // Compiling the table here rejects ambiguous tables at load time.
        live.route_table()?;
        live.keys = keys(&self.key, &live.tiers, live.path_policy)?;
        let admin_listen = socket_addr("admin.listen", &self.admin.listen)?;
        let admin_tokens = admin_tokens(self.admin.token_file.as_deref())?;
        let admin_tls = section_tls(
            "admin",
            self.admin.tls_cert.clone(),
            self.admin.tls_key.clone(),
        )?;
        admin_off_loopback(admin_listen, &admin_tokens, admin_tls.is_some())?;
        live.admin_tokens = admin_tokens;
        let startup = StartupSettings {
            listen,
            admin_listen,
            dashboard: self.admin.dashboard,
            node: node(self.admin.node.as_deref())?,
            state_file: self.admin.state_file.clone(),
            admin_tls,
            tls,
            max_header_bytes: server.max_header_bytes,
            max_connections: server.max_connections,
            max_concurrent_streams: u32::try_from(at_least_one(
                "server.max_concurrent_streams",
                server.max_concurrent_streams as usize,
            )?)
            .unwrap_or(u32::MAX),
            max_requests_in_flight: at_least_one(
                "server.max_requests_in_flight",
                server.max_requests_in_flight,
            )?,
            max_upstream_connections: at_least_one(
                "server.max_upstream_connections",
                server.max_upstream_connections,
            )?,
            store,
            max_buckets,
            verified_keys_max: identity.verified_keys_max,
            verified_key_ttl,
            rls_listen,
            rls_tls,
            xdp: xdp_attach,
        };
        Ok(Config { startup, live })
    }
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

pub(super) fn duration(field: &str, text: &str) -> Result<Duration, ConfigError> {
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

/// `[admin] token_file`: one token per line, `name:token` or a bare token
/// (named `admin`); blank lines and `#` comments skipped.
fn admin_tokens(path: Option<&std::path::Path>) -> Result<AdminTokens, ConfigError> {
    const FIELD: &str = "admin.token_file";
    let Some(path) = path else {
        return Ok(AdminTokens::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(FIELD, format!("reading {}: {e}", path.display())))?;
    let mut tokens: Vec<(String, Vec<u8>)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, token) = line.split_once(':').unwrap_or(("admin", line));
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
        if !name_ok {
            return Err(invalid(
                FIELD,
                format!(
                    "{} line {}: a name is 1 to 64 letters, digits, `-`, `_`, `.` or `@`",
                    path.display(),
                    n + 1
                ),
            ));
        }
        if token.len() < AdminTokens::MIN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                FIELD,
                format!(
                    "{} line {}: a token is at least {} visible ASCII characters",
                    path.display(),
                    n + 1,
                    AdminTokens::MIN_LEN
                ),
            ));
        }
        if tokens.iter().any(|(other, _)| other == name) {
            return Err(invalid(
                FIELD,
                format!("{} line {}: `{name}` named twice", path.display(), n + 1),
            ));
        }
        tokens.push((name.to_owned(), token.as_bytes().to_vec()));
    }
    if tokens.is_empty() {
        return Err(invalid(FIELD, format!("{} holds no token", path.display())));
    }
    Ok(AdminTokens::new(tokens))
}

/// An admin listener off loopback needs tokens (it changes limits and
/// bans) and TLS (the tokens must not cross the network in clear).
pub(super) fn admin_off_loopback(
    listen: SocketAddr,
    tokens: &AdminTokens,
    tls: bool,
) -> Result<(), ConfigError> {
    if listen.ip().is_loopback() {
        return Ok(());
    }
    if tokens.is_empty() {
        return Err(invalid(
            "admin.token_file",
            format!(
                "required when admin.listen ({listen}) is not a loopback address: \
                 the admin API changes limits and bans"
            ),
        ));
    }
    if !tls {
        return Err(invalid(
            "admin.tls_cert",
            format!(
                "required when admin.listen ({listen}) is not a loopback address: \
                 the admin tokens must not cross the network in clear"
            ),
        ));
    }
    Ok(())
}

/// `[admin] node`, or the host name.
pub(super) fn node(configured: Option<&str>) -> Result<String, ConfigError> {
    let name = match configured {
        Some(name) => name.to_owned(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
    };
    let name = if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    };
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(
            "admin.node",
            format!("`{name}`: use 1 to 64 letters, digits, `-`, `_` or `.`"),
        ));
    }
    Ok(name)
}

/// `field[i]` each parsed as `IP` or `IP/LEN`.
fn networks(field: &str, list: &[String]) -> Result<Networks, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, text)| {
            crate::net::parse_net(text).map_err(|e| invalid(format!("{field}[{i}]"), e.to_string()))
        })
        .collect()
}

/// The value named `text` among `choices`.
fn one_of<T: Copy>(field: &str, text: &str, choices: &[(&str, T)]) -> Result<T, ConfigError> {
    if let Some((_, value)) = choices.iter().find(|(name, _)| *name == text) {
        return Ok(*value);
    }
    let names: Vec<String> = choices
        .iter()
        .map(|(name, _)| format!("\"{name}\""))
        .collect();
    let listed = match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    };
    Err(invalid(field, format!("`{text}` is not {listed}")))
}

/// An `http://host:port` upstream (`--upstream` checks the same).
pub(super) fn upstream(field: &str, text: &str) -> Result<http::Uri, ConfigError> {
    let uri: http::Uri = text
        .parse()
        .map_err(|_| invalid(field, format!("`{text}` is not a URL")))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(invalid(
            field,
            format!("`{text}` must be an http://host:port URL"),
        ));
    }
    Ok(uri)
}

fn tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    section_tls("server", cert, key)
}

fn section_tls(
    section: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid(
            format!("{section}.tls_key"),
            "required with tls_cert",
        )),
        (None, Some(_)) => Err(invalid(
            format!("{section}.tls_cert"),
            "required with tls_key",
        )),
    }
}

/// `value`, refused when 0.
fn at_least_one(field: &str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 {
        return Err(invalid(field, "must be at least 1"));
    }
    Ok(value)
}

/// The per-source and per-proxy connection caps, after checking the total.
fn connection_caps(server: &RawServer) -> Result<(usize, usize), ConfigError> {
    if server.max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    if server.max_connections_per_source == 0 {
        return Err(invalid(
            "server.max_connections_per_source",
            "must be at least 1",
        ));
    }
    let per_proxy = server
        .max_connections_per_proxy
        .unwrap_or(server.max_connections);
    if per_proxy == 0 {
        return Err(invalid(
            "server.max_connections_per_proxy",
            "must be at least 1",
        ));
    }
    Ok((server.max_connections_per_source, per_proxy))
}

fn header_name(field: &str, text: &str) -> Result<http::HeaderName, ConfigError> {
    http::HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes())
        .map_err(|_| invalid(field, format!("`{text}` is not a header name")))
}

/// `[store]`: the store and what to do when it fails.
fn store(raw: RawStore) -> Result<(StoreKind, OnError), ConfigError> {
    let (on_error, max_buckets) = (raw.on_error.clone(), raw.max_buckets);
    let kind = if one_of(
        "store.kind",
        &raw.kind,
        &[("memory", false), ("redis", true)],
    )? {
        StoreKind::Redis(redis_settings(raw)?)
    } else {
        StoreKind::Memory
    };
    let on_error = one_of(
        "store.on_error",
        &on_error,
        &[("allow", OnError::Allow), ("deny", OnError::Deny)],
    )?;
    if max_buckets == 0 {
        return Err(invalid("store.max_buckets", "must be at least 1"));
    }
    Ok((kind, on_error))
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
        lease: {
            let lease = duration("store.lease", &raw.lease)?;
            // Renewed every third of it, on the 1 s housekeeping tick.
            if lease < Duration::from_secs(3) {
                return Err(invalid("store.lease", "must be at least 3s"));
            }
            lease
        },
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

/// Highest `[xdp] max_syn_acks_per_second`: a million 60-byte answers a
/// second (about 0.5 Gbit/s) is already a reflector, not a bound.
const MAX_SYN_ACKS_PER_SECOND: u32 = 1_000_000;

/// `[xdp]`: where the program attaches, and what it enforces.
fn xdp(raw: RawXdp) -> Result<(XdpAttach, XdpPolicy), ConfigError> {
    let mode = one_of(
        "xdp.mode",
        &raw.mode,
        &[("enforce", XdpMode::Enforce), ("observe", XdpMode::Observe)],
    )?;
    if raw.ports.len() > limiter_common::MAX_PORTS || raw.ports.contains(&0) {
        return Err(invalid(
            "xdp.ports",
            format!("at most {} non-zero ports", limiter_common::MAX_PORTS),
        ));
    }
    let allow = networks("xdp.allow", &raw.allow)?;
    if !valid_instance(&raw.instance) {
        return Err(invalid(
            "xdp.instance",
            "use 1 to 64 letters, digits, `-` or `_`",
        ));
    }
    if raw.ban_seconds == 0 {
        return Err(invalid("xdp.ban_seconds", "must be at least 1"));
    }
    if raw.max_ban_seconds < raw.ban_seconds {
        return Err(invalid(
            "xdp.max_ban_seconds",
            "must be at least xdp.ban_seconds",
        ));
    }
    if raw.max_syn_acks_per_second > MAX_SYN_ACKS_PER_SECOND {
        return Err(invalid(
            "xdp.max_syn_acks_per_second",
            format!(
                "at most {MAX_SYN_ACKS_PER_SECOND} (the cap bounds what the host reflects; 0 = derived)"
            ),
        ));
    }
    let attach = XdpAttach {
        enabled: raw.enabled,
        interfaces: raw.interfaces,
        instance: raw.instance,
        persist: raw.persist,
    };
    let policy = XdpPolicy {
        mode,
        ports: raw.ports,
        max_packets_per_second: raw.max_packets_per_second,
        max_syns_per_second: raw.max_syns_per_second,
        escalate_after_rejections: raw.escalate_after_rejections,
        max_new_sources_per_second: raw.max_new_sources_per_second,
        ban_seconds: raw.ban_seconds,
        allow,
        ban_keyed_clients: raw.ban_keyed_clients,
        max_ban_seconds: raw.max_ban_seconds,
        autoban_after_seconds: raw.autoban_after_seconds,
        syn_challenge: raw.syn_challenge,
        max_syn_acks_per_second: raw.max_syn_acks_per_second,
    };
    Ok((attach, policy))
}

/// `[[tier]]`: at least one, each with a limit and a window.
/// `enforce` or `observe`.
/// The distinct windows the store must keep in expiry order stay within
/// [`crate::limit::MAX_WINDOWS`].
fn windows(live: &LiveSettings, verified_key_ttl: Duration) -> Result<(), ConfigError> {
    fn envoy_windows(nodes: &[crate::config::EnvoyDescriptor], out: &mut Vec<Duration>) {
        for node in nodes {
            if let Some(crate::config::EnvoyLimit::Limit { window, .. }) = &node.limit {
                out.push(*window);
            }
            envoy_windows(&node.descriptors, out);
        }
    }
    let mut all: Vec<Duration> = live
        .tiers
        .iter()
        .flat_map(|t| std::iter::once(t.bucket_span()).chain(t.tokens.as_ref().map(|b| b.window)))
        .collect();
    all.push(verified_key_ttl);
    for domain in &live.rls.envoy {
        envoy_windows(&domain.descriptors, &mut all);
    }
    all.sort_unstable();
    all.dedup();
    if all.len() > crate::limit::MAX_WINDOWS {
        return Err(invalid(
            "tier",
            format!(
                "{} distinct windows (tiers, their token budgets, [rls] envoy_config limits and identity.verified_key_ttl); at most {}",
                all.len(),
                crate::limit::MAX_WINDOWS
            ),
        ));
    }
    Ok(())
}

/// `[rls]`: the listener (startup) and how descriptors are read (live).
type RlsParts = (Option<SocketAddr>, Option<(PathBuf, PathBuf)>, RlsPolicy);

fn rls(raw: RawRls) -> Result<RlsParts, ConfigError> {
    let listen = raw
        .listen
        .as_deref()
        .map(|l| socket_addr("rls.listen", l))
        .transpose()?;
    let tls = section_tls("rls", raw.tls_cert, raw.tls_key)?;
    if raw.domain.is_empty() {
        return Err(invalid("rls.domain", "must not be empty"));
    }
    let envoy = raw
        .envoy_config
        .iter()
        .enumerate()
        .map(|(i, path)| {
            EnvoyDomain::load(path).map_err(|e| e.within(format!("rls.envoy_config[{i}]")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut domains: Vec<&str> = vec![raw.domain.as_str()];
    for (i, d) in envoy.iter().enumerate() {
        if domains.contains(&d.domain.as_str()) {
            return Err(invalid(
                format!("rls.envoy_config[{i}]"),
                format!("domain `{}` is served twice", d.domain),
            ));
        }
        domains.push(&d.domain);
    }
    let secret = raw
        .secret_file
        .as_deref()
        .map(|path| {
            let text = std::fs::read(path).map_err(|e| {
                invalid(
                    "rls.secret_file",
                    format!("reading {}: {e}", path.display()),
                )
            })?;
            let secret = text.trim_ascii().to_vec();
            if secret.len() < RlsSecret::MIN_LEN || !secret.iter().all(u8::is_ascii_graphic) {
                return Err(invalid(
                    "rls.secret_file",
                    format!(
                        "{} must hold at least {} visible ASCII characters",
                        path.display(),
                        RlsSecret::MIN_LEN
                    ),
                ));
            }
            Ok(RlsSecret::new(secret))
        })
        .transpose()?;
    let policy = RlsPolicy {
        domain: raw.domain,
        clients: networks("rls.clients", &raw.clients)?,
        envoy,
        secret,
    };
    Ok((listen, tls, policy))
}

pub(super) fn limit_mode(field: &str, text: &str) -> Result<LimitMode, ConfigError> {
    one_of(
        field,
        text,
        &[
            ("enforce", LimitMode::Enforce),
            ("observe", LimitMode::Observe),
        ],
    )
}

/// `[[key]]`: overrides by key hash, their routes resolved to tier indexes.
fn keys(
    keys: &[RawKey],
    tiers: &[Tier],
    policy: PathPolicy,
) -> Result<HashMap<String, KeyOverride>, ConfigError> {
    let canonical_routes: Vec<Option<String>> = tiers
        .iter()
        .map(|t| canonicalize(&t.route, policy).ok())
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
            let canonical = canonicalize(route, policy)
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
        let entry = KeyOverride {
            multiplier: key.multiplier,
            limits,
        };
        if out.insert(hash, entry).is_some() {
            return Err(invalid(field("key_sha256"), "listed twice"));
        }
    }
    Ok(out)
}
