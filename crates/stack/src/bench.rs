//! `stack bench`: benchmarks of the whole local stack (both workers under `wrangler dev`, the
//! Arrakis simulator without injected latency, the daemon), printed as Markdown tables.
//!
//! Sections, each selectable with `--only`:
//!
//! - `lone`: tasks submitted one at a time (`run_command` `echo x` on one VM launched first),
//!   each waited for before the next; latency from the task timelines.
//! - `throughput`: `--tasks` tasks over `--vms` VMs (each VM: one `launch_vm`, then
//!   `run_command`s) from `--submitters` concurrent submitters, on a fresh stack per daemon
//!   `MAX_CONCURRENCY`; tasks per second from the first submission until all are terminal.
//! - `api`: `POST /vm/tasks` latency with `--api-clients` concurrent clients on a stack
//!   without a daemon (tasks target a server nobody serves).
//! - `idle`: the operations of an idle stack with its daemon, with the shipped worker vars,
//!   extrapolated to an hour and a day.
//! - `footprint`: the workers' wasm sizes, raw and `gzip -9`, and the daemon's memory.
//! - `pickup`: one task submitted after the daemon has been idle longer than a long poll.
//!
//! Cost per task comes from the deltas of both workers' `GET /stats` over the lone and
//! throughput runs, and worker requests from `wrangler dev`'s request log. The benchmark
//! learns that tasks finished from the daemon's `/metrics` (which costs the workers nothing)
//! and reads the task timelines only after the closing `/stats` snapshot, so the deltas hold
//! the system's own operations only.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    future::Future,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use uuid::Uuid;
use vm_task_types::{wire::OpCounts, Task, TaskStatus};

use crate::{client::http_client, repo_root, ApiClient, Stack, StackOptions};

// -------------------------------------------------------------------------------------------
// Prices: Cloudflare Workers Paid list prices in USD per million operations, without the
// monthly allotments the plan includes (10 M KV reads, 1 M KV writes/deletes/lists each,
// 1 M queue operations, 10 M requests): the figures are marginal costs.

/// Workers KV: reads.
pub const KV_READ_USD_PER_MILLION: f64 = 0.50;
/// Workers KV: writes, deletes and lists, each billed at this price.
pub const KV_WRITE_CLASS_USD_PER_MILLION: f64 = 5.00;
/// Queues: per operation (a 64 KB chunk written, read or deleted).
pub const QUEUE_OP_USD_PER_MILLION: f64 = 0.40;
/// Queue operations per message delivered once: write, read, delete. A retry adds a read.
pub const QUEUE_OPS_PER_MESSAGE: u64 = 3;
/// Workers requests (HTTP requests and, counted here too, queue consumer invocations).
pub const REQUEST_USD_PER_MILLION: f64 = 0.30;
/// A month for the idle cost: 30 days.
const HOURS_PER_MONTH: f64 = 720.0;

// -------------------------------------------------------------------------------------------
// Defaults: the sizes the issue asks for.

pub const DEFAULT_LONE: usize = 50;
pub const DEFAULT_TASKS: usize = 500;
pub const DEFAULT_VMS: usize = 50;
pub const DEFAULT_SUBMITTERS: usize = 32;
pub const DEFAULT_CONCURRENCY: [usize; 3] = [1, 8, 32];
pub const DEFAULT_API_REQUESTS: usize = 1000;
pub const DEFAULT_API_CLIENTS: usize = 32;
pub const DEFAULT_IDLE_SECS: u64 = 60;
pub const DEFAULT_PICKUP_IDLE_SECS: u64 = 40;

/// Targets printed beside the figures.
const TARGET_POST_TO_CLAIMED_P50_MS: u64 = 1000;
const TARGET_TASKS_PER_SEC: f64 = 50.0;
const TARGET_PICKUP_MS: u64 = 2000;
/// The repository's own wasm budget (workspace `Cargo.toml`: "the 1 MB gzip target").
const TARGET_WASM_GZIP_BYTES: u64 = 1_000_000;

/// The daemon settings the stacks leave at their defaults (`local-consumer --help`).
const DAEMON_POLL_WAIT_SECONDS: u64 = 25;
const DAEMON_RELIST_SECONDS: u64 = 300;
const DAEMON_MAX_CONCURRENCY: usize = 8;

/// The server the daemon serves (the stack's default `SERVER_NAMES`).
const SERVER: &str = "production";
/// A server no daemon serves, for the API latency run.
const UNSERVED: &str = "bench-unserved";

/// How long any single task may take before the run is declared stuck.
const TASK_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound on waiting for a whole throughput run to drain.
const THROUGHPUT_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Section {
    Lone,
    Throughput,
    Api,
    /// Idle cost per daemon (alias `cost`).
    #[value(alias = "cost")]
    Idle,
    Footprint,
    Pickup,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Sections to run; all when empty.
    pub sections: Vec<Section>,
    pub lone: usize,
    /// Before each lone task, a random pause in `[0, lone_gap_ms)`: decouples submissions from
    /// the phase of the doorbell checks (0: submit as soon as the previous task is reported).
    pub lone_gap_ms: u64,
    pub tasks: usize,
    pub vms: usize,
    pub submitters: usize,
    pub concurrency: Vec<usize>,
    pub api_requests: usize,
    pub api_clients: usize,
    pub idle_secs: u64,
    pub pickup_idle_secs: u64,
    /// Worker var overrides for the latency, throughput and API stacks; never for the idle
    /// measurement, which runs on the shipped vars.
    pub worker_vars: Vec<(String, String)>,
    /// The command line, as printed in the report.
    pub command: String,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            sections: Vec::new(),
            lone: DEFAULT_LONE,
            lone_gap_ms: 0,
            tasks: DEFAULT_TASKS,
            vms: DEFAULT_VMS,
            submitters: DEFAULT_SUBMITTERS,
            concurrency: DEFAULT_CONCURRENCY.to_vec(),
            api_requests: DEFAULT_API_REQUESTS,
            api_clients: DEFAULT_API_CLIENTS,
            idle_secs: DEFAULT_IDLE_SECS,
            pickup_idle_secs: DEFAULT_PICKUP_IDLE_SECS,
            worker_vars: Vec::new(),
            command: String::new(),
        }
    }
}

impl BenchOptions {
    fn wants(&self, section: Section) -> bool {
        self.sections.is_empty() || self.sections.contains(&section)
    }

    fn check(&self) -> Result<()> {
        ensure!(self.lone >= 1, "--lone must be at least 1");
        ensure!(self.vms >= 1 && self.tasks >= self.vms, "--tasks must be at least --vms, and --vms at least 1");
        ensure!(self.submitters >= 1 && self.api_clients >= 1, "--submitters and --api-clients must be at least 1");
        ensure!(self.api_requests >= 1, "--api-requests must be at least 1");
        ensure!(
            !self.concurrency.is_empty() && self.concurrency.iter().all(|c| (1..=1024).contains(c)),
            "--concurrency takes values from 1 to 1024"
        );
        ensure!(self.idle_secs >= 1, "--idle-secs must be at least 1");
        Ok(())
    }
}

