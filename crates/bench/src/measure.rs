//! Measuring tools: the daemon's `/metrics`, the workers' `/stats`, `wrangler dev`'s request
//! log, reading tasks back, and percentiles.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use futures::{stream, StreamExt};
use stack::{client::http_client, ApiClient, Stack};
use uuid::Uuid;
use vm_task_types::{wire::OpCounts, Task};

/// Reads the daemon's `/metrics`, which costs the workers nothing.
pub(crate) struct DaemonProbe {
    http: reqwest::Client,
    url: String,
}

impl DaemonProbe {
    pub(crate) fn new(stack: &Stack) -> Self {
        Self { http: http_client(Duration::from_secs(5)), url: format!("{}/metrics", stack.metrics_url()) }
    }

    async fn metrics(&self) -> Result<String> {
        let response = self.http.get(&self.url).send().await.with_context(|| format!("GET {}", self.url))?;
        ensure!(response.status().is_success(), "GET {} answered {}", self.url, response.status());
        Ok(response.text().await?)
    }

    /// Tasks the daemon has reported, completed or failed.
    pub(crate) async fn finished(&self) -> Result<u64> {
        let text = self.metrics().await?;
        Ok(metric_sum(&text, "local_consumer_tasks_completed_total")
            + metric_sum(&text, "local_consumer_tasks_failed_total"))
    }

    /// Long polls the daemon has completed, whatever their outcome.
    pub(crate) async fn polls(&self) -> Result<u64> {
        Ok(metric_sum(&self.metrics().await?, "local_consumer_polls_total"))
    }

    /// Waits until the daemon has reported `target` tasks in all; returns when it saw that.
    pub(crate) async fn wait_finished(&self, target: u64, every: Duration, timeout: Duration) -> Result<Instant> {
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
    pub(crate) async fn wait_next_poll(&self, timeout: Duration) -> Result<Instant> {
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
pub(crate) struct Snapshot {
    api: OpCounts,
    consumer: OpCounts,
    /// Lists the consumer's `/stats` made to answer (one per 1000 buffered tasks, at least one).
    stats_lists: u64,
}

pub(crate) async fn snapshot(api: &ApiClient) -> Result<Snapshot> {
    let a = api.api_stats().await.context("GET /stats")?;
    let c = api.consumer_stats().await.context("GET /consumer/stats")?;
    let buffered = c.buffered_total.unwrap_or(0) as u64;
    Ok(Snapshot { api: a.ops, consumer: c.ops, stats_lists: buffered.div_ceil(1000).max(1) })
}

/// Operations between two snapshots, without the closing `/stats` call's own listing.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ops {
    pub(crate) api: OpCounts,
    pub(crate) consumer: OpCounts,
}

impl Ops {
    pub(crate) fn between(before: &Snapshot, after: &Snapshot) -> Self {
        let mut consumer = sub(&after.consumer, &before.consumer);
        consumer.kv_lists = consumer.kv_lists.saturating_sub(after.stats_lists);
        Ops { api: sub(&after.api, &before.api), consumer }
    }

    pub(crate) fn total(&self) -> OpCounts {
        combine(&self.api, &self.consumer, |a, b| a + b)
    }
}

fn sub(a: &OpCounts, b: &OpCounts) -> OpCounts {
    combine(a, b, u64::saturating_sub)
}

/// Applies `f` to each pair of counts.
fn combine(a: &OpCounts, b: &OpCounts, f: impl Fn(u64, u64) -> u64) -> OpCounts {
    OpCounts {
        kv_reads: f(a.kv_reads, b.kv_reads),
        kv_writes: f(a.kv_writes, b.kv_writes),
        kv_deletes: f(a.kv_deletes, b.kv_deletes),
        kv_lists: f(a.kv_lists, b.kv_lists),
        queue_sends: f(a.queue_sends, b.queue_sends),
        queue_acks: f(a.queue_acks, b.queue_acks),
        queue_retries: f(a.queue_retries, b.queue_retries),
        do_requests: f(a.do_requests, b.do_requests),
        do_ws_messages: f(a.do_ws_messages, b.do_ws_messages),
        do_active_ms: f(a.do_active_ms, b.do_active_ms),
        do_rows_read: f(a.do_rows_read, b.do_rows_read),
        do_rows_written: f(a.do_rows_written, b.do_rows_written),
    }
}

/// Worker requests seen in `wrangler dev`'s log between two offsets, by kind, with the
/// duration wrangler printed for each (gateway included).
#[derive(Debug, Clone, Default)]
pub(crate) struct Requests {
    pub(crate) by_kind: BTreeMap<&'static str, Vec<u64>>,
    pub(crate) queue_messages: u64,
}

/// Kinds that are part of the system's work (billable); anything else is the benchmark's own.
const SYSTEM_KINDS: [&str; 8] =
    ["submit", "queue batch", "poll", "predecessor check", "claim", "heartbeat/release", "report", "dlq batch"];

impl Requests {
    pub(crate) fn read(log: &Path, from: u64, to: u64) -> Self {
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

    pub(crate) fn count(&self, kind: &str) -> u64 {
        self.by_kind.get(kind).map_or(0, |v| v.len() as u64)
    }

    /// Billable worker requests.
    pub(crate) fn system(&self) -> u64 {
        SYSTEM_KINDS.iter().map(|k| self.count(k)).sum()
    }
}

pub(crate) fn log_len(path: &Path) -> u64 {
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

/// Reads whole tasks (with timelines), 8 at a time; in the order of `ids`.
pub(crate) async fn fetch_tasks(api: &ApiClient, ids: &[Uuid]) -> Vec<Option<Task>> {
    stream::iter(ids)
        .map(|&id| async move { api.task(id).await.map_err(|e| tracing::warn!("could not read task {id}: {e}")).ok() })
        .buffered(8)
        .collect()
        .await
}

/// Nearest-rank percentile of unsorted values; 0 for none.
pub(crate) fn percentile(values: &[u64], p: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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
}
