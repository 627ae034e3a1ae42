//! A running stack: `wrangler dev` with the gateway and both workers, the Arrakis simulator
//! and the daemon, each a child process in its own process group, plus an optional ticker that
//! fires the cron trigger.
//!
//! Fault tests stop and start the pieces individually; dropping the [`Stack`] kills them all.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::Signal;
use tokio::{process::Command, task::JoinHandle};

use crate::{
    client::{http_client, ApiClient},
    options::StackOptions,
    process::{log_tail, Proc, LOG_TAIL_LINES},
    repo_root, wrangler,
};

/// The cron expression of the consumer worker's trigger, as `/__scheduled` takes it.
const CRON_QUERY: &str = "cron=*+*+*+*+*";
/// How long wrangler gets to shut workerd down before its group is killed.
const WRANGLER_GRACE: Duration = Duration::from_secs(10);
/// How long the simulator gets after SIGTERM.
const SIM_GRACE: Duration = Duration::from_secs(5);
/// How long the daemon gets after SIGTERM: its drain, which defaults to minutes, plus slack.
const DAEMON_GRACE: Duration = Duration::from_secs(300);
/// The line `arrakis-sim` prints once it is bound.
const SIM_READY_LINE: &str = "arrakis-sim listening on";

/// The whole local system. See the crate docs for an example.
#[derive(Debug)]
pub struct Stack {
    root: PathBuf,
    dir: PathBuf,
    persist_dir: PathBuf,
    opts: StackOptions,
    gateway_port: u16,
    inspector_port: u16,
    /// Where the simulator listens when this stack runs one.
    sim_addr: Option<SocketAddr>,
    arrakis_url: String,
    metrics_addr: SocketAddr,
    client_token: String,
    webhook_secret: String,
    consumer_token: String,
    configs: [PathBuf; 3],
    http: reqwest::Client,
    // Children are dropped (and so killed) in field order: daemon first, wrangler last.
    daemon: Option<Proc>,
    sim: Option<Proc>,
    wrangler: Option<Proc>,
    cron: Option<JoinHandle<()>>,
}

impl Stack {
    /// Starts everything `opts` asks for and waits until each piece answers. On error,
    /// whatever had started is killed, and the error quotes the failing process's log.
    pub async fn start(opts: StackOptions) -> Result<Stack> {
        let root = repo_root();
        let dir = match &opts.dir {
            Some(dir) => dir.clone(),
            None => {
                let stacks = root.join("target/stacks");
                prune_old_stacks(&stacks);
                stacks.join(unique_name())
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
        let dir = dir.canonicalize().with_context(|| format!("could not resolve {}", dir.display()))?;
        let persist_dir = opts.persist_dir.clone().unwrap_or_else(|| dir.join("state"));
        std::fs::create_dir_all(&persist_dir).with_context(|| format!("could not create {}", persist_dir.display()))?;

        let sim_wanted = opts.simulator && opts.arrakis_url.is_none();
        let fixed = [opts.gateway_port, None, opts.sim_listen.map(|a| a.port()), opts.metrics_addr.map(|a| a.port())];
        let [gateway_port, inspector_port, sim_port, metrics_port] = free_ports(fixed)?;
        let sim_addr = sim_wanted.then(|| opts.sim_listen.unwrap_or_else(|| loopback(sim_port)));
        let arrakis_url = match (&opts.arrakis_url, sim_addr) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(addr)) => format!("http://{addr}"),
            // Nothing to point at; the daemon (if any) reports the connection errors.
            (None, None) => format!("http://{}", loopback(sim_port)),
        };
        let metrics_addr = opts.metrics_addr.unwrap_or_else(|| loopback(metrics_port));
        let client_token = opts.client_token.clone().unwrap_or_else(|| random_token("client"));
        let consumer_token = opts.consumer_token.clone().unwrap_or_else(|| random_token("consumer"));
        let webhook_secret = opts.webhook_secret.clone().unwrap_or_else(random_webhook_secret);

        let mut vars = vec![
            ("API_TOKENS".to_owned(), client_token.clone()),
            ("CONSUMER_TOKENS".to_owned(), consumer_token.clone()),
            ("WEBHOOK_SECRET".to_owned(), webhook_secret.clone()),
            // Receivers on this machine (tests, a developer's listener) are plain http.
            ("WEBHOOK_ALLOW_HTTP_HOSTS".to_owned(), "127.0.0.1,localhost".to_owned()),
            // One location, no propagation delay: the e2e tests use 2 s leases to see expiry
            // quickly (production's floor is 120 s).
            ("MIN_LEASE_SECONDS".to_owned(), "2".to_owned()),
            // Nothing to wait out on one location: the sweep acts on an expired lease at once.
            ("KV_PROPAGATION_SECONDS".to_owned(), "0".to_owned()),
        ];
        vars.extend(opts.worker_vars.iter().cloned());
        let configs = wrangler::write_configs(&root, &dir, &vars)?;

        let mut stack = Stack {
            root,
            dir,
            persist_dir,
            gateway_port,
            inspector_port,
            sim_addr,
            arrakis_url,
            metrics_addr,
            client_token,
            consumer_token,
            webhook_secret,
            configs: [configs.gateway, configs.api, configs.consumer],
            http: http_client(Duration::from_secs(5)),
            daemon: None,
            sim: None,
            wrangler: None,
            cron: None,
            opts,
        };
        tracing::info!(dir = %stack.dir.display(), gateway = %stack.gateway_url(), "starting stack");
        stack.start_wrangler_on_free_ports().await?;
        if stack.sim_addr.is_some() {
            stack.start_sim().await?;
        }
        if stack.opts.daemon {
            stack.start_daemon().await?;
        }
        if let Some(every) = stack.opts.cron_every {
            stack.cron = Some(spawn_cron(stack.http.clone(), stack.gateway_url(), every));
        }
        Ok(stack)
    }