/// Runs the selected sections, printing each table to stdout as it is measured and a summary
/// of the targets at the end. Progress goes to the log (stderr).
pub async fn run(opts: BenchOptions) -> Result<()> {
    opts.check()?;
    let root = repo_root();
    let mut report = Report::default();
    emit(&header(&root, &opts));

    let mut lone_result = None;
    let mut idle_result = None;
    let mut throughput_results = Vec::new();

    let idle_on_latency_stack = opts.wants(Section::Idle) && opts.worker_vars.is_empty();
    if opts.wants(Section::Lone) || opts.wants(Section::Pickup) || idle_on_latency_stack {
        tracing::info!("starting the latency stack");
        let stack = Stack::start(with_vars(StackOptions::default(), &opts.worker_vars)).await?;
        let daemon = DaemonProbe::new(&stack);
        let mut last_task_done = Instant::now();
        if opts.wants(Section::Lone) {
            let result = lone(&stack, &daemon, opts.lone, opts.lone_gap_ms).await?;
            last_task_done = result.last_done;
            emit(&result.render(&mut report.targets));
            lone_result = Some(result);
        }
        if idle_on_latency_stack {
            let result = idle(&stack, &daemon, opts.idle_secs).await?;
            emit(&result.render());
            idle_result = Some(result);
        }
        if opts.wants(Section::Pickup) {
            let result = pickup(&stack, &daemon, last_task_done, opts.pickup_idle_secs).await?;
            emit(&result.render(&mut report.targets));
        }
        shut_down(stack).await;
    }
    if opts.wants(Section::Idle) && !idle_on_latency_stack {
        tracing::info!("starting a stack with the shipped worker vars for the idle measurement");
        let stack = Stack::start(StackOptions::default()).await?;
        let daemon = DaemonProbe::new(&stack);
        let result = idle(&stack, &daemon, opts.idle_secs).await?;
        emit(&result.render());
        idle_result = Some(result);
        shut_down(stack).await;
    }
    if opts.wants(Section::Throughput) {
        for &concurrency in &opts.concurrency {
            throughput_results.push(throughput(&opts, concurrency).await?);
        }
        emit(&render_throughput(&opts, &throughput_results, &mut report.targets));
    }
    if opts.wants(Section::Api) {
        let result = api_latency(&opts).await?;
        emit(&result.render());
    }
    if lone_result.is_some() || !throughput_results.is_empty() || idle_result.is_some() {
        emit(&render_cost(lone_result.as_ref(), &throughput_results, idle_result.as_ref()));
    }
    if opts.wants(Section::Footprint) {
        let rss = throughput_results.iter().rev().find(|r| r.concurrency == 32).and_then(|r| r.memory);
        emit(&render_footprint(&root, rss, &mut report.targets));
    }
    emit(&report.summary());
    Ok(())
}

fn with_vars(mut opts: StackOptions, vars: &[(String, String)]) -> StackOptions {
    for (name, value) in vars {
        opts = opts.worker_var(name, value);
    }
    opts
}

async fn shut_down(stack: Stack) {
    if let Err(e) = stack.shutdown().await {
        tracing::warn!("stack shutdown: {e:#}");
    }
}

#[derive(Debug, Default)]
struct Report {
    targets: Vec<(String, bool)>,
}

fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}");
    let _ = stdout.flush();
}

impl Report {
    fn summary(&self) -> String {
        let mut out = String::from("## Targets\n\n");
        if self.targets.is_empty() {
            out.push_str("(no section with a target ran)\n");
        }
        for (what, ok) in &self.targets {
            let _ = writeln!(out, "- {} {what}", mark(*ok));
        }
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        let _ = writeln!(out, "\nFinished {}; load average at the end {}.", utc_now(), load.join(" "));
        out
    }
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "✓ pass"
    } else {
        "✗ miss"
    }
}

// -------------------------------------------------------------------------------------------
// Header: machine, command, settings

fn header(root: &Path, opts: &BenchOptions) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let processors = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(processors);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = meminfo_kb(&meminfo, "MemTotal").unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let commit = command_output(root, "git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        command_output(root, "git", &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let consumer_toml = std::fs::read_to_string(root.join("wrangler-consumer.toml")).unwrap_or_default();
    let api_toml = std::fs::read_to_string(root.join("wrangler-api.toml")).unwrap_or_default();
    let shipped = |text: &str, key: &str| toml_value(text, key).unwrap_or_else(|| "?".into());
    let bell = shipped(&consumer_toml, "BELL_CHECK_MS");
    let bell_used = opts
        .worker_vars
        .iter()
        .rev()
        .find(|(k, _)| k == "BELL_CHECK_MS")
        .map(|(_, v)| format!("{v} (overridden with --var)"))
        .unwrap_or_else(|| format!("{bell} (shipped in wrangler-consumer.toml; `stack dev` sets none)"));
    let overrides = if opts.worker_vars.is_empty() {
        "none".to_owned()
    } else {
        opts.worker_vars.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
    };
    let sections = if opts.sections.is_empty() {
        "all".to_owned()
    } else {
        opts.sections.iter().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>().join(",")
    };
    format!(
        "# stack bench\n\n\
         - started: {started}, commit {commit}{dirty}\n\
         - machine: {cores} cores ({processors} processors in /proc/cpuinfo), {mem:.1} GiB memory, CPU: {model}; \
           load average at start {load}\n\
         - command: `{command}`\n\
         - sections: {sections}\n\
         - stacks: both workers under `wrangler dev` (local KV and Queues, one isolate per worker, through the dev \
           gateway), the Arrakis simulator with no injected latency, the release daemon; all on loopback, sharing \
           the machine with this benchmark's own clients\n\
         - worker vars: shipped `wrangler-*.toml`; BELL_CHECK_MS {bell_used}, WAIT_POLL_MS {wait_poll}, queue \
           max_batch_size {batch}, max_batch_timeout {batch_timeout}; overrides for the latency/throughput/API \
           stacks: {overrides}; the idle measurement always uses the shipped vars\n\
         - daemon: defaults (POLL_WAIT_SECONDS {poll}, RELIST_SECONDS {relist}, MAX_CONCURRENCY {conc} unless a \
           section says otherwise), RUST_LOG=info\n\
         - method: task completion is detected from the daemon's `/metrics` (no worker operations) and timelines \
           are read after the closing `/stats` snapshot, so operation counts are the system's own; the \
           consumer's `/stats` lists the buffer once per call, which is subtracted; worker requests are counted \
           from `wrangler dev`'s request log (the benchmark's own `/stats`, task reads and health checks \
           excluded; queue consumer invocations included)\n\
         - prices (Cloudflare Workers Paid, USD, included free allotments ignored): KV reads \
           ${KV_READ_USD_PER_MILLION:.2}/M; KV writes, deletes, lists ${KV_WRITE_CLASS_USD_PER_MILLION:.2}/M each; \
           Queues ${QUEUE_OP_USD_PER_MILLION:.2}/M operations, {QUEUE_OPS_PER_MESSAGE} per message (write, read, \
           delete) plus 1 per retry; Workers requests ${REQUEST_USD_PER_MILLION:.2}/M; a month is 30 days\n",
        started = utc_now(),
        dirty = if dirty { " with uncommitted changes" } else { "" },
        mem = mem_kb as f64 / 1024.0 / 1024.0,
        load = load.join(" "),
        command = opts.command,
        wait_poll = shipped(&api_toml, "WAIT_POLL_MS"),
        batch = shipped(&consumer_toml, "max_batch_size"),
        batch_timeout = shipped(&consumer_toml, "max_batch_timeout"),
        poll = DAEMON_POLL_WAIT_SECONDS,
        relist = DAEMON_RELIST_SECONDS,
        conc = DAEMON_MAX_CONCURRENCY,
    )
}

fn utc_now() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    vm_task_types::Timestamp(ms).to_string()
}

fn meminfo_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.split_whitespace().next()?.parse().ok()).flatten()
    })
}

/// The first `key = "value"` (or `key = value`) in a TOML text, unquoted.
fn toml_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.split('#').next().unwrap_or("").trim().trim_matches('"').to_owned())
    })
}

fn command_output(dir: &Path, program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program).args(args).current_dir(dir).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

// -------------------------------------------------------------------------------------------
// Measuring tools: the daemon's metrics, the workers' /stats, wrangler's request log

/// Reads the daemon's `/metrics`, which costs the workers nothing.
struct DaemonProbe {
    http: reqwest::Client,
    url: String,
}

impl DaemonProbe {
    fn new(stack: &Stack) -> Self {
        Self { http: http_client(Duration::from_secs(5)), url: format!("{}/metrics", stack.metrics_url()) }
    }

    async fn metrics(&self) -> Result<String> {
        let response = self.http.get(&self.url).send().await.with_context(|| format!("GET {}", self.url))?;
        ensure!(response.status().is_success(), "GET {} answered {}", self.url, response.status());
        Ok(response.text().await?)
    }

    /// Tasks the daemon has reported, completed or failed.
    async fn finished(&self) -> Result<u64> {
        let text = self.metrics().await?;
        Ok(metric_sum(&text, "local_consumer_tasks_completed_total")
            + metric_sum(&text, "local_consumer_tasks_failed_total"))
    }

    /// Long polls the daemon has completed, whatever their outcome.
    async fn polls(&self) -> Result<u64> {
        Ok(metric_sum(&self.metrics().await?, "local_consumer_polls_total"))
    }

