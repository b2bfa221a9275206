//! The async runtime the agent runs on, chosen by the CPUs it may use.

/// One worker per CPU the process may run on; on a single CPU, a
/// current-thread runtime (no work-stealing, no cross-thread wake-ups).
///
/// # Errors
/// The runtime could not be started (threads, the I/O driver).
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}