    // ---------------------------------------------------------------------------------------
    // Addresses and credentials

    /// `http://127.0.0.1:P`: the gateway, whose non-`/consumer` paths reach the API worker.
    pub fn api_url(&self) -> String {
        self.gateway_url()
    }

    /// `http://127.0.0.1:P/consumer`: the consumer worker through the gateway.
    pub fn consumer_url(&self) -> String {
        format!("{}/consumer", self.gateway_url())
    }

    /// `http://127.0.0.1:P`.
    pub fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    /// The simulator's URL, or the external Arrakis server's.
    pub fn arrakis_url(&self) -> &str {
        &self.arrakis_url
    }

    /// `http://METRICS_ADDR`: the daemon's `/metrics` and `/healthz`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}", self.metrics_addr)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The API worker's client token (`API_TOKENS`).
    pub fn client_token(&self) -> &str {
        &self.client_token
    }

    /// The key that signs webhooks (`WEBHOOK_SECRET`, `whsec_<base64>`).
    pub fn webhook_secret(&self) -> &str {
        &self.webhook_secret
    }

    /// The daemons' token (`CONSUMER_TOKENS`).
    pub fn consumer_token(&self) -> &str {
        &self.consumer_token
    }

    /// Configs, `.dev.vars` and the `*.log` files of the children.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// wrangler's `--persist-to`.
    pub fn persist_dir(&self) -> &Path {
        &self.persist_dir
    }

    pub fn options(&self) -> &StackOptions {
        &self.opts
    }

    /// The log of one child: `wrangler`, `arrakis-sim` or `local-consumer`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The last lines of one child's log.
    pub fn log_tail(&self, name: &str) -> String {
        log_tail(&self.log_path(name), LOG_TAIL_LINES)
    }

    /// A client holding both tokens.
    pub fn client(&self) -> ApiClient {
        ApiClient::new(self.gateway_url(), &self.client_token, &self.consumer_token)
    }

    // ---------------------------------------------------------------------------------------
    // Process control

    /// Fires the cron trigger once (the consumer worker's lease sweep) and waits for it.
    pub async fn sweep_now(&self) -> Result<()> {
        fire_cron(&self.http, &self.gateway_url()).await
    }

    /// Stops wrangler (and workerd) and starts it again on the same ports and state; returns
    /// once both workers answer.
    pub async fn restart_wrangler(&mut self) -> Result<()> {
        self.stop_wrangler().await?;
        self.start_wrangler().await
    }

    /// Stops wrangler and everything it started.
    pub async fn stop_wrangler(&mut self) -> Result<()> {
        if let Some(mut proc) = self.wrangler.take() {
            proc.stop(Signal::SIGTERM, true, WRANGLER_GRACE).await?;
        }
        Ok(())
    }

