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

mod after_idle;
mod api;
mod compare;
mod cost;
mod footprint;
mod idle;
mod lone;
mod measure;
mod pickup;
mod reconnect;
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
    after_idle::after_idle,
    api::api_latency,
    compare::{render_comparison, ModeRun},
    cost::render_cost,
    footprint::render_footprint,
    idle::idle,
    lone::lone,
    measure::DaemonProbe,
    pickup::pickup,
    reconnect::reconnect,
    report::{emit, header, Report},
    throughput::{render_throughput, throughput},
};

/// The server the daemon serves (the stack's default `SERVER_NAMES`).
const SERVER: &str = "production";
/// A server no daemon serves, for the API latency run.
const UNSERVED: &str = "bench-unserved";

/// The daemon's own MAX_CONCURRENCY default (`local-consumer --help`).
const DAEMON_DEFAULT_CONCURRENCY: usize = 8;

/// How long any single task may take before the run is declared stuck.
const TASK_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound on waiting for a whole throughput run to drain.
const THROUGHPUT_TIMEOUT: Duration = Duration::from_secs(900);

/// The daemon's settings as the stacks' daemons see them: its own defaults (`local-consumer
/// --help`), or what this process's environment, which they inherit, sets.
static DAEMON: LazyLock<local_consumer::config::Cli> =
    LazyLock::new(|| local_consumer::config::Cli::parse_from(["local-consumer"]));

/// A dispatch mode (the workers' `DISPATCH_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Mode {
    Kv,
    Durable,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Kv => "kv",
            Mode::Durable => "durable",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Section {
    /// Back-to-back lone tasks.
    Lone,
    /// Lone tasks after --idle-gap-secs idle, followed with `?wait`.
    AfterIdle,
    Throughput,
    /// Idle cost per daemon (alias `cost`).
    #[value(alias = "cost")]
    Idle,
    /// Worker restart under a running daemon.
    Reconnect,
    Footprint,
    /// Not in the default run: POST latency under load on a stack without a daemon.
    Api,
    /// Not in the default run: one task after --pickup-idle-secs idle.
    Pickup,
}

/// What runs when `--only` is not given.
const DEFAULT_SECTIONS: [Section; 6] =
    [Section::Lone, Section::AfterIdle, Section::Throughput, Section::Idle, Section::Reconnect, Section::Footprint];

/// Benchmark the local stack (Arrakis simulator, no injected latency) and print a report:
/// lone-task latency, throughput per daemon MAX_CONCURRENCY, API latency under load, cost per
/// task and per idle daemon, footprint, idle pickup. Not part of `cargo xtask test`. Takes
/// several minutes with the defaults; e.g. `--only lone,footprint --lone 10` is quick.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench")]
struct BenchOptions {
    /// Dispatch modes to run, comma-separated, each on its own stack; the summary puts them
    /// side by side.
    #[arg(long = "mode", value_enum, value_delimiter = ',', default_values_t = [Mode::Kv, Mode::Durable])]
    modes: Vec<Mode>,
    /// Sections to run, comma-separated (default: lone, after-idle, throughput, idle,
    /// reconnect, footprint).
    #[arg(long = "only", value_enum, value_delimiter = ',')]
    sections: Vec<Section>,
    /// Lone tasks, submitted one at a time.
    #[arg(long, default_value_t = 30, value_parser = at_least_one::<usize>)]
    lone: usize,
    /// Lone tasks after idle, each after --idle-gap-secs without work.
    #[arg(long, default_value_t = 20, value_parser = at_least_one::<usize>)]
    after_idle: usize,
    /// Idle time before each after-idle task, in seconds.
    #[arg(long, default_value_t = 6)]
    idle_gap_secs: u64,
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
    /// The daemon's MAX_CONCURRENCY for each throughput run, 1 to 1024 (the daemon's default
    /// runs on the mode's stack, any other on a fresh stack).
    #[arg(long, value_delimiter = ',', default_values_t = [DAEMON_DEFAULT_CONCURRENCY],
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=1024))]
    concurrency: Vec<usize>,
    /// POST /vm/tasks requests in the API latency run.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one::<usize>)]
    api_requests: usize,
    /// Concurrent clients in the API latency run.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>)]
    api_clients: usize,
    /// Minimum length of the idle-cost window, in seconds (in the KV mode it ends at a long
    /// poll's end).
    #[arg(long, default_value_t = 50, value_parser = at_least_one::<u64>)]
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
        if self.sections.is_empty() {
            DEFAULT_SECTIONS.contains(&section)
        } else {
            self.sections.contains(&section)
        }
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

