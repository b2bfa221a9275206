//! `limiter-agent status | ban | unban`: operate on an instance's pinned maps,
//! with or without a running agent.

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
