//! CPU time of processes, from `/proc`: what the benchmarks charge per
//! request and what tests hold an idle process to.

/// User + system ticks of `pid` and every process below it (nginx's
/// workers are its master's children).
#[must_use]
pub fn tree_ticks(pid: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(0, |stat| {
        // Fields after the command (which may hold spaces) in parentheses:
        // utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field(11) + field(12)
    });
    let children: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .map(tree_ticks)
        .sum();
    own + children
}

/// Microseconds in `ticks` clock ticks.
#[must_use]
pub fn ticks_to_us(ticks: u64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    let to_f64 = |n: u64| f64::from(u32::try_from(n).unwrap_or(u32::MAX));
    to_f64(ticks) * 1e6 / to_f64(u64::try_from(per_second).unwrap_or(100))
}

/// Seconds of user + system CPU `pid` and its process tree have used.
#[must_use]
pub fn tree_seconds(pid: u32) -> f64 {
    ticks_to_us(tree_ticks(pid)) / 1e6
}