    /// Starts wrangler if it is not running and waits until both workers answer `/health`.
    pub async fn start_wrangler(&mut self) -> Result<()> {
        ensure!(self.wrangler.is_none(), "wrangler is already running");
        let bin = self.root.join("node_modules/.bin/wrangler");
        ensure!(bin.exists(), "{} is missing; run `cargo xtask setup`", bin.display());
        let mut cmd = Command::new(&bin);
        cmd.arg("dev");
        for config in &self.configs {
            cmd.arg("-c").arg(config);
        }
        cmd.args(["--ip", "127.0.0.1", "--port", &self.gateway_port.to_string()])
            .args(["--inspector-port", &self.inspector_port.to_string()])
            .arg("--persist-to")
            .arg(&self.persist_dir)
            .args(["--show-interactive-dev-session=false", "--test-scheduled"])
            .current_dir(&self.dir)
            .env("WRANGLER_SEND_METRICS", "false")
            .env("FORCE_COLOR", "0")
            .env("NO_COLOR", "1");
        let (http, timeout) = (self.http.clone(), self.opts.startup_timeout);
        let urls = [format!("{}/health", self.gateway_url()), format!("{}/health", self.consumer_url())];
        let proc = self.wrangler.insert(Proc::spawn("wrangler", cmd, &self.log_path("wrangler"))?);
        wait_until(proc, timeout, || async {
            for url in &urls {
                match http.get(url).send().await {
                    Ok(r) if r.status().is_success() => {}
                    _ => return false,
                }
            }
            true
        })
        .await
    }

