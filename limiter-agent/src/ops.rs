//! `limiter-agent status | ban | unban`: operate on an instance's pinned maps,
//! with or without a running agent; `override`, and `ban`/`unban` given an
//! admin token, go through a running agent's admin API to every host.

pub mod remote;

use crate::{
    config::{parse_duration, valid_instance},
    kernel::{
        self,
        maps::{Maps, MapsError},
        report::Report,
        state::RunState,
    },
};

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A bad argument (exit 64).
    #[error("{0}")]
    Usage(String),
    /// Nothing pinned for the instance, or a map call failed.
    #[error("{0}")]
    Maps(#[from] MapsError),
    /// The admin API could not be reached or refused the call.
    #[error("{0}")]
    Api(String),
}

fn open(instance: &str) -> Result<Maps, OpsError> {
    if !valid_instance(instance) {
        return Err(OpsError::Usage(
            "--instance: use 1 to 64 letters, digits, `-` or `_`".into(),
        ));
    }
    let dir = kernel::pin_dir(instance);
    if !dir.is_dir() {
        return Err(OpsError::Maps(MapsError::NotPinned(dir)));
    }
    Ok(Maps::open_pinned(&dir)?)
}

/// The grouping prefix the program uses, read from its config.
fn ipv6_prefix(maps: &Maps) -> Result<u8, OpsError> {
    let config = maps.config()?;
    Ok(config.ipv6_mask.iter().map(|b| b.count_ones()).sum::<u32>() as u8)
}

pub fn status(instance: &str, top: usize, json: bool) -> Result<(), OpsError> {
    let maps = open(instance)?;
    let mut report = Report::read(&maps, kernel::monotonic_ns(), top);
    instance.clone_into(&mut report.instance);
    report.attach_origins();
    if let Some(run) = RunState::read_live(instance) {
        report.agent_pid = Some(run.pid);
        report.persist = run.persist;
        report.attachments = run.attachments;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

pub fn ban(instance: &str, net: &str, duration: &str) -> Result<(), OpsError> {
    let net = crate::net::parse_net(net).map_err(|e| OpsError::Usage(e.to_string()))?;
    let duration = parse_duration(duration)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            OpsError::Usage(format!(
                "--for: `{duration}` is not a duration like \"90s\", \"10m\" or \"1h\""
            ))
        })?;
    let mut maps = open(instance)?;
    let prefix = ipv6_prefix(&maps)?;
    let until = kernel::monotonic_ns()
        .saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
    let banned = maps.ban(net, until, prefix)?;
    println!("banned {banned} for {}s", duration.as_secs());
    Ok(())
}

pub fn unban(instance: &str, net: &str) -> Result<(), OpsError> {
    let net = crate::net::parse_net(net).map_err(|e| OpsError::Usage(e.to_string()))?;
    let mut maps = open(instance)?;
    let prefix = ipv6_prefix(&maps)?;
    if maps.unban(net, prefix)? {
        println!("unbanned {net}");
        Ok(())
    } else {
        Err(OpsError::Usage(format!("{net} is not banned")))
    }
}

/// `ban` through the admin API: every host sharing the agent's store.
pub fn ban_everywhere(
    api: &remote::ApiTarget,
    net: &str,
    duration: &str,
    reason: Option<&str>,
) -> Result<(), OpsError> {
    let seconds = parse_duration(duration)
        .filter(|d| d.as_secs() > 0)
        .ok_or_else(|| {
            OpsError::Usage(format!(
                "--for: `{duration}` is not a duration like \"90s\", \"10m\" or \"1h\""
            ))
        })?
        .as_secs();
    let body =
        serde_json::json!({ "seconds": seconds, "reason": reason.unwrap_or("limiter-agent ban") });
    let ban = api.expect_ok(
        "PUT",
        &format!("/bans/{}", remote::net_segment(net)),
        Some(&body),
    )?;
    println!(
        "banned {} for {seconds}s on every host (by {})",
        ban["net"].as_str().unwrap_or(net),
        ban["by"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `unban` through the admin API.
pub fn unban_everywhere(api: &remote::ApiTarget, net: &str) -> Result<(), OpsError> {
    api.expect_ok(
        "DELETE",
        &format!("/bans/{}", remote::net_segment(net)),
        None,
    )?;
    println!("unbanned {net} on every host");
    Ok(())
}

/// `override set`.
pub fn override_set(
    api: &remote::ApiTarget,
    key_sha256: &str,
    multiplier: Option<f64>,
    limits: &[String],
    duration: Option<&str>,
) -> Result<(), OpsError> {
    let mut body = serde_json::Map::new();
    if let Some(m) = multiplier {
        body.insert("multiplier".into(), m.into());
    }
    if !limits.is_empty() {
        let mut map = serde_json::Map::new();
        for entry in limits {
            let (route, limit) = entry
                .rsplit_once('=')
                .and_then(|(r, l)| Some((r, l.parse::<u64>().ok()?)))
                .ok_or_else(|| OpsError::Usage(format!("--limit: `{entry}` is not ROUTE=LIMIT")))?;
            map.insert(route.to_owned(), limit.into());
        }
        body.insert("limits".into(), map.into());
    }
    if let Some(duration) = duration {
        let seconds = parse_duration(duration)
            .filter(|d| d.as_secs() > 0)
            .ok_or_else(|| OpsError::Usage(format!("--for: `{duration}` is not a duration")))?
            .as_secs();
        body.insert("seconds".into(), seconds.into());
    }
    let entry = api.expect_ok(
        "PUT",
        &format!("/overrides/{key_sha256}"),
        Some(&serde_json::Value::Object(body)),
    )?;
    println!(
        "{}",
        serde_json::to_string_pretty(&entry).unwrap_or_default()
    );
    Ok(())
}

/// `override list`.
pub fn override_list(api: &remote::ApiTarget, json: bool) -> Result<(), OpsError> {
    let list = api.expect_ok("GET", "/overrides", None)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(());
    }
    let empty = Vec::new();
    let entries = list["overrides"].as_array().unwrap_or(&empty);
    if entries.is_empty() {
        println!("no overrides");
    }
    for o in entries {
        let mut what = Vec::new();
        if let Some(m) = o["multiplier"].as_f64() {
            what.push(format!("x{m}"));
        }
        if let Some(limits) = o["limits"].as_object() {
            what.extend(limits.iter().map(|(r, l)| format!("{r}={l}")));
        }
        let until = o["until_ms"].as_u64().map_or_else(
            || "until removed".to_owned(),
            |u| format!("until unix ms {u}"),
        );
        println!(
            "{}  {}  {until}  by {} on {}",
            o["key_sha256"].as_str().unwrap_or("?"),
            what.join(" "),
            o["by"].as_str().unwrap_or("?"),
            o["origin"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

/// `override rm`.
pub fn override_rm(api: &remote::ApiTarget, key_sha256: &str) -> Result<(), OpsError> {
    api.expect_ok("DELETE", &format!("/overrides/{key_sha256}"), None)?;
    println!("removed the override of {key_sha256}");
    Ok(())
}
