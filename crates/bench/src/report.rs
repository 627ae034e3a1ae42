//! The report: Markdown tables on stdout, the header describing machine, command and settings,
//! and the summary of targets met and missed.

use std::{collections::BTreeMap, fmt::Write as _, io::Write as _, path::Path};

use vm_task_types::Timestamp;

use crate::{
    cost::{
        DO_GB_S_USD_PER_MILLION, DO_MEMORY_GB, DO_REQUEST_USD_PER_MILLION, DO_ROW_READ_USD_PER_MILLION,
        DO_ROW_WRITTEN_USD_PER_MILLION, DO_WS_MESSAGES_PER_REQUEST, KV_READ_USD_PER_MILLION,
        KV_WRITE_CLASS_USD_PER_MILLION, QUEUE_OPS_PER_MESSAGE, QUEUE_OP_USD_PER_MILLION, REQUEST_USD_PER_MILLION,
    },
    BenchOptions, DAEMON,
};

#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) targets: Vec<(String, bool)>,
}

pub(crate) fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}");
    let _ = stdout.flush();
}

impl Report {
    pub(crate) fn summary(&self) -> String {
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

pub(crate) fn mark(ok: bool) -> &'static str {
    if ok {
        "✓ pass"
    } else {
        "✗ miss"
    }
}

pub(crate) fn header(root: &Path, opts: &BenchOptions) -> String {
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
        "the default ones".to_owned()
    } else {
        opts.sections.iter().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>().join(",")
    };
    format!(
        "# stack bench\n\n\
         - started: {started}, commit {commit}{dirty}\n\
         - machine: {cores} cores ({processors} processors in /proc/cpuinfo), {mem:.1} GiB memory, CPU: {model}; \
           load average at start {load}\n\
         - command: `{command}`\n\
         - dispatch modes: {modes} (the workers' DISPATCH_MODE; each mode on its own stacks)\n\
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
           delete) plus 1 per retry; Workers requests ${REQUEST_USD_PER_MILLION:.2}/M; Durable Objects requests \
           ${DO_REQUEST_USD_PER_MILLION:.2}/M (WebSocket messages received {DO_WS_MESSAGES_PER_REQUEST}:1), duration \
           ${DO_GB_S_USD_PER_MILLION:.2}/M GB-s at {DO_MEMORY_GB} GB per active object, SQLite rows read \
           ${DO_ROW_READ_USD_PER_MILLION:.3}/M, written ${DO_ROW_WRITTEN_USD_PER_MILLION:.2}/M; a month is 30 days\n",
        started = utc_now(),
        dirty = if dirty { " with uncommitted changes" } else { "" },
        mem = mem_kb as f64 / 1024.0 / 1024.0,
        load = load.join(" "),
        command = opts.command(),
        modes = opts.modes.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", "),
        wait_poll = shipped(&api_toml, "WAIT_POLL_MS"),
        batch = shipped(&consumer_toml, "max_batch_size"),
        batch_timeout = shipped(&consumer_toml, "max_batch_timeout"),
        poll = DAEMON.poll_wait_seconds,
        relist = DAEMON.relist_seconds,
        conc = DAEMON.max_concurrency,
    )
}

fn utc_now() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    Timestamp(ms).to_string()
}

pub(crate) fn meminfo_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.split_whitespace().next()?.parse().ok()).flatten()
    })
}

/// The first `key = "value"` (or `key = value`) in a TOML text, unquoted.
pub(crate) fn toml_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.split('#').next().unwrap_or("").trim().trim_matches('"').to_owned())
    })
}

fn command_output(dir: &Path, program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program).args(args).current_dir(dir).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(crate) fn ms(v: u64) -> String {
    format!("{v} ms")
}

pub(crate) fn describe_counts(counts: &BTreeMap<String, usize>) -> String {
    counts.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
}

/// A Markdown table with padded columns.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
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

pub(crate) fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

pub(crate) fn mib(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_values() {
        let text = "[vars]\n# comment\nBELL_CHECK_MS = \"1500\"\nmax_batch_timeout = 0 # deliver at once\n";
        assert_eq!(toml_value(text, "BELL_CHECK_MS").as_deref(), Some("1500"));
        assert_eq!(toml_value(text, "max_batch_timeout").as_deref(), Some("0"));
    }
}
