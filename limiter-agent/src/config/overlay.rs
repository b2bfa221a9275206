//! `run`'s command line over the config file: the flags that override or add
//! to settings, checked as the file's values are.

use super::{Config, ConfigError, invalid, valid_instance, validate};
use crate::cli::RunArgs;

/// The built-in reference config: used when `run` gets no `--config`.
const BUILT_IN: &str = include_str!("../../../examples/concurred.toml");

impl Config {
    /// What `run` starts (or reloads) with: the file, or the built-in config,
    /// with the command-line overrides.
    ///
    /// # Errors
    /// The file's refusal, prefixed with where it came from, or a bad flag.
    pub fn for_run(args: &RunArgs) -> Result<Self, ConfigError> {
        let mut config = match &args.config {
            Some(path) => Self::load(path).map_err(|e| e.within(path.display()))?,
            None => Self::parse(BUILT_IN).map_err(|e| e.within("built-in config"))?,
        };
        config.apply(args)?;
        Ok(config)
    }

    /// Applies `run`'s flags over the file's settings.
    ///
    /// # Errors
    /// A flag whose value the file would not accept either.
    pub fn apply(&mut self, args: &RunArgs) -> Result<(), ConfigError> {
        let startup = &mut self.startup;
        if let Some(listen) = args.listen {
            startup.listen = listen;
        }
        if let Some(admin) = args.admin {
            startup.admin_listen = admin;
            validate::admin_off_loopback(
                admin,
                &self.live.admin_tokens,
                startup.admin_tls.is_some(),
            )
            .map_err(|e| e.within("--admin"))?;
        }
        if let Some(path) = &args.state_file {
            startup.state_file.clone_from(path);
        }
        if let Some(node) = &args.node {
            startup.node = validate::node(Some(node)).map_err(|e| e.within("--node"))?;
        }
        if let Some(upstream) = &args.upstream {
            self.live.upstream = validate::upstream("--upstream", upstream).map_err(|_| {
                invalid(
                    "--upstream",
                    format!("`{upstream}` must be an http://host:port URL"),
                )
            })?;
        }
        for interface in &args.interfaces {
            if !startup.xdp.interfaces.contains(interface) {
                startup.xdp.interfaces.push(interface.clone());
            }
        }
        if let Some(instance) = &args.instance {
            if !valid_instance(instance) {
                return Err(invalid(
                    "--instance",
                    "use 1 to 64 letters, digits, `-` or `_`",
                ));
            }
            startup.xdp.instance.clone_from(instance);
        }
        startup.xdp.persist |= args.persist;
        if args.no_xdp {
            startup.xdp.enabled = false;
        }
        Ok(())
    }
}