    /// The first start of wrangler. A port checked free can still be taken before workerd binds
    /// it (by a process outside this one); when that happens and the ports were ours to choose,
    /// choose again rather than fail the stack.
    async fn start_wrangler_on_free_ports(&mut self) -> Result<()> {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let err = match self.start_wrangler().await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            let lost_race = format!("{err:#}").contains("Address already in use");
            if !lost_race || self.opts.gateway_port.is_some() || attempt == ATTEMPTS {
                return Err(err);
            }
            tracing::warn!(attempt, "a wrangler port was taken before workerd bound it; choosing new ports");
            if let Some(proc) = self.wrangler.take() {
                // The leader has exited; workerd may linger in its group.
                let _ = proc.signal(Signal::SIGKILL);
            }
            [self.gateway_port, self.inspector_port] = free_ports([None, None])?;
        }
        unreachable!("the last attempt returns")
    }

    /// Starts the simulator (on the same address as before) and waits for its ready line.
    pub async fn start_sim(&mut self) -> Result<()> {
        ensure!(self.sim.is_none(), "the simulator is already running");
        let addr = self.sim_addr.context("this stack runs no simulator (an external Arrakis URL was given)")?;
        let bin = self.binary("arrakis-sim")?;
        let log = self.log_path("arrakis-sim");
        // The log is appended across restarts; only lines after this offset count.
        let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(bin);
        cmd.arg("--listen").arg(addr.to_string()).args(&self.opts.sim_args).current_dir(&self.dir);
        let timeout = self.opts.startup_timeout;
        let proc = self.sim.insert(Proc::spawn("arrakis-sim", cmd, &log)?);
        wait_until(proc, timeout, || async {
            let text = std::fs::read(&log).unwrap_or_default();
            let fresh = text.get(offset as usize..).unwrap_or_default();
            String::from_utf8_lossy(fresh).contains(SIM_READY_LINE)
        })
        .await
    }

    /// Stops the simulator (SIGTERM, then SIGKILL after a grace period).
    pub async fn stop_sim(&mut self) -> Result<Option<ExitStatus>> {
        match self.sim.take() {
            Some(mut proc) => Ok(Some(proc.stop(Signal::SIGTERM, true, SIM_GRACE).await?)),
            None => Ok(None),
        }
    }

    /// Starts the daemon with the stack's configuration and waits for its `/healthz`.
    pub async fn start_daemon(&mut self) -> Result<()> {
        if let Some(proc) = self.daemon.as_mut() {
            ensure!(proc.exited().is_some(), "the daemon is already running");
            self.daemon = None;
        }
        let bin = self.binary("local-consumer")?;
        let lock_dir = self.dir.join("locks");
        std::fs::create_dir_all(&lock_dir).with_context(|| format!("could not create {}", lock_dir.display()))?;
        let mut cmd = Command::new(bin);
        cmd.current_dir(&self.dir)
            .env("API_WORKER_URL", self.api_url())
            .env("CONSUMER_WORKER_URL", self.consumer_url())
            .env("ARRAKIS_URL", &self.arrakis_url)
            .env("CONSUMER_TOKEN", &self.consumer_token)
            .env("SERVER_NAMES", self.opts.server_names.join(","))
            .env("CONSUMER_ID", &self.opts.consumer_id)
            .env("METRICS_ADDR", self.metrics_addr.to_string())
            .env("LOCK_DIR", &lock_dir)
            .env("RUST_LOG", "info");
        cmd.envs(self.opts.daemon_env.iter().map(|(k, v)| (k, v)));
        let (http, timeout) = (self.http.clone(), self.opts.startup_timeout);
        let url = format!("{}/healthz", self.metrics_url());
        let proc = self.daemon.insert(Proc::spawn("local-consumer", cmd, &self.log_path("local-consumer"))?);
        wait_until(proc, timeout, || async { matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) })
            .await
    }

    /// SIGKILL: the daemon dies mid-whatever, leases and all.
    pub async fn kill_daemon(&mut self) -> Result<ExitStatus> {
        let mut proc = self.daemon.take().context("the daemon is not running")?;
        proc.kill().await
    }

    /// SIGTERM, then waits for the daemon's drain and exit (SIGKILL after 5 minutes).
    pub async fn terminate_daemon(&mut self) -> Result<ExitStatus> {
        let mut proc = self.daemon.take().context("the daemon is not running")?;
        proc.stop(Signal::SIGTERM, false, DAEMON_GRACE).await
    }

    /// The daemon's process id (it is started directly, so its child's pid), for reading
    /// `/proc/<pid>/status` (memory) in benchmarks; `None` when no daemon runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Proc::pid)
    }

    /// Whether the daemon is running.
    pub fn daemon_running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// An error naming the first child that has exited on its own, with its log tail.
    pub fn check_alive(&mut self) -> Result<()> {
        for proc in [self.wrangler.as_mut(), self.sim.as_mut(), self.daemon.as_mut()].into_iter().flatten() {
            proc.check_running()?;
        }
        Ok(())
    }

    /// Stops everything in order (daemon with its drain, simulator, wrangler) and reports the
    /// first failure. Dropping the stack instead kills everything at once.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(cron) = self.cron.take() {
            cron.abort();
        }
        let mut first_error = None;
        if let Some(mut proc) = self.daemon.take() {
            match proc.stop(Signal::SIGTERM, false, DAEMON_GRACE).await {
                Ok(status) if !status.success() => {
                    first_error.get_or_insert(anyhow::anyhow!(
                        "{} exited with {status}:\n{}",
                        proc.name(),
                        proc.log_tail()
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Err(e) = self.stop_sim().await {
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.stop_wrangler().await {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    fn binary(&self, name: &str) -> Result<PathBuf> {
        let dir = self.opts.resolved_bin_dir(&self.root);
        let path = dir.join(name);
        ensure!(
            path.exists(),
            "{} is missing; build it (cargo build --{} -p {name}) or point STACK_BIN_DIR at it",
            path.display(),
            self.opts.profile.dir_name()
        );
        Ok(path)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(cron) = self.cron.take() {
            cron.abort();
        }
        // The children's own Drop kills their process groups.
    }
}

/// Polls `ready` every 100 ms until it holds, failing with the log tail when the process
/// exits or `timeout` passes.
async fn wait_until<F, Fut>(proc: &mut Proc, timeout: Duration, mut ready: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        proc.check_running()?;
        if ready().await {
            tracing::info!(name = proc.name(), took = ?start.elapsed(), "ready");
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "{} was not ready within {timeout:?}; last lines of {}:\n{}",
                proc.name(),
                proc.log().display(),
                proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fire_cron(http: &reqwest::Client, gateway: &str) -> Result<()> {
    let url = format!("{gateway}/__scheduled?{CRON_QUERY}");
    // The handler runs the whole sweep before answering; give it longer than a plain request.
    let response =
        http.get(&url).timeout(Duration::from_secs(30)).send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    ensure!(status.is_success(), "GET {url} answered {status}: {}", response.text().await.unwrap_or_default());
    Ok(())
}

fn spawn_cron(http: reqwest::Client, gateway: String, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the real cron would not fire at start either.
        ticks.tick().await;
        loop {
            ticks.tick().await;
            if let Err(e) = fire_cron(&http, &gateway).await {
                // Expected while wrangler restarts; the next tick tries again.
                tracing::warn!("cron tick failed: {e:#}");
            }
        }
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Ports handed out by this process, so concurrent stacks in one test binary never get the
/// same port between its release and the child's bind.
static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// Fills each `None` with a free loopback port. All listeners are held until every port is
/// chosen, so the OS cannot return one port twice.
///
/// Ports come from below the kernel's ephemeral range when there is room: a port the OS hands
/// out for `bind(0)` can be handed again to another process (workerd binds several internal
/// sockets that way) in the moment between our check and the child's bind, which made a
/// stack fail to start with "Address already in use" under parallel tests.
fn free_ports<const N: usize>(fixed: [Option<u16>; N]) -> Result<[u16; N]> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = Vec::new();
    let mut ports = [0; N];
    let mut candidates = quiet_port_candidates();
    for (slot, fixed) in ports.iter_mut().zip(fixed) {
        *slot = match fixed {
            Some(port) => port,
            None => loop {
                let wanted = candidates.as_mut().and_then(|c| c.next()).unwrap_or(0);
                let listener = match TcpListener::bind(loopback(wanted)) {
                    Ok(listener) => listener,
                    Err(_) if wanted != 0 => continue,
                    Err(e) => return Err(e).context("could not bind a free port"),
                };
                let port = listener.local_addr()?.port();
                held.push(listener);
                if !handed_out.contains(&port) {
                    break port;
                }
            },
        };
        handed_out.push(*slot);
    }
    Ok(ports)
}

/// Ports below the ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), starting at an
/// offset derived from the process id so that test binaries run side by side rarely probe
/// the same ones. `None` when the range leaves too little room below it.
fn quiet_port_candidates() -> Option<impl Iterator<Item = u16>> {
    const LOWEST: u16 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let ephemeral_start: u16 = range.split_whitespace().next()?.parse().ok()?;
    let room = u32::from(ephemeral_start.checked_sub(LOWEST).filter(|room| *room >= 1_000)?);
    let start = std::process::id().wrapping_mul(7_919).wrapping_add(NEXT.fetch_add(97, Ordering::Relaxed));
    Some((0..room).map(move |i| LOWEST + ((start + i) % room) as u16))
}

/// `<unix seconds>-<pid>-<n>`: sortable by age, unique within and across processes.
fn unique_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{secs}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Removes stack directories older than a day: their logs have served their purpose, and
/// each holds a wrangler state directory.
fn prune_old_stacks(stacks: &Path) {
    let Ok(entries) = std::fs::read_dir(stacks) else {
        return;
    };
    let day = Duration::from_secs(86_400);
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > day);
        if old && entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A bearer token with 122 random bits.
pub fn random_token(kind: &str) -> String {
    format!("{kind}-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh `WEBHOOK_SECRET`: `whsec_` and the base64 of 32 bytes from two random UUIDs (244
/// random bits).
pub fn random_webhook_secret() -> String {
    use base64::Engine as _;
    let mut key = uuid::Uuid::new_v4().into_bytes().to_vec();
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_keep_fixed_ones() {
        let [a, b, c] = free_ports([None, Some(8787), None]).unwrap();
        assert_eq!(b, 8787);
        assert_ne!(a, c);
        let [d] = free_ports([None]).unwrap();
        assert!(![a, c].contains(&d));
    }

    #[test]
    fn free_ports_stay_out_of_the_ephemeral_range_when_there_is_room() {
        let Some(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok() else {
            return;
        };
        let ephemeral_start: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        if ephemeral_start < 11_000 {
            return;
        }
        let ports = free_ports([None; 8]).unwrap();
        assert!(ports.iter().all(|p| (10_000..ephemeral_start).contains(p)), "{ports:?} vs {ephemeral_start}");
    }

    #[test]
    fn names_and_tokens_are_unique() {
        assert_ne!(unique_name(), unique_name());
        let token = random_token("client");
        assert!(token.starts_with("client-") && token.len() == 39, "{token}");
        assert_ne!(token, random_token("client"));
    }
}
