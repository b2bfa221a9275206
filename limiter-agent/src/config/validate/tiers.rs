//! `[[tier]]` and `[tier.tokens]`: each tier's limit, window and mode, and
//! what makes requests unequal (in-flight caps, cost, token budgets).

use std::num::NonZeroU32;

use super::{duration, limit_mode};
use crate::{
    config::{
        ConfigError, invalid,
        model::{LimitMode, Reserve, Tier, TokenBudget, UsageField},
        raw::{RawReserve, RawTier, RawTokens},
    },
    limit::Algorithm,
};

/// The token budget's defaults.
const DEFAULT_MAX_TOKENS: u32 = 4096;
const DEFAULT_MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;

/// Answer headers a cost may not be read from: the agent frames the answer
/// and sends its own limit headers.
const NOT_A_COST: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "content-type",
    "retry-after",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "date",
];

/// `[[tier]]`: at least one, each with a limit and a window.
pub(super) fn tiers(raw: &[RawTier], agent_mode: LimitMode) -> Result<Vec<Tier>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid("tier", "at least one [[tier]] is required"));
    }
    raw.iter()
        .enumerate()
        .map(|(i, t)| tier(i, t, agent_mode))
        .collect()
}

fn tier(i: usize, t: &RawTier, agent_mode: LimitMode) -> Result<Tier, ConfigError> {
    let limit = NonZeroU32::new(t.limit)
        .ok_or_else(|| invalid(format!("tier[{i}].limit"), "must be at least 1"))?;
    let max_in_flight = t
        .max_in_flight
        .map(|n| {
            NonZeroU32::new(n)
                .ok_or_else(|| invalid(format!("tier[{i}].max_in_flight"), "must be at least 1"))
        })
        .transpose()?;
    let cost = NonZeroU32::new(t.cost.unwrap_or(1))
        .ok_or_else(|| invalid(format!("tier[{i}].cost"), "must be at least 1"))?;
    if cost > limit {
        return Err(invalid(
            format!("tier[{i}].cost"),
            format!("{cost} is more than the tier's limit ({limit}): no request would fit"),
        ));
    }
    let cost_header = t
        .cost_header
        .as_deref()
        .map(|name| {
            let field = format!("tier[{i}].cost_header");
            let header = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(&field, format!("`{name}` is not a header name")))?;
            if NOT_A_COST.contains(&header.as_str()) || header.as_str().starts_with("ratelimit") {
                return Err(invalid(
                    &field,
                    format!("`{name}` frames or limits the answer; name a header of its own"),
                ));
            }
            Ok(header)
        })
        .transpose()?;
    let window = duration(&format!("tier[{i}].window"), &t.window)?;
    let algorithm = algorithm(i, t, limit, cost, window)?;
    if cost_header.is_some() && algorithm != Algorithm::Fixed {
        return Err(invalid(
            format!("tier[{i}].cost_header"),
            "a reported cost is settled in the window that took it: fixed windows only",
        ));
    }
    Ok(Tier {
        route: t.route.clone(),
        limit,
        window,
        algorithm,
        mode: match t.mode.as_deref() {
            Some(own) => limit_mode(&format!("tier[{i}].mode"), own)?,
            None => LimitMode::Enforce,
        }
        .max(agent_mode),
        max_in_flight,
        cost,
        cost_header,
        tokens: t
            .tokens
            .as_ref()
            .map(|tokens| budget(&format!("tier[{i}].tokens"), tokens))
            .transpose()?,
    })
}

/// The longest a sliding window or a GCRA burst may span: every time the
/// stores keep stays far inside their 43-bit ms fields and Redis's 2^53.
const LONGEST_SMOOTH: std::time::Duration = std::time::Duration::from_hours(365 * 24);