    /// Waits until the daemon has reported `target` tasks in all; returns when it saw that.
    async fn wait_finished(&self, target: u64, every: Duration, timeout: Duration) -> Result<Instant> {
        let start = Instant::now();
        loop {
            let finished = self.finished().await?;
            if finished >= target {
                return Ok(Instant::now());
            }
            if start.elapsed() > timeout {
                bail!("the daemon reported {finished} of {target} tasks within {timeout:?}");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Waits for the next completed long poll; returns when it saw it.
    async fn wait_next_poll(&self, timeout: Duration) -> Result<Instant> {
        let start = Instant::now();
        let before = self.polls().await?;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.polls().await? > before {
                return Ok(Instant::now());
            }
            if start.elapsed() > timeout {
                bail!("the daemon completed no poll within {timeout:?}");
            }
        }
    }
}

/// The sum of every sample of one Prometheus counter, over its labels.
fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Both workers' operation counts at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    api: OpCounts,
    consumer: OpCounts,
    /// Lists the consumer's `/stats` made to answer (one per 1000 buffered tasks, at least one).
    stats_lists: u64,
}

async fn snapshot(api: &ApiClient) -> Result<Snapshot> {
    let a = api.api_stats().await.context("GET /stats")?;
    let c = api.consumer_stats().await.context("GET /consumer/stats")?;
    let buffered = c.buffered_total.unwrap_or(0) as u64;
    Ok(Snapshot { api: a.ops, consumer: c.ops, stats_lists: buffered.div_ceil(1000).max(1) })
}

/// Operations between two snapshots, without the closing `/stats` call's own listing.
#[derive(Debug, Clone, Copy, Default)]
struct Ops {
    api: OpCounts,
    consumer: OpCounts,
}

impl Ops {
    fn between(before: &Snapshot, after: &Snapshot) -> Self {
        let mut consumer = sub(&after.consumer, &before.consumer);
        consumer.kv_lists = consumer.kv_lists.saturating_sub(after.stats_lists);
        Ops { api: sub(&after.api, &before.api), consumer }
    }

    fn total(&self) -> OpCounts {
        let (a, c) = (&self.api, &self.consumer);
        OpCounts {
            kv_reads: a.kv_reads + c.kv_reads,
            kv_writes: a.kv_writes + c.kv_writes,
            kv_deletes: a.kv_deletes + c.kv_deletes,
            kv_lists: a.kv_lists + c.kv_lists,
            queue_sends: a.queue_sends + c.queue_sends,
            queue_acks: a.queue_acks + c.queue_acks,
            queue_retries: a.queue_retries + c.queue_retries,
        }
    }
}

fn sub(a: &OpCounts, b: &OpCounts) -> OpCounts {
    OpCounts {
        kv_reads: a.kv_reads.saturating_sub(b.kv_reads),
        kv_writes: a.kv_writes.saturating_sub(b.kv_writes),
        kv_deletes: a.kv_deletes.saturating_sub(b.kv_deletes),
        kv_lists: a.kv_lists.saturating_sub(b.kv_lists),
        queue_sends: a.queue_sends.saturating_sub(b.queue_sends),
        queue_acks: a.queue_acks.saturating_sub(b.queue_acks),
        queue_retries: a.queue_retries.saturating_sub(b.queue_retries),
    }
}

/// Worker requests seen in `wrangler dev`'s log between two offsets, by kind, with the
/// duration wrangler printed for each (gateway included).
#[derive(Debug, Clone, Default)]
struct Requests {
    by_kind: BTreeMap<&'static str, Vec<u64>>,
    queue_messages: u64,
}

/// Kinds that are part of the system's work (billable); anything else is the benchmark's own.
const SYSTEM_KINDS: [&str; 8] =
    ["submit", "queue batch", "poll", "predecessor check", "claim", "heartbeat/release", "report", "dlq batch"];

impl Requests {
    fn read(log: &Path, from: u64, to: u64) -> Self {
        let bytes = std::fs::read(log).unwrap_or_default();
        let from = (from as usize).min(bytes.len());
        let to = (to as usize).clamp(from, bytes.len());
        let mut requests = Requests::default();
        for line in String::from_utf8_lossy(&bytes[from..to]).lines() {
            if let Some((kind, ms, messages)) = classify_log_line(line) {
                requests.by_kind.entry(kind).or_default().push(ms);
                requests.queue_messages += messages;
            }
        }
        requests
    }

    fn count(&self, kind: &str) -> u64 {
        self.by_kind.get(kind).map_or(0, |v| v.len() as u64)
    }