/// Runs the selected sections in each mode, printing each table to stdout as it is measured,
/// then the modes side by side and a summary of the targets. Progress goes to the log
/// (stderr).
async fn run(opts: BenchOptions) -> Result<()> {
    ensure!(opts.tasks >= opts.vms, "--tasks must be at least --vms");
    let root = repo_root();
    let mut report = Report::default();
    emit(&header(&root, &opts));
    let mut runs = Vec::new();
    for &mode in &opts.modes {
        let started = Instant::now();
        let before = report.targets.len();
        let run = run_mode(&opts, mode, &mut report).await?;
        for (what, _) in &mut report.targets[before..] {
            *what = format!("{mode}: {what}");
        }
        tracing::info!("{mode} mode done in {:.0} s", started.elapsed().as_secs_f64());
        runs.push(run);
    }
    if opts.wants(Section::Footprint) {
        let rss = runs.iter().flat_map(|r| r.throughput.iter()).rev().find_map(|r| r.memory);
        emit(&render_footprint(&root, rss, &mut report.targets));
    }
    emit(&render_comparison(&opts, &runs, &mut report.targets));
    emit(&report.summary());
    Ok(())
}

/// One mode: one stack for the latency, idle, throughput (at the daemon's default
/// concurrency) and restart sections; fresh stacks for other concurrencies and the API run.
async fn run_mode(opts: &BenchOptions, mode: Mode, report: &mut Report) -> Result<ModeRun> {
    let mut run = ModeRun::new(mode);
    emit(&format!("# {mode} mode\n"));
    let shared_throughput = opts.wants(Section::Throughput) && opts.concurrency.contains(&DAEMON.max_concurrency);
    let needs_stack = [Section::Lone, Section::AfterIdle, Section::Idle, Section::Reconnect, Section::Pickup]
        .into_iter()
        .any(|s| opts.wants(s))
        || shared_throughput;
    if needs_stack {
        tracing::info!("{mode}: starting the stack");
        let mut stack = Stack::start(stack_options(opts, mode)).await?;
        let daemon = DaemonProbe::new(&stack);
        let mut last_task_done = Instant::now();
        if opts.wants(Section::Lone) {
            let result = lone(&stack, &daemon, opts.lone, opts.lone_gap_ms).await?;
            last_task_done = result.last_done;
            emit(&result.render(&mut report.targets));
            run.lone = Some(result);
        }
        if opts.wants(Section::AfterIdle) {
            let result = after_idle(&stack, &daemon, opts.after_idle, Duration::ZERO).await?;
            emit(&result.render(&mode.to_string()));
            run.back_to_back = Some(result);
            let result = after_idle(&stack, &daemon, opts.after_idle, Duration::from_secs(opts.idle_gap_secs)).await?;
            emit(&result.render(&mode.to_string()));
            last_task_done = Instant::now();
            run.after_idle = Some(result);
        }
        if opts.wants(Section::Idle) {
            if !opts.worker_vars.is_empty() {
                tracing::warn!("idle: measured with the --var overrides, not the shipped vars");
            }
            let result = idle(&stack, &daemon, opts.idle_secs, mode).await?;
            emit(&result.render());
            run.idle = Some(result);
        }
        if opts.wants(Section::Pickup) {
            let result = pickup(&stack, &daemon, last_task_done, opts.pickup_idle_secs).await?;
            emit(&result.render(&mut report.targets));
        }
        if shared_throughput {
            run.throughput.push(throughput(opts, &stack, &daemon, DAEMON.max_concurrency).await?);
        }
        if opts.wants(Section::Reconnect) {
            let result = reconnect(&mut stack, mode).await?;
            run.reconnect = Some(result);
        }
        shut_down(stack).await;
    }
    if opts.wants(Section::Throughput) {
        for &concurrency in opts.concurrency.iter().filter(|&&c| c != DAEMON.max_concurrency) {
            tracing::info!("{mode}: throughput on a fresh stack with MAX_CONCURRENCY {concurrency}");
            let stack = Stack::start(stack_options(opts, mode).daemon_env("MAX_CONCURRENCY", concurrency)).await?;
            let daemon = DaemonProbe::new(&stack);
            run.throughput.push(throughput(opts, &stack, &daemon, concurrency).await?);
            shut_down(stack).await;
        }
        run.throughput.sort_by_key(|r| r.concurrency);
        emit(&render_throughput(opts, &run.throughput, &mut report.targets));
    }
    if opts.wants(Section::Api) {
        let result = api_latency(opts, mode).await?;
        emit(&result.render());
    }
    if run.lone.is_some() || !run.throughput.is_empty() || run.idle.is_some() {
        emit(&render_cost(run.lone.as_ref(), &run.throughput, run.idle.as_ref()));
    }
    Ok(run)
}

/// The stack options of a mode's stacks: the mode and any `--var` overrides. The daemons
/// make no periodic full listings or host reports: one every few minutes falls in a short
/// idle window by chance or not, so the idle cost prices them at the shipped intervals.
fn stack_options(opts: &BenchOptions, mode: Mode) -> StackOptions {
    with_vars(StackOptions::default(), &opts.worker_vars)
        .worker_var("DISPATCH_MODE", mode)
        .daemon_env("RELIST_SECONDS", 86_400)
        .daemon_env("HOST_REPORT_SECONDS", 0)
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