/// `algorithm` and `burst`.
fn algorithm(
    i: usize,
    t: &RawTier,
    limit: NonZeroU32,
    cost: NonZeroU32,
    window: std::time::Duration,
) -> Result<Algorithm, ConfigError> {
    let field = |key: &str| format!("tier[{i}].{key}");
    let algorithm = match t.algorithm.as_deref().unwrap_or("fixed") {
        "fixed" => Algorithm::Fixed,
        "sliding" => Algorithm::Sliding,
        "gcra" => {
            let burst = NonZeroU32::new(t.burst.unwrap_or(limit.get()))
                .ok_or_else(|| invalid(field("burst"), "must be at least 1"))?;
            if cost > burst {
                return Err(invalid(
                    field("cost"),
                    format!("{cost} is more than the tier's burst ({burst}): no request would fit"),
                ));
            }
            Algorithm::Gcra { burst: burst.get() }
        }
        other => {
            return Err(invalid(
                field("algorithm"),
                format!("`{other}`: expected \"fixed\", \"sliding\" or \"gcra\""),
            ));
        }
    };
    if t.burst.is_some() && !matches!(algorithm, Algorithm::Gcra { .. }) {
        return Err(invalid(field("burst"), "only with algorithm = \"gcra\""));
    }
    if algorithm != Algorithm::Fixed {
        if window.as_millis() == 0 || window > LONGEST_SMOOTH {
            return Err(invalid(
                field("window"),
                "a sliding or GCRA window is at least 1 ms and at most 365 days",
            ));
        }
        if let Algorithm::Gcra { burst } = algorithm {
            let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
            let burst_us = crate::limit::Gcra::new(limit.get(), window_ms, burst).tolerance_us();
            if u128::from(burst_us) > LONGEST_SMOOTH.as_micros() {
                return Err(invalid(
                    field("burst"),
                    format!("{burst} at {limit} per window takes more than 365 days to come back"),
                ));
            }
        }
    }
    Ok(algorithm)
}

fn budget(at: &str, raw: &RawTokens) -> Result<TokenBudget, ConfigError> {
    let field = |key: &str| format!("{at}.{key}");
    let limit =
        NonZeroU32::new(raw.limit).ok_or_else(|| invalid(field("limit"), "must be at least 1"))?;
    let reserve = match &raw.reserve {
        RawReserve::Named(name) if name == "max_tokens" => Reserve::MaxTokens,
        RawReserve::Named(other) => {
            return Err(invalid(
                field("reserve"),
                format!("`{other}`: \"max_tokens\" or a number of tokens"),
            ));
        }
        RawReserve::Fixed(n) => {
            let n = u32::try_from(*n)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| invalid(field("reserve"), "a number of tokens, at least 1"))?;
            if n > limit.get() {
                return Err(invalid(
                    field("reserve"),
                    format!("{n} is more than the budget ({limit}): no request would fit"),
                ));
            }
            Reserve::Fixed(n)
        }
    };
    let prompt_bytes_per_token = NonZeroU32::new(raw.prompt_bytes_per_token.unwrap_or(1))
        .ok_or_else(|| invalid(field("prompt_bytes_per_token"), "must be at least 1"))?;
    let usage = match &raw.usage {
        None => vec![UsageField::Total],
        Some(names) if names.is_empty() => {
            return Err(invalid(field("usage"), "name at least one usage field"));
        }
        Some(names) => names
            .iter()
            .map(|name| match name.as_str() {
                "total_tokens" => Ok(UsageField::Total),
                "prompt_tokens" => Ok(UsageField::Prompt),
                "completion_tokens" => Ok(UsageField::Completion),
                other => Err(invalid(
                    field("usage"),
                    format!(
                        "`{other}`: \"total_tokens\", \"prompt_tokens\" or \"completion_tokens\""
                    ),
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    let max_request_bytes = raw.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
    if max_request_bytes == 0 {
        return Err(invalid(field("max_request_bytes"), "must be at least 1"));
    }
    Ok(TokenBudget {
        limit,
        window: duration(&field("window"), &raw.window)?,
        reserve,
        default_max_tokens: raw.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        prompt_bytes_per_token,
        usage,
        max_request_bytes,
    })
}
