//! Lone-task latency: tasks submitted one at a time on one VM, each waited for before the next;
//! latency from the task timelines.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use serde_json::json;
use stack::Stack;
use uuid::Uuid;
use vm_task_types::TaskStatus;

use crate::{
    measure::{fetch_tasks, log_len, percentile, snapshot, DaemonProbe, Ops, Requests},
    report::{describe_counts, mark, ms, table},
    timeline::{statuses, Splits},
    DAEMON, SERVER, TASK_TIMEOUT,
};

/// Target printed beside the lone-task figures.
const TARGET_POST_TO_CLAIMED_P50_MS: u64 = 1000;

#[derive(Debug)]
pub(crate) struct LoneResult {
    pub(crate) n: usize,
    gap_ms: u64,
    splits: Splits,
    /// POST sent until the daemon's metrics showed the task reported (polled every 20 ms).
    client_ms: Vec<u64>,
    /// POST round trips.
    post_ms: Vec<u64>,
    statuses: BTreeMap<String, usize>,
    pub(crate) ops: Ops,
    pub(crate) requests: Requests,
    pub(crate) last_done: Instant,
}

pub(crate) async fn lone(stack: &Stack, daemon: &DaemonProbe, n: usize, gap_ms: u64) -> Result<LoneResult> {
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
    pub(crate) fn render(&self, targets: &mut Vec<(String, bool)>) -> String {
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
            conc = DAEMON.max_concurrency,
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
