//! `bench` (`cargo xtask bench`): benchmarks of the whole local stack (both workers under
//! `wrangler dev`, the Arrakis simulator without injected latency, the daemon), printed as
//! Markdown tables.
//!
//! Sections, each selectable with `--only`, each in the module of its name:
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
//! `cost` prices them: cost per task comes from the deltas of both workers' `GET /stats` over
//! the lone and throughput runs, and worker requests from `wrangler dev`'s request log. The
//! benchmark learns that tasks finished from the daemon's `/metrics` (which costs the workers
//! nothing) and reads the task timelines only after the closing `/stats` snapshot, so the
//! deltas hold the system's own operations only. The measuring tools are in `measure` and
//! `timeline`, the tables and the header in `report`.

mod api;
mod cost;
mod footprint;
mod idle;
mod lone;
mod measure;
mod pickup;
mod report;
mod throughput;
mod timeline;

use std::{
    process::ExitCode,
    sync::LazyLock,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use clap::{builder::RangedU64ValueParser, Parser};
use stack::{repo_root, Stack, StackOptions};

use crate::{
    api::api_latency,
    cost::render_cost,
    footprint::render_footprint,
    idle::idle,
    lone::lone,
    measure::DaemonProbe,
    pickup::pickup,
    report::{emit, header, Report},
    throughput::{render_throughput, throughput},
};

/// The server the daemon serves (the stack's default `SERVER_NAMES`).
const SERVER: &str = "production";
/// A server no daemon serves, for the API latency run.
const UNSERVED: &str = "bench-unserved";

/// How long any single task may take before the run is declared stuck.
const TASK_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound on waiting for a whole throughput run to drain.
const THROUGHPUT_TIMEOUT: Duration = Duration::from_secs(900);

/// The daemon's settings as the stacks' daemons see them: its own defaults (`local-consumer
/// --help`), or what this process's environment, which they inherit, sets.
static DAEMON: LazyLock<local_consumer::config::Cli> =
    LazyLock::new(|| local_consumer::config::Cli::parse_from(["local-consumer"]));

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Section {
    Lone,
    Throughput,
    Api,
    /// Idle cost per daemon (alias `cost`).
    #[value(alias = "cost")]
    Idle,
    Footprint,
    Pickup,
}

/// Benchmark the local stack (Arrakis simulator, no injected latency) and print a report:
/// lone-task latency, throughput per daemon MAX_CONCURRENCY, API latency under load, cost per
/// task and per idle daemon, footprint, idle pickup. Not part of `cargo xtask test`. Takes
/// several minutes with the defaults; e.g. `--only lone,footprint --lone 10` is quick.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench")]
struct BenchOptions {
    /// Sections to run, comma-separated (default: all).
    #[arg(long = "only", value_enum, value_delimiter = ',')]
    sections: Vec<Section>,
    /// Lone tasks, submitted one at a time.
    #[arg(long, default_value_t = 50, value_parser = at_least_one::<usize>)]
    lone: usize,
    /// Pause a random 0..N ms before each lone task (default 0: submit as soon as the previous
    /// one is reported), to decouple submissions from the phase of the doorbell checks.
    #[arg(long, default_value_t = 0)]
    lone_gap_ms: u64,
    /// Tasks in each throughput run (at least --vms).
    #[arg(long, default_value_t = 500, value_parser = at_least_one::<usize>)]
    tasks: usize,
    /// VMs the throughput tasks are spread over (each: one launch_vm, then run_command).
    #[arg(long, default_value_t = 50, value_parser = at_least_one::<usize>)]
    vms: usize,
    /// Concurrent submitters in the throughput runs.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>)]
    submitters: usize,
    /// The daemon's MAX_CONCURRENCY for each throughput run (a fresh stack each), 1 to 1024.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32],
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=1024))]
    concurrency: Vec<usize>,
    /// POST /vm/tasks requests in the API latency run.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one::<usize>)]
    api_requests: usize,
    /// Concurrent clients in the API latency run.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>)]
    api_clients: usize,
    /// Minimum length of the idle-cost window, in seconds (it ends at a long poll's end).
    #[arg(long, default_value_t = 60, value_parser = at_least_one::<u64>)]
    idle_secs: u64,
    /// How long the daemon is idle before the pickup task, in seconds.
    #[arg(long, default_value_t = 40)]
    pickup_idle_secs: u64,
    /// Worker var override for the latency, throughput and API stacks, `NAME=VALUE`
    /// (repeatable), e.g. `--var BELL_CHECK_MS=100`. The idle measurement always runs on the
    /// shipped vars.
    #[arg(long = "var", value_parser = parse_var)]
    worker_vars: Vec<(String, String)>,
    /// The command line printed in the report (`cargo xtask bench` passes the one it was
    /// given); default: this program's own.
    #[arg(long, hide = true)]
    command: Option<String>,
}

/// A count or length that must be at least 1.
fn at_least_one<T: std::str::FromStr<Err = std::num::ParseIntError> + PartialOrd + From<u8>>(
    s: &str,
) -> Result<T, String> {
    let n: T = s.parse().map_err(|e| format!("{e}"))?;
    if n < T::from(1) {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    Ok((name.trim().to_owned(), value.to_owned()))
}

impl BenchOptions {
    fn wants(&self, section: Section) -> bool {
        self.sections.is_empty() || self.sections.contains(&section)
    }

    /// The command line, as printed in the report.
    fn command(&self) -> String {
        self.command.clone().unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(BenchOptions::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the selected sections, printing each table to stdout as it is measured and a summary
/// of the targets at the end. Progress goes to the log (stderr).
async fn run(opts: BenchOptions) -> Result<()> {
    ensure!(opts.tasks >= opts.vms, "--tasks must be at least --vms");
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
