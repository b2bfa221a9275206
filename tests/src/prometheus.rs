//! The one reader of the agent's Prometheus text exposition.

/// The value of `series` (a metric name, with its labels as exposed, e.g.
/// `limiter_requests_total{tier="/api/chat",decision="allowed"}`): the first
/// sample line that is exactly that series followed by its value, read as a
/// `T` (`f64` for any value, an integer type for counters and gauges).
#[must_use]
pub fn metric<T: std::str::FromStr>(text: &str, series: &str) -> Option<T> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_by_their_whole_series() {
        let text = "# HELP x\nlimiter_buckets 42\nlimiter_buckets_total 5\nlimiter_xdp_packets_total{verdict=\"drop\",reason=\"banned\"} 7\n";
        assert_eq!(metric(text, "limiter_buckets"), Some(42.0));
        assert_eq!(metric(text, "limiter_buckets_total"), Some(5_u64));
        assert_eq!(
            metric(
                text,
                "limiter_xdp_packets_total{verdict=\"drop\",reason=\"banned\"}"
            ),
            Some(7.0)
        );
        assert_eq!(metric::<f64>(text, "limiter_xdp_packets_total"), None);
        assert_eq!(metric::<f64>(text, "nope"), None);
    }
}
