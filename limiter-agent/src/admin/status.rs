//! What a part of the agent adds to `/status` and the dashboard.

/// Adds a section to `/status` (the kernel side reports its interfaces, ceilings, bans).
pub trait StatusReport: Send + Sync + 'static {
    /// The section's key in the `/status` object.
    fn name(&self) -> &'static str;
    /// The latest report, at once (never a walk of the maps).
    fn report(&self) -> serde_json::Value;
    /// Resolves when the report is fresh, or after a short bounded wait.
    fn fresh(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
}