    /// Billable worker requests.
    fn system(&self) -> u64 {
        SYSTEM_KINDS.iter().map(|k| self.count(k)).sum()
    }
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// `[wrangler:info] POST /vm/tasks 202 Accepted (36ms)` → (`submit`, 36, 0);
/// `[wrangler:info] QUEUE vm-task-queue 3/3 (23ms)` → (`queue batch`, 23, 3).
fn classify_log_line(line: &str) -> Option<(&'static str, u64, u64)> {
    let rest = line.trim().strip_prefix("[wrangler:")?;
    let (_, rest) = rest.split_once("] ")?;
    let (head, tail) = rest.rsplit_once(" (")?;
    let duration = tail.strip_suffix(')')?;
    let ms = if let Some(ms) = duration.strip_suffix("ms") {
        ms.trim().parse::<f64>().ok()?
    } else {
        duration.strip_suffix('s')?.trim().parse::<f64>().ok()? * 1000.0
    };
    let ms = ms.round() as u64;
    let mut words = head.split_whitespace();
    let method = words.next()?;
    let target = words.next()?;
    if method == "QUEUE" {
        let messages = words.next().and_then(|n| n.split('/').next_back()?.parse().ok()).unwrap_or(0);
        let kind = if target.ends_with("dlq") { "dlq batch" } else { "queue batch" };
        return Some((kind, ms, messages));
    }
    let path = target.split('?').next().unwrap_or(target);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let kind = match (method, segments.as_slice()) {
        ("POST", ["vm", "tasks"]) => "submit",
        ("GET", ["consumer", "tasks", "ready"]) => "poll",
        ("POST", ["consumer", "tasks", _, "claim"]) => "claim",
        ("POST", ["consumer", "tasks", _, "heartbeat" | "release"]) => "heartbeat/release",
        ("PUT", ["vm", "tasks", _, "status"]) => "report",
        // The benchmark reads tasks with GET /vm/tasks/:id, never /status: these are the
        // daemon's checks that a task's predecessor on the VM is finished.
        ("GET", ["vm", "tasks", _, "status"]) => "predecessor check",
        _ if method.chars().all(|c| c.is_ascii_uppercase()) => "other",
        _ => return None,
    };
    Some((kind, ms, 0))
}

/// Runs `n` jobs on `workers` concurrent workers; results in job order.
async fn fan_out<T, F, Fut>(n: usize, workers: usize, job: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = T> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers.min(n) {
        let (next, job) = (next.clone(), job.clone());
        set.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return done;
                }
                done.push((i, job(i).await));
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(done) => all.extend(done),
            Err(e) => tracing::warn!("a benchmark worker panicked: {e}"),
        }
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}

/// Reads whole tasks (with timelines), 8 at a time.
async fn fetch_tasks(api: &ApiClient, ids: &[Uuid]) -> Vec<Option<Task>> {
    let (api, ids) = (api.clone(), Arc::new(ids.to_vec()));
    fan_out(ids.len(), 8, move |i| {
        let (api, ids) = (api.clone(), ids.clone());
        async move {
            match api.task(ids[i]).await {
                Ok(task) => Some(task),
                Err(e) => {
                    tracing::warn!("could not read task {}: {e}", ids[i]);
                    None
                }
            }
        }
    })
    .await
}

// -------------------------------------------------------------------------------------------
// Timelines

/// When a task passed each step, in ms since the epoch, from its timeline.
#[derive(Debug, Clone, Copy)]
struct Phases {
    created: u64,
    buffered: u64,
    claimed: u64,
    done: u64,
}

fn phases(task: &Task) -> Option<Phases> {
    let at = |event: &str| task.event_at(event).map(|t| t.as_millis());
    Some(Phases {
        created: at("created")?,
        buffered: at("buffered")?,
        claimed: at("claimed")?,
        done: task.entered(TaskStatus::Completed).map(|t| t.as_millis())?,
    })
}

#[derive(Debug, Clone, Default)]
struct Splits {
    post_completed: Vec<u64>,
    queued_buffered: Vec<u64>,
    buffered_claimed: Vec<u64>,
    claimed_completed: Vec<u64>,
    post_claimed: Vec<u64>,
}

impl Splits {
    fn of(tasks: &[Option<Task>]) -> Self {
        let mut s = Splits::default();
        for p in tasks.iter().flatten().filter(|t| t.status == TaskStatus::Completed).filter_map(phases) {
            s.post_completed.push(p.done.saturating_sub(p.created));
            s.queued_buffered.push(p.buffered.saturating_sub(p.created));
            s.buffered_claimed.push(p.claimed.saturating_sub(p.buffered));
            s.claimed_completed.push(p.done.saturating_sub(p.claimed));
            s.post_claimed.push(p.claimed.saturating_sub(p.created));
        }
        s
    }
}

/// When the last of `tasks` was buffered, claimed and completed, in ms after the first one was
/// created: shows which stage the run waited on.
fn phase_ends(tasks: &[Option<Task>]) -> Option<[u64; 3]> {
    let all: Vec<Phases> = tasks.iter().flatten().filter_map(phases).collect();
    let first = all.iter().map(|p| p.created).min()?;
    let last = |f: fn(&Phases) -> u64| all.iter().map(f).max().unwrap_or(first).saturating_sub(first);
    Some([last(|p| p.buffered), last(|p| p.claimed), last(|p| p.done)])
}

/// Nearest-rank percentile of unsorted values; 0 for none.
fn percentile(values: &[u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(v: u64) -> String {
    format!("{v} ms")
}

fn statuses(tasks: &[Option<Task>]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for task in tasks {
        let key = task.as_ref().map_or("unreadable".to_owned(), |t| t.status.to_string());
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

fn describe_counts(counts: &BTreeMap<String, usize>) -> String {
    counts.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
}

/// A Markdown table with padded columns.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c}{}", " ".repeat(widths[i].saturating_sub(c.chars().count()))))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

// -------------------------------------------------------------------------------------------
// Lone-task latency

#[derive(Debug)]
struct LoneResult {
    n: usize,
    gap_ms: u64,
    splits: Splits,
    /// POST sent until the daemon's metrics showed the task reported (polled every 20 ms).
    client_ms: Vec<u64>,
    /// POST round trips.
    post_ms: Vec<u64>,
    statuses: BTreeMap<String, usize>,
    ops: Ops,
    requests: Requests,
    last_done: Instant,
}

async fn lone(stack: &Stack, daemon: &DaemonProbe, n: usize, gap_ms: u64) -> Result<LoneResult> {
    let api = stack.client();
    let vm = "bench-lone-vm";
    tracing::info!("lone: launching {vm}, then {n} run_command tasks one at a time");
    let mut reported = daemon.finished().await?;
    let launch = api.submit_op("launch_vm", json!({"vmName": vm, "targetServer": SERVER})).await?;
    daemon.wait_finished(reported + 1, Duration::from_millis(20), TASK_TIMEOUT).await?;
    reported += 1;
    let launched = api.task(launch.task_id).await?;
    ensure!(launched.status == TaskStatus::Completed, "launching {vm} ended {}: {:?}", launched.status, launched.error);
    // Let the daemon settle into its next long poll, as a real idle-then-busy host would be.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let log = stack.log_path("wrangler");
    let before = snapshot(&api).await?;
    let log_from = log_len(&log);
    let (mut ids, mut client_ms, mut post_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_done = Instant::now();
    for i in 0..n {
        if gap_ms > 0 {
            let pause = (Uuid::new_v4().as_u128() % u128::from(gap_ms)) as u64;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        let sent = Instant::now();
        let created = api.submit_op("run_command", json!({"vmName": vm, "command": "echo x"})).await?;
        post_ms.push(sent.elapsed().as_millis() as u64);
        last_done = daemon.wait_finished(reported + 1, Duration::from_millis(20), TASK_TIMEOUT).await?;
        reported += 1;
        client_ms.push(last_done.duration_since(sent).as_millis() as u64);
        ids.push(created.task_id);
        if (i + 1) % 10 == 0 {
            tracing::info!("lone: {} of {n} done", i + 1);
        }
    }
    let after = snapshot(&api).await?;
    let log_to = log_len(&log);
    let tasks = fetch_tasks(&api, &ids).await;
    Ok(LoneResult {
        n,
        gap_ms,
        splits: Splits::of(&tasks),
        client_ms,
        post_ms,
        statuses: statuses(&tasks),
        ops: Ops::between(&before, &after),
        requests: Requests::read(&log, log_from, log_to),
        last_done,
    })
}

impl LoneResult {
    fn render(&self, targets: &mut Vec<(String, bool)>) -> String {
        let s = &self.splits;
        let row = |name: &str, v: &[u64], target: String| {
            vec![
                name.to_owned(),
                v.len().to_string(),
                ms(percentile(v, 50.0)),
                ms(percentile(v, 90.0)),
                ms(percentile(v, 99.0)),
                ms(percentile(v, 100.0)),
                target,
            ]
        };
        let p50_claimed = percentile(&s.post_claimed, 50.0);
        let claimed_ok = !s.post_claimed.is_empty() && p50_claimed < TARGET_POST_TO_CLAIMED_P50_MS;
        targets.push((format!("lone task POST→claimed p50 {} (target < 1 s)", ms(p50_claimed)), claimed_ok));
        let rows = vec![
            row("POST→completed (created→completed)", &s.post_completed, String::new()),
            row("  queued→buffered (created→buffered)", &s.queued_buffered, String::new()),
            row("  buffered→claimed", &s.buffered_claimed, String::new()),
            row("  claimed→completed", &s.claimed_completed, String::new()),
            row("POST→claimed", &s.post_claimed, format!("p50 < 1 s: {}", mark(claimed_ok))),
            row("client: POST sent→reported (daemon /metrics, ±20 ms)", &self.client_ms, String::new()),
            row("client: POST round trip", &self.post_ms, String::new()),
        ];
        let per = |kind: &str| self.requests.count(kind) as f64 / self.n as f64;
        format!(
            "## Lone-task latency\n\n\
             {n} `run_command` `echo x` tasks on one VM launched first (`bench-lone-vm`), submitted one at a time, \
             each {gap}; MAX_CONCURRENCY {conc}. Timeline figures are the \
             workers' `at` stamps (ms). Statuses: {statuses}.\n\n{table}\n\
             Per task: {polls:.2} polls, {pre:.2} predecessor checks, {claims:.2} claims, {reports:.2} reports, \
             {batches:.2} queue batches. Server-side p50 (wrangler log, gateway included): poll {poll_ms}, \
             predecessor check {pre_ms}, claim {claim_ms}, report {report_ms}, POST {post_ms}, queue batch \
             {queue_ms}.\n",
            n = self.n,
            gap = if self.gap_ms == 0 {
                "as soon as the previous one was reported".to_owned()
            } else {
                format!("a random 0–{} ms (--lone-gap-ms) after the previous one was reported", self.gap_ms)
            },
            conc = DAEMON_MAX_CONCURRENCY,
            statuses = describe_counts(&self.statuses),
            table = table(&["", "n", "p50", "p90", "p99", "max", "target"], &rows),
            polls = per("poll"),
            pre = per("predecessor check"),
            claims = per("claim"),
            reports = per("report"),
            batches = per("queue batch"),
            poll_ms = ms(self.server_p50("poll")),
            pre_ms = ms(self.server_p50("predecessor check")),
            claim_ms = ms(self.server_p50("claim")),
            report_ms = ms(self.server_p50("report")),
            post_ms = ms(self.server_p50("submit")),
            queue_ms = ms(self.server_p50("queue batch")),
        )
    }

    fn server_p50(&self, kind: &str) -> u64 {
        self.requests.by_kind.get(kind).map_or(0, |v| percentile(v, 50.0))
    }
}

// -------------------------------------------------------------------------------------------
// Idle cost

#[derive(Debug)]
struct IdleResult {
    window: Duration,
    polls: u64,
    ops: Ops,
    requests: Requests,
    bell_check_ms: String,
    sweep: Option<Ops>,
}

async fn idle(stack: &Stack, daemon: &DaemonProbe, idle_secs: u64) -> Result<IdleResult> {
    let api = stack.client();
    let log = stack.log_path("wrangler");
    let poll_timeout = Duration::from_secs(DAEMON_POLL_WAIT_SECONDS + 20);
    tracing::info!("idle: waiting for the daemon to finish a long poll, then measuring ≥ {idle_secs} s");
    // The window runs from the end of one long poll to the end of a later one, so it holds
    // whole polls: each poll's doorbell reads and its request.
    daemon.wait_next_poll(poll_timeout).await?;
    let before = snapshot(&api).await?;
    let log_from = log_len(&log);
    let polls_before = daemon.polls().await?;
    let start = Instant::now();
    loop {
        daemon.wait_next_poll(poll_timeout).await?;
        if start.elapsed() >= Duration::from_secs(idle_secs) {
            break;
        }
    }
    let after = snapshot(&api).await?;
    let window = start.elapsed();
    let log_to = log_len(&log);
    let polls = daemon.polls().await?.saturating_sub(polls_before);
    // One cron-triggered lease sweep on the empty buffer: a per-deployment cost, not per daemon.
    let sweep = async {
        let before = snapshot(&api).await?;
        stack.sweep_now().await?;
        let after = snapshot(&api).await?;
        Ok::<_, anyhow::Error>(Ops::between(&before, &after))
    }
    .await
    .map_err(|e| tracing::warn!("could not measure a sweep: {e:#}"))
    .ok();
    let bell_check_ms = toml_value(
        &std::fs::read_to_string(stack.dir().join("wrangler-consumer.toml")).unwrap_or_default(),
        "BELL_CHECK_MS",
    )
    .unwrap_or_else(|| "?".into());
    Ok(IdleResult {
        window,
        polls,
        ops: Ops::between(&before, &after),
        requests: Requests::read(&log, log_from, log_to),
        bell_check_ms,
        sweep,
    })
}

impl IdleResult {
    fn per_hour(&self) -> Cost {
        let scale = 3600.0 / self.window.as_secs_f64();
        Cost::of(&self.ops.total(), self.requests.system()).scaled(scale)
    }

    fn render(&self) -> String {
        let total = self.ops.total();
        let hour = self.per_hour();
        let day = hour.scaled(24.0);
        let rows = vec![
            vec![
                format!("measured, {:.1} s", self.window.as_secs_f64()),
                total.kv_reads.to_string(),
                total.kv_write_class().to_string(),
                self.requests.system().to_string(),
                self.polls.to_string(),
            ],
            vec![
                "per hour".into(),
                format!("{:.0}", hour.kv_reads),
                format!("{:.0}", hour.kv_write_class),
                format!("{:.0}", hour.requests),
                format!("{:.0}", self.polls as f64 * 3600.0 / self.window.as_secs_f64()),
            ],
            vec![
                "per day".into(),
                format!("{:.0}", day.kv_reads),
                format!("{:.0}", day.kv_write_class),
                format!("{:.0}", day.requests),
                format!("{:.0}", self.polls as f64 * 86_400.0 / self.window.as_secs_f64()),
            ],
        ];
        let relist_lists_per_hour = 3600 / DAEMON_RELIST_SECONDS;
        let sweep = match &self.sweep {
            Some(s) => {
                let t = s.total();
                format!(
                    "One cron lease sweep on an empty buffer costs {} KV reads and {} write-class operations \
                     (+1 request); the deployed cron runs it every minute, once per deployment, not per daemon: \
                     {:.0} write-class ops and 43,200 requests a month, ${:.3}/month.",
                    t.kv_reads,
                    t.kv_write_class(),
                    t.kv_write_class() as f64 * 60.0 * HOURS_PER_MONTH,
                    Cost::of(&t, 1).scaled(60.0 * HOURS_PER_MONTH).dollars()
                )
            }
            None => "The sweep could not be measured.".into(),
        };
        format!(
            "## Idle cost per daemon\n\n\
             An idle stack with its daemon (POLL_WAIT_SECONDS {poll}, shipped BELL_CHECK_MS {bell}); the window \
             runs from the end of one long poll to the end of the first poll ending after the requested time, \
             so it holds whole polls. Operations of both workers; requests from the wrangler log.\n\n{table}\n\
             Cost: **${month:.3} per idle host per month** (KV reads ${reads:.3}, write-class ${wc:.3}, requests \
             ${req:.3}). A full relisting every RELIST_SECONDS {relist} (1 list, 1 request; {relist_h}/hour) \
             falls outside a window this short unless it shows in the counts above: it would add \
             ${relist_month:.3}/month. {sweep}\n",
            poll = DAEMON_POLL_WAIT_SECONDS,
            bell = self.bell_check_ms,
            table = table(&["idle daemon", "KV reads", "KV write-class", "worker requests", "long polls"], &rows),
            month = hour.dollars() * HOURS_PER_MONTH,
            reads = hour.kv_reads * KV_READ_USD_PER_MILLION / 1e6 * HOURS_PER_MONTH,
            wc = hour.kv_write_class * KV_WRITE_CLASS_USD_PER_MILLION / 1e6 * HOURS_PER_MONTH,
            req = hour.requests * REQUEST_USD_PER_MILLION / 1e6 * HOURS_PER_MONTH,
            relist = DAEMON_RELIST_SECONDS,
            relist_h = relist_lists_per_hour,
            relist_month = relist_lists_per_hour as f64
                * HOURS_PER_MONTH
                * (KV_WRITE_CLASS_USD_PER_MILLION + REQUEST_USD_PER_MILLION)
                / 1e6,
        )
    }
}

// -------------------------------------------------------------------------------------------
// Idle pickup

#[derive(Debug)]
struct PickupResult {
    idle_for: Duration,
    phases: Option<Phases>,
    status: String,
}

async fn pickup(stack: &Stack, daemon: &DaemonProbe, idle_since: Instant, idle_secs: u64) -> Result<PickupResult> {
    let wanted = Duration::from_secs(idle_secs);
    let left = wanted.saturating_sub(idle_since.elapsed());
    tracing::info!("pickup: waiting {left:?} more so the daemon has been idle {wanted:?}");
    tokio::time::sleep(left).await;
    let api = stack.client();
    let reported = daemon.finished().await?;
    let idle_for = idle_since.elapsed();
    let created = api.submit_op("launch_vm", json!({"vmName": "bench-pickup-vm", "targetServer": SERVER})).await?;
    daemon.wait_finished(reported + 1, Duration::from_millis(20), TASK_TIMEOUT).await?;
    let task = api.task(created.task_id).await?;
    Ok(PickupResult { idle_for, phases: phases(&task), status: task.status.to_string() })
}

impl PickupResult {
    fn render(&self, targets: &mut Vec<(String, bool)>) -> String {
        let Some(p) = self.phases else {
            targets.push(("idle pickup (task did not complete)".into(), false));
            return format!("## Idle pickup\n\nThe task ended {} without a full timeline.\n", self.status);
        };
        let post_claimed = p.claimed.saturating_sub(p.created);
        let ok = post_claimed <= TARGET_PICKUP_MS;
        targets.push((format!("idle pickup POST→claimed {} (target ≤ 2 s)", ms(post_claimed)), ok));
        let rows = vec![vec![
            format!("{:.1} s", self.idle_for.as_secs_f64()),
            ms(post_claimed),
            ms(p.buffered.saturating_sub(p.created)),
            ms(p.claimed.saturating_sub(p.buffered)),
            ms(p.done.saturating_sub(p.created)),
            format!("≤ 2 s: {}", mark(ok)),
        ]];
        format!(
            "## Idle pickup\n\n\
             One `launch_vm` on a fresh VM (no predecessor) after the daemon had been idle longer than a long \
             poll ({poll} s). A single sample: with the doorbell read every BELL_CHECK_MS, where the task lands \
             in that cycle decides most of it.\n\n{}",
            table(
                &["daemon idle for", "POST→claimed", "queued→buffered", "buffered→claimed", "POST→completed", "target"],
                &rows
            ),
            poll = DAEMON_POLL_WAIT_SECONDS,
        )
    }
}

// -------------------------------------------------------------------------------------------
// Throughput

#[derive(Debug, Clone, Copy)]
struct Memory {
    idle_before_kb: u64,
    rss_after_kb: u64,
    hwm_kb: u64,
}

#[derive(Debug)]
struct ThroughputResult {
    concurrency: usize,
    submitted: usize,
    post_errors: usize,
    /// First POST sent until the last POST answered.
    submit_phase: Duration,
    /// First POST sent until the daemon had reported every accepted task.
    wall: Option<Duration>,
    statuses: BTreeMap<String, usize>,
    completed: usize,
    splits: Splits,
    /// When the last task was buffered, claimed and completed, in ms after the first was created.
    ends: Option<[u64; 3]>,
    post_ms: Vec<u64>,
    ops: Ops,
    requests: Requests,
    memory: Option<Memory>,
}

/// Task `j` of VM `v`: `launch_vm` first, then `run_command`s.
fn vm_tasks(tasks: usize, vms: usize, v: usize) -> usize {
    tasks / vms + usize::from(v < tasks % vms)
}

async fn throughput(opts: &BenchOptions, concurrency: usize) -> Result<ThroughputResult> {
    tracing::info!("throughput: starting a stack with MAX_CONCURRENCY {concurrency}");
    let stack_opts = with_vars(StackOptions::default(), &opts.worker_vars).daemon_env("MAX_CONCURRENCY", concurrency);
    let stack = Stack::start(stack_opts).await?;
    let daemon = DaemonProbe::new(&stack);
    let pid = stack.daemon_pid();
    if pid.is_none() {
        tracing::warn!("could not find the daemon's pid; no memory figures");
    }
    let api = stack.client();
    let log = stack.log_path("wrangler");
    // A second after startup: the daemon sits in its first long poll.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_before_kb = pid.and_then(|p| proc_status_kb(p, "VmRSS"));
    let reported = daemon.finished().await?;
    let before = snapshot(&api).await?;
    let log_from = log_len(&log);

    tracing::info!(
        "throughput: {} tasks over {} VMs from {} submitters, MAX_CONCURRENCY {concurrency}",
        opts.tasks,
        opts.vms,
        opts.submitters
    );
    let (tasks, vms) = (opts.tasks, opts.vms);
    let started = Instant::now();
    let client = api.clone();
    let per_vm = fan_out(vms, opts.submitters, move |v| {
        let api = client.clone();
        async move {
            let vm = format!("bench-vm-{v:03}");
            let mut out = Vec::new();
            for j in 0..vm_tasks(tasks, vms, v) {
                let sent = Instant::now();
                let result = if j == 0 {
                    api.submit_op("launch_vm", json!({"vmName": vm, "targetServer": SERVER})).await
                } else {
                    api.submit_op("run_command", json!({"vmName": vm, "command": "echo x"})).await
                };
                out.push(result.map(|c| (c.task_id, sent.elapsed().as_millis() as u64)).map_err(|e| e.to_string()));
            }
            out
        }
    })
    .await;
    let submit_phase = started.elapsed();
    let mut ids = Vec::new();
    let mut post_ms = Vec::new();
    let mut post_errors = 0;
    for result in per_vm.into_iter().flatten() {
        match result {
            Ok((id, ms)) => {
                ids.push(id);
                post_ms.push(ms);
            }
            Err(e) => {
                post_errors += 1;
                tracing::warn!("submission failed: {e}");
            }
        }
    }
    let wall =
        match daemon.wait_finished(reported + ids.len() as u64, Duration::from_millis(50), THROUGHPUT_TIMEOUT).await {
            Ok(done) => Some(done.duration_since(started)),
            Err(e) => {
                tracing::warn!("throughput (MAX_CONCURRENCY {concurrency}): {e:#}");
                None
            }
        };
    let after = snapshot(&api).await?;
    let log_to = log_len(&log);
    let memory = pid.and_then(|p| {
        Some(Memory {
            idle_before_kb: idle_before_kb?,
            rss_after_kb: proc_status_kb(p, "VmRSS")?,
            hwm_kb: proc_status_kb(p, "VmHWM")?,
        })
    });
    tracing::info!("throughput: reading {} timelines", ids.len());
    let fetched = fetch_tasks(&api, &ids).await;
    let statuses = statuses(&fetched);
    let completed = fetched.iter().flatten().filter(|t| t.status == TaskStatus::Completed).count();
    shut_down(stack).await;
    Ok(ThroughputResult {
        concurrency,
        submitted: ids.len(),
        post_errors,
        submit_phase,
        wall,
        statuses,
        completed,
        splits: Splits::of(&fetched),
        ends: phase_ends(&fetched),
        post_ms,
        ops: Ops::between(&before, &after),
        requests: Requests::read(&log, log_from, log_to),
        memory,
    })
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    meminfo_kb(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, key)
}

fn render_throughput(opts: &BenchOptions, results: &[ThroughputResult], targets: &mut Vec<(String, bool)>) -> String {
    let mut rows = Vec::new();
    let mut profile = Vec::new();
    for r in results {
        let all_completed = r.completed == opts.tasks && r.post_errors == 0;
        let rate = r.wall.map(|w| r.submitted as f64 / w.as_secs_f64());
        let rate_ok = rate.is_some_and(|x| x >= TARGET_TASKS_PER_SEC);
        targets.push((
            format!(
                "throughput at MAX_CONCURRENCY {}: {} (target ≥ 50 tasks/s)",
                r.concurrency,
                rate.map_or("did not finish".into(), |x| format!("{x:.1} tasks/s"))
            ),
            rate_ok,
        ));
        targets.push((
            format!("throughput at MAX_CONCURRENCY {}: {} of {} completed", r.concurrency, r.completed, opts.tasks),
            all_completed,
        ));
        rows.push(vec![
            r.concurrency.to_string(),
            format!("{}", r.submitted),
            format!("{} {}", r.completed, mark(all_completed)),
            r.wall.map_or("timeout".into(), |w| format!("{:.2} s", w.as_secs_f64())),
            rate.map_or("—".into(), |x| format!("{x:.1}")),
            mark(rate_ok).to_owned(),
            format!("{:.2} s", r.submit_phase.as_secs_f64()),
            format!("{} / {}", ms(percentile(&r.post_ms, 50.0)), ms(percentile(&r.post_ms, 99.0))),
            describe_counts(&r.statuses),
        ]);
        let s = &r.splits;
        let n = r.submitted.max(1) as f64;
        let p50 = |kind: &str| r.requests.by_kind.get(kind).map_or(0, |v| percentile(v, 50.0));
        profile.push(vec![
            r.concurrency.to_string(),
            format!("{} / {}", ms(percentile(&s.queued_buffered, 50.0)), ms(percentile(&s.queued_buffered, 99.0))),
            format!("{} / {}", ms(percentile(&s.buffered_claimed, 50.0)), ms(percentile(&s.buffered_claimed, 99.0))),
            format!("{} / {}", ms(percentile(&s.claimed_completed, 50.0)), ms(percentile(&s.claimed_completed, 99.0))),
            format!("{:.2}", r.requests.count("poll") as f64 / n),
            format!("{:.2} ({})", r.requests.count("predecessor check") as f64 / n, ms(p50("predecessor check"))),
            format!("{:.2} ({})", r.requests.count("claim") as f64 / n, ms(p50("claim"))),
            format!("{:.2} ({})", r.requests.count("report") as f64 / n, ms(p50("report"))),
            format!(
                "{} × {:.1}",
                r.requests.count("queue batch"),
                r.requests.queue_messages as f64 / r.requests.count("queue batch").max(1) as f64
            ),
            r.ends.map_or("—".into(), |[b, c, d]| {
                format!("{:.1} / {:.1} / {:.1} s", b as f64 / 1e3, c as f64 / 1e3, d as f64 / 1e3)
            }),
        ]);
    }
    format!(
        "## Throughput\n\n\
         {tasks} tasks over {vms} VMs (each VM: 1 `launch_vm`, then `run_command` `echo x`), submitted by {subs} \
         concurrent submitters (each takes a VM and submits its tasks one after another, so per-VM order holds); \
         a fresh stack per daemon MAX_CONCURRENCY. Rate: tasks from the first POST until the daemon had reported \
         every accepted task (its `/metrics`, polled every 50 ms); statuses read afterwards.\n\n{rows}\n\
         Where the time goes (timeline splits p50 / p99; per task: daemon requests, server-side p50 in \
         parentheses from the wrangler log; queue batches × mean messages; when the last task was buffered, claimed and \
         completed, after the first was created, from the timelines):\n\n{profile}",
        tasks = opts.tasks,
        vms = opts.vms,
        subs = opts.submitters,
        rows = table(
            &[
                "MAX_CONCURRENCY",
                "submitted",
                "completed",
                "first POST→all terminal",
                "tasks/s",
                "≥ 50/s",
                "submit phase",
                "POST p50 / p99",
                "statuses"
            ],
            &rows
        ),
        profile = table(
            &[
                "MAX_CONCURRENCY",
                "queued→buffered",
                "buffered→claimed",
                "claimed→completed",
                "polls",
                "predecessor checks",
                "claims",
                "reports",
                "queue batches",
                "last buffered / claimed / completed"
            ],
            &profile
        ),
    )
}

// -------------------------------------------------------------------------------------------
// API latency under load

#[derive(Debug)]
struct ApiResult {
    clients: usize,
    latencies: Vec<u64>,
    errors: usize,
    wall: Duration,
    first_error: Option<String>,
}

async fn api_latency(opts: &BenchOptions) -> Result<ApiResult> {
    tracing::info!("api: starting a stack without the daemon");
    let stack = Stack::start(with_vars(StackOptions::edge_only(), &opts.worker_vars)).await?;
    let api = stack.client();
    let (n, clients) = (opts.api_requests, opts.api_clients);
    let post = |api: ApiClient, name: String| async move {
        let sent = Instant::now();
        let result = api.submit_op("launch_vm", json!({"vmName": name, "targetServer": UNSERVED})).await;
        result.map(|_| sent.elapsed().as_micros() as u64).map_err(|e| e.to_string())
    };
    // One request per client first, so every connection is open before the clock starts.
    let warm = api.clone();
    let _ = fan_out(clients, clients, move |i| post(warm.clone(), format!("api-warm-{i}"))).await;
    tracing::info!("api: {n} POST /vm/tasks from {clients} concurrent clients");
    let started = Instant::now();
    let client = api.clone();
    let results = fan_out(n, clients, move |i| post(client.clone(), format!("api-bench-{i:05}"))).await;
    let wall = started.elapsed();
    shut_down(stack).await;
    let first_error = results.iter().find_map(|r| r.as_ref().err().cloned());
    let latencies: Vec<u64> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    Ok(ApiResult { clients, errors: results.len() - latencies.len(), latencies, wall, first_error })
}

impl ApiResult {
    fn render(&self) -> String {
        let l = &self.latencies;
        let msf = |us: u64| format!("{:.1} ms", us as f64 / 1000.0);
        let rows = vec![vec![
            self.clients.to_string(),
            (l.len() + self.errors).to_string(),
            self.errors.to_string(),
            msf(percentile(l, 50.0)),
            msf(percentile(l, 90.0)),
            msf(percentile(l, 99.0)),
            msf(percentile(l, 100.0)),
            format!("{:.0}", l.len() as f64 / self.wall.as_secs_f64()),
        ]];
        let error = self.first_error.as_ref().map(|e| format!("First error: {e}\n")).unwrap_or_default();
        format!(
            "## API latency under load\n\n\
             `POST /vm/tasks` (`launch_vm` on a new VM each, targetServer `{UNSERVED}` which no daemon serves) from \
             concurrent clients on a stack without a daemon, after one warm-up request per client; the consumer \
             worker buffers the queued tasks meanwhile. Client-side latency.\n\n{}{error}",
            table(&["clients", "requests", "errors", "p50", "p90", "p99", "max", "requests/s"], &rows)
        )
    }
}

// -------------------------------------------------------------------------------------------
// Cost

/// Billable operations, per task or per hour.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    kv_reads: f64,
    kv_writes: f64,
    kv_deletes: f64,
    kv_lists: f64,
    kv_write_class: f64,
    queue_messages: f64,
    queue_ops: f64,
    requests: f64,
}

impl Cost {
    fn of(ops: &OpCounts, requests: u64) -> Self {
        Cost {
            kv_reads: ops.kv_reads as f64,
            kv_writes: ops.kv_writes as f64,
            kv_deletes: ops.kv_deletes as f64,
            kv_lists: ops.kv_lists as f64,
            kv_write_class: ops.kv_write_class() as f64,
            queue_messages: ops.queue_sends as f64,
            queue_ops: (ops.queue_sends * QUEUE_OPS_PER_MESSAGE + ops.queue_retries) as f64,
            requests: requests as f64,
        }
    }

    fn scaled(self, k: f64) -> Self {
        Cost {
            kv_reads: self.kv_reads * k,
            kv_writes: self.kv_writes * k,
            kv_deletes: self.kv_deletes * k,
            kv_lists: self.kv_lists * k,
            kv_write_class: self.kv_write_class * k,
            queue_messages: self.queue_messages * k,
            queue_ops: self.queue_ops * k,
            requests: self.requests * k,
        }
    }

    /// USD for these operations.
    fn dollars(&self) -> f64 {
        (self.kv_reads * KV_READ_USD_PER_MILLION
            + self.kv_write_class * KV_WRITE_CLASS_USD_PER_MILLION
            + self.queue_ops * QUEUE_OP_USD_PER_MILLION
            + self.requests * REQUEST_USD_PER_MILLION)
            / 1e6
    }

    fn row(&self, name: String, dollars: String) -> Vec<String> {
        vec![
            name,
            format!("{:.2}", self.kv_reads),
            format!("{:.2}", self.kv_writes),
            format!("{:.2}", self.kv_deletes),
            format!("{:.2}", self.kv_lists),
            format!("**{:.2}**", self.kv_write_class),
            format!("{:.2}", self.queue_messages),
            format!("{:.2}", self.queue_ops),
            format!("{:.2}", self.requests),
            dollars,
        ]
    }
}

fn render_cost(lone: Option<&LoneResult>, throughput: &[ThroughputResult], idle: Option<&IdleResult>) -> String {
    let mut rows = Vec::new();
    let mut detail = String::new();
    let mut per_task = |name: String, ops: &Ops, requests: &Requests, n: usize| {
        let cost = Cost::of(&ops.total(), requests.system()).scaled(1.0 / n.max(1) as f64);
        rows.push(cost.row(name.clone(), format!("${:.2} per million tasks", cost.dollars() * 1e6)));
        let (a, c) = (&ops.api, &ops.consumer);
        let _ = writeln!(
            detail,
            "- {name}: API worker {}r/{}w/{}d/{}l, {} queue sends; consumer worker {}r/{}w/{}d/{}l, {} acks, {} \
             retries; requests: {}",
            a.kv_reads,
            a.kv_writes,
            a.kv_deletes,
            a.kv_lists,
            a.queue_sends,
            c.kv_reads,
            c.kv_writes,
            c.kv_deletes,
            c.kv_lists,
            c.queue_acks,
            c.queue_retries,
            requests
                .by_kind
                .iter()
                .filter(|(k, _)| **k != "other")
                .map(|(k, v)| format!("{} {k}", v.len()))
                .collect::<Vec<_>>()
                .join(", "),
        );
    };
    if let Some(l) = lone {
        per_task(format!("lone task (per task, {} tasks)", l.n), &l.ops, &l.requests, l.n);
    }
    for t in throughput {
        per_task(
            format!("throughput, MAX_CONCURRENCY {} (per task, {} tasks)", t.concurrency, t.submitted),
            &t.ops,
            &t.requests,
            t.submitted,
        );
    }
    if let Some(i) = idle {
        let hour = i.per_hour();
        rows.push(hour.row("idle daemon, per hour".into(), format!("${:.4} per hour", hour.dollars())));
        let day = hour.scaled(24.0);
        rows.push(day.row("idle daemon, per day".into(), format!("${:.3} per day", day.dollars())));
        let month = hour.scaled(HOURS_PER_MONTH);
        rows.push(month.row(
            "idle daemon, per month (30 days)".into(),
            format!("**${:.2} per idle host per month**", month.dollars()),
        ));
    }
    format!(
        "## Cost\n\n\
         Billable operations of both workers from `/stats` deltas; write-class = writes + deletes + lists (all \
         billed at the write price); queue operations = {QUEUE_OPS_PER_MESSAGE} per message + 1 per retry; \
         requests = worker requests from the wrangler log (client POSTs, queue batches, the daemon's polls, \
         predecessor checks, claims, heartbeats, reports). ARCHITECTURE.md's model: 8 write-class operations for \
         a task that arrives alone, approaching 6 under load.\n\n{}\n{detail}",
        table(
            &[
                "",
                "KV reads",
                "writes",
                "deletes",
                "lists",
                "write-class",
                "queue msgs",
                "queue ops",
                "requests",
                "USD"
            ],
            &rows
        )
    )
}

// -------------------------------------------------------------------------------------------
// Footprint

fn render_footprint(root: &Path, memory: Option<Memory>, targets: &mut Vec<(String, bool)>) -> String {
    let mut rows = Vec::new();
    for worker in ["api-worker", "consumer-worker"] {
        let path = root.join(worker).join("build/index_bg.wasm");
        match wasm_sizes(&path) {
            Ok((raw, gz)) => {
                let ok = gz < TARGET_WASM_GZIP_BYTES;
                targets.push((format!("{worker} wasm gzip -9 {} (repo target < 1 MB)", kib(gz)), ok));
                rows.push(vec![
                    format!("{worker}/build/index_bg.wasm"),
                    kib(raw),
                    format!("{} ({gz} bytes)", kib(gz)),
                    format!("< 1 MB: {}", mark(ok)),
                ]);
            }
            Err(e) => {
                rows.push(vec![format!("{worker}/build/index_bg.wasm"), format!("{e:#}"), String::new(), String::new()])
            }
        }
    }
    let daemon_bin = crate::options::StackOptions::default().resolved_bin_dir(root).join("local-consumer");
    if let Ok(meta) = std::fs::metadata(&daemon_bin) {
        rows.push(vec!["daemon binary (release)".into(), kib(meta.len()), String::new(), String::new()]);
    }
    let memory_text = match memory {
        Some(m) => table(
            &["daemon memory (MAX_CONCURRENCY 32 stack)", "kB", "MiB"],
            &[
                vec![
                    "VmRSS idle, before the throughput run".into(),
                    m.idle_before_kb.to_string(),
                    mib(m.idle_before_kb),
                ],
                vec!["VmRSS idle, after the throughput run".into(), m.rss_after_kb.to_string(), mib(m.rss_after_kb)],
                vec!["VmHWM (peak RSS) after the throughput run".into(), m.hwm_kb.to_string(), mib(m.hwm_kb)],
            ],
        ),
        None => {
            "Daemon memory: run the `throughput` section with MAX_CONCURRENCY 32 (the default) to measure it.\n".into()
        }
    };
    format!("## Footprint\n\n{}\n{memory_text}", table(&["artifact", "raw", "gzip -9", "target"], &rows))
}

fn wasm_sizes(path: &Path) -> Result<(u64, u64)> {
    let raw = std::fs::metadata(path).with_context(|| format!("{} is missing", path.display()))?.len();
    let out = std::process::Command::new("gzip").args(["-9", "-c"]).arg(path).output().context("could not run gzip")?;
    ensure!(out.status.success(), "gzip -9 failed on {}", path.display());
    Ok((raw, out.stdout.len() as u64))
}

fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

fn mib(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// Where this binary was started from, for the report: the outermost `cargo`/`xtask` command
/// among its ancestors, else its own command line. `cargo run` (and so the `cargo xtask`
/// alias) replaces its process with the program it runs, so `cargo xtask bench ARGS` shows up
/// as an `xtask bench ARGS` process and is printed as the command it was typed as.
pub fn invocation() -> String {
    let own: Vec<String> = std::env::args().collect();
    let mut best = match own.first().map(Path::new).and_then(Path::file_name) {
        Some(name) => std::iter::once(name.to_string_lossy().into_owned())
            .chain(own[1..].iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
        None => own.join(" "),
    };
    let mut pid = std::process::id();
    for _ in 0..4 {
        let Some(parent) = parent_pid(pid) else { break };
        let Ok(raw) = std::fs::read(format!("/proc/{parent}/cmdline")) else { break };
        let args: Vec<String> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let program =
            args.first().map(PathBuf::from).and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        match program.as_deref() {
            Some(name @ ("cargo" | "xtask")) => {
                let mut shown = args.clone();
                shown[0] = if name == "xtask" { "cargo xtask".to_owned() } else { name.to_owned() };
                best = shown.join(" ");
            }
            _ => break,
        }
        pid = parent;
    }
    best
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrangler_log_lines_are_classified() {
        let id = "01a219f0-91a7-7e25-82d0-b29649b0b650";
        let cases = [
            ("[wrangler:info] POST /vm/tasks 202 Accepted (36ms)", Some(("submit", 36, 0))),
            ("[wrangler:info] QUEUE vm-task-queue 3/3 (23ms)", Some(("queue batch", 23, 3))),
            ("[wrangler:info] GET /consumer/tasks/ready 200 OK (1.5s)", Some(("poll", 1500, 0))),
            (&format!("[wrangler:info] POST /consumer/tasks/{id}/claim 200 OK (51ms)"), Some(("claim", 51, 0))),
            (&format!("[wrangler:info] PUT /vm/tasks/{id}/status 200 OK (43ms)"), Some(("report", 43, 0))),
            (&format!("[wrangler:info] GET /vm/tasks/{id}/status 200 OK (31ms)"), Some(("predecessor check", 31, 0))),
            (&format!("[wrangler:info] GET /vm/tasks/{id} 200 OK (9ms)"), Some(("other", 9, 0))),
            ("[wrangler:info] GET /consumer/stats 200 OK (4ms)", Some(("other", 4, 0))),
            ("[wrangler:info] Ready on http://127.0.0.1:37369", None),
            ("⎔ Starting local server...", None),
        ];
        for (line, want) in cases {
            assert_eq!(classify_log_line(line), want, "{line}");
        }
    }

    #[test]
    fn metric_sums_add_up_labels_and_skip_other_names() {
        let text = "# TYPE local_consumer_tasks_completed_total counter\n\
                    local_consumer_tasks_completed_total{operation=\"launch_vm\"} 3\n\
                    local_consumer_tasks_completed_total{operation=\"run_command\"} 40\n\
                    local_consumer_tasks_completed_totally 99\n\
                    local_consumer_polls_total{outcome=\"idle\"} 2\n";
        assert_eq!(metric_sum(text, "local_consumer_tasks_completed_total"), 43);
        assert_eq!(metric_sum(text, "local_consumer_polls_total"), 2);
        assert_eq!(metric_sum(text, "local_consumer_tasks_failed_total"), 0);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 90.0), percentile(&v, 99.0)), (50, 90, 99));
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn tasks_spread_over_vms() {
        assert_eq!((0..50).map(|v| vm_tasks(500, 50, v)).sum::<usize>(), 500);
        assert_eq!((vm_tasks(7, 3, 0), vm_tasks(7, 3, 1), vm_tasks(7, 3, 2)), (3, 2, 2));
    }

    #[test]
    fn toml_values_and_costs() {
        let text = "[vars]\n# comment\nBELL_CHECK_MS = \"1500\"\nmax_batch_timeout = 0 # deliver at once\n";
        assert_eq!(toml_value(text, "BELL_CHECK_MS").as_deref(), Some("1500"));
        assert_eq!(toml_value(text, "max_batch_timeout").as_deref(), Some("0"));
        let ops = OpCounts { kv_reads: 2_000_000, kv_writes: 1_000_000, queue_sends: 1_000_000, ..OpCounts::default() };
        let cost = Cost::of(&ops, 1_000_000);
        // $1.00 reads + $5.00 writes + $1.20 queue (3 ops a message) + $0.30 requests.
        assert!((cost.dollars() - 7.5).abs() < 1e-9, "{}", cost.dollars());
    }
}
