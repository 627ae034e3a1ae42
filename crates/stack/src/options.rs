//! What a [`Stack`](crate::Stack) runs and how: tokens, worker vars, which processes, ports.
//!
//! Every field has a default that suits an end-to-end test (fresh random tokens, free ports,
//! a throwaway directory, release binaries); `stack dev` pins ports, tokens and the state
//! directory instead.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

/// Which cargo profile's binaries (`arrakis-sim`, `local-consumer`) to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    #[default]
    Release,
    Debug,
}

impl Profile {
    pub fn dir_name(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

/// How to start a [`Stack`](crate::Stack). Build with [`StackOptions::default`] and the
/// chaining setters; every field is also public.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// `API_TOKENS` of the API worker; random per stack when `None`.
    pub client_token: Option<String>,
    /// `CONSUMER_TOKENS` of both workers and the daemon's `CONSUMER_TOKEN`; random when `None`.
    pub consumer_token: Option<String>,
    /// `WEBHOOK_SECRET` of the consumer worker (`whsec_<base64>`); random per stack when `None`.
    pub webhook_secret: Option<String>,
    /// Worker vars written to `.dev.vars`, overriding the configs' `[vars]` in every worker
    /// (`BELL_CHECK_MS`, `LEASE_SECONDS`, `MAX_ATTEMPTS`, `DEFAULT_TARGET_SERVER`...).
    pub worker_vars: Vec<(String, String)>,
    /// Start the Arrakis simulator (ignored when `arrakis_url` is set).
    pub simulator: bool,
    /// Extra `arrakis-sim` arguments (`--latency`, `--error-rate`, `--hang`...).
    pub sim_args: Vec<String>,
    /// Where the simulator listens; a free loopback port when `None`.
    pub sim_listen: Option<SocketAddr>,
    /// An Arrakis server that is already running; no simulator is started then.
    pub arrakis_url: Option<String>,
    /// Start the daemon (`local-consumer`).
    pub daemon: bool,
    /// Extra daemon environment, applied last so it can override the stack's own settings.
    pub daemon_env: Vec<(String, String)>,
    /// The daemon's `SERVER_NAMES`.
    pub server_names: Vec<String>,
    /// The daemon's `CONSUMER_ID`.
    pub consumer_id: String,
    /// Fire the consumer worker's cron (the lease sweep) this often, standing in for the
    /// one-minute cron trigger, which `wrangler dev` does not fire by itself.
    pub cron_every: Option<Duration>,
    /// Which profile's binaries to run; see [`StackOptions::bin_dir`] for the lookup order.
    pub profile: Profile,
    /// Directory holding `arrakis-sim` and `local-consumer`. When `None`: `$STACK_BIN_DIR`,
    /// else `$CARGO_TARGET_DIR/<profile>`, else `<repo>/target/<profile>`.
    pub bin_dir: Option<PathBuf>,
    /// The gateway's port (the stack's one public port); free when `None`.
    pub gateway_port: Option<u16>,
    /// The daemon's `METRICS_ADDR`; a free loopback port when `None`.
    pub metrics_addr: Option<SocketAddr>,
    /// Where configs, `.dev.vars` and logs go; `<repo>/target/stacks/<unique>` when `None`.
    pub dir: Option<PathBuf>,
    /// wrangler's `--persist-to` (KV contents); `<dir>/state` when `None`.
    pub persist_dir: Option<PathBuf>,
    /// How long each process may take to become ready.
    pub startup_timeout: Duration,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            client_token: None,
            consumer_token: None,
            webhook_secret: None,
            worker_vars: dispatch_mode_from_env(),
            simulator: true,
            sim_args: Vec::new(),
            sim_listen: None,
            arrakis_url: None,
            daemon: true,
            daemon_env: Vec::new(),
            server_names: vec!["production".to_owned()],
            consumer_id: "stack-consumer".to_owned(),
            cron_every: None,
            profile: Profile::Release,
            bin_dir: None,
            gateway_port: None,
            metrics_addr: None,
            dir: None,
            persist_dir: None,
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// `STACK_DISPATCH_MODE=durable|kv` sets the workers' `DISPATCH_MODE` for every stack started
/// with default options, so the whole e2e suite runs in either mode (`cargo xtask e2e --mode`).
fn dispatch_mode_from_env() -> Vec<(String, String)> {
    match std::env::var("STACK_DISPATCH_MODE") {
        Ok(mode) if !mode.trim().is_empty() => vec![("DISPATCH_MODE".to_owned(), mode.trim().to_owned())],
        _ => Vec::new(),
    }
}

impl StackOptions {
    /// The two workers alone: no simulator, no daemon. Tests then act as the daemon.
    pub fn edge_only() -> Self {
        Self::default().without_simulator().without_daemon()
    }

    pub fn tokens(mut self, client: impl Into<String>, consumer: impl Into<String>) -> Self {
        self.client_token = Some(client.into());
        self.consumer_token = Some(consumer.into());
        self
    }

    pub fn webhook_secret(mut self, secret: impl Into<String>) -> Self {
        self.webhook_secret = Some(secret.into());
        self
    }

    /// Overrides one worker var for every worker.
    pub fn worker_var(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.worker_vars.push((name.into(), value.to_string()));
        self
    }

    pub fn without_simulator(mut self) -> Self {
        self.simulator = false;
        self
    }

    pub fn sim_arg(mut self, arg: impl Into<String>) -> Self {
        self.sim_args.push(arg.into());
        self
    }

    pub fn sim_listen(mut self, addr: SocketAddr) -> Self {
        self.sim_listen = Some(addr);
        self
    }

    /// Uses an Arrakis server that is already running instead of the simulator.
    pub fn arrakis_url(mut self, url: impl Into<String>) -> Self {
        self.arrakis_url = Some(url.into());
        self
    }

    pub fn without_daemon(mut self) -> Self {
        self.daemon = false;
        self
    }

    pub fn daemon_env(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.daemon_env.push((name.into(), value.to_string()));
        self
    }

    pub fn server_names<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.server_names = names.into_iter().map(Into::into).collect();
        self
    }

    pub fn consumer_id(mut self, id: impl Into<String>) -> Self {
        self.consumer_id = id.into();
        self
    }

    pub fn cron_every(mut self, every: Duration) -> Self {
        self.cron_every = Some(every);
        self
    }

    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    pub fn gateway_port(mut self, port: u16) -> Self {
        self.gateway_port = Some(port);
        self
    }

    pub fn metrics_addr(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    pub fn persist_to(mut self, dir: impl Into<PathBuf>) -> Self {
        self.persist_dir = Some(dir.into());
        self
    }

    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Where the native binaries are looked up (see the field [`StackOptions::bin_dir`]).
    pub fn resolved_bin_dir(&self, root: &Path) -> PathBuf {
        if let Some(dir) = &self.bin_dir {
            return dir.clone();
        }
        if let Some(dir) = std::env::var_os("STACK_BIN_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        // The e2e tests and the binaries they run come out of the same build, wherever its
        // target directory is.
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .filter(|d| !d.is_empty())
            .map(|d| root.join(d))
            .unwrap_or_else(|| root.join("target"));
        target.join(self.profile.dir_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_only_runs_neither_simulator_nor_daemon() {
        let opts = StackOptions::edge_only().worker_var("MAX_ATTEMPTS", 1).cron_every(Duration::from_secs(1));
        assert!(!opts.simulator && !opts.daemon);
        assert_eq!(opts.worker_vars, [("MAX_ATTEMPTS".to_owned(), "1".to_owned())]);
        assert_eq!(opts.cron_every, Some(Duration::from_secs(1)));
    }

    #[test]
    fn an_explicit_bin_dir_wins() {
        let opts = StackOptions::default().bin_dir("/opt/bin");
        assert_eq!(opts.resolved_bin_dir(Path::new("/repo")), Path::new("/opt/bin"));
    }
}
