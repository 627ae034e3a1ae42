//! A lone task after idle, as a client meets it: the stack sits idle for `--idle-gap-secs`,
//! then one `run_command` is submitted and followed with `GET /vm/tasks/{id}?wait=`; the
//! figure is from sending the POST until the `?wait` answer says completed. The timeline of
//! each task splits it into steps (queue delivery, push or poll, claim, run and report), and
//! the rest (`?wait` answered after the task completed) is the wait's own delay.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::json;
use stack::{client::Auth, Stack};
use vm_task_types::{wire::TaskDetailResponse, TaskStatus};

use crate::{
    measure::{log_len, percentile, snapshot, DaemonProbe, Ops, Requests},
    report::{ms, table},
    timeline::phases,
    SERVER, TASK_TIMEOUT,
};

#[derive(Debug, Default)]
pub(crate) struct AfterIdleResult {
    pub(crate) n: usize,
    pub(crate) gap: Duration,
    /// POST sent until the `?wait` answer said completed.
    pub(crate) client_ms: Vec<u64>,
    /// POST round trip.
    pub(crate) post_ms: Vec<u64>,
    /// Timeline splits: created→buffered, buffered→claimed, claimed→completed.
    pub(crate) created_buffered: Vec<u64>,
    pub(crate) buffered_claimed: Vec<u64>,
    pub(crate) claimed_completed: Vec<u64>,
    pub(crate) created_completed: Vec<u64>,
    /// `?wait` answered this long after the task's completed stamp (client clock and worker
    /// clock are the same machine's).
    pub(crate) wait_lag: Vec<u64>,
    /// `?wait` requests per task (one unless a wait ran out).
    pub(crate) waits: usize,
    pub(crate) completed: usize,
    pub(crate) ops: Ops,
    pub(crate) requests: Requests,
}

pub(crate) async fn after_idle(
    stack: &Stack,
    daemon: &DaemonProbe,
    n: usize,
    gap: Duration,
) -> Result<AfterIdleResult> {
    let api = stack.client();
    let vm = &format!("bench-after-{}s-vm", gap.as_secs());
    tracing::info!("after idle: launching {vm}, then {n} tasks each after {gap:?} idle, followed with ?wait");
    let reported = daemon.finished().await?;
    let launch = api.submit_op("launch_vm", json!({"vmName": vm, "targetServer": SERVER})).await?;
    daemon.wait_finished(reported + 1, Duration::from_millis(20), TASK_TIMEOUT).await?;
    let launched = api.task(launch.task_id).await?;
    ensure!(launched.status == TaskStatus::Completed, "launching {vm} ended {}: {:?}", launched.status, launched.error);

    let log = stack.log_path("wrangler");
    let before = snapshot(&api).await?;
    let log_from = log_len(&log);
    let mut result = AfterIdleResult { n, gap, ..AfterIdleResult::default() };
    for i in 0..n {
        tokio::time::sleep(gap).await;
        let sent = Instant::now();
        let created = api.submit_op("run_command", json!({"vmName": vm, "command": "echo x"})).await?;
        result.post_ms.push(sent.elapsed().as_millis() as u64);
        let path = format!("/vm/tasks/{}?wait=30", created.task_id);
        let task = loop {
            result.waits += 1;
            let detail: TaskDetailResponse =
                api.call(Method::GET, &path, Auth::Client, None, Some(Duration::from_secs(30))).await?;
            if detail.task.status.is_terminal() || sent.elapsed() > TASK_TIMEOUT {
                break detail.task;
            }
        };
        let answered_wall = wall_ms();
        result.client_ms.push(sent.elapsed().as_millis() as u64);
        if task.status == TaskStatus::Completed {
            result.completed += 1;
        }
        if let Some(p) = phases(&task) {
            result.created_buffered.push(p.buffered.saturating_sub(p.created));
            result.buffered_claimed.push(p.claimed.saturating_sub(p.buffered));
            result.claimed_completed.push(p.done.saturating_sub(p.claimed));
            result.created_completed.push(p.done.saturating_sub(p.created));
            result.wait_lag.push(answered_wall.saturating_sub(p.done));
        }
        if (i + 1) % 5 == 0 {
            tracing::info!(
                "after idle: {} of {n} done (last {} ms)",
                i + 1,
                result.client_ms.last().copied().unwrap_or(0)
            );
        }
    }
    let after = snapshot(&api).await?;
    result.ops = Ops::between(&before, &after);
    result.requests = Requests::read(&log, log_from, log_len(&log));
    Ok(result)
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl AfterIdleResult {
    pub(crate) fn render(&self, mode: &str) -> String {
        let row = |name: &str, v: &[u64]| {
            vec![
                name.to_owned(),
                v.len().to_string(),
                ms(percentile(v, 50.0)),
                ms(percentile(v, 90.0)),
                ms(percentile(v, 100.0)),
            ]
        };
        let rows = vec![
            row("client: POST sent → `?wait` answered completed", &self.client_ms),
            row("  client: POST round trip", &self.post_ms),
            row("  timeline: created→buffered (queue delivery to the consumer)", &self.created_buffered),
            row("  timeline: buffered→claimed (push or poll, claim)", &self.buffered_claimed),
            row("  timeline: claimed→completed (run, report)", &self.claimed_completed),
            row("  timeline: created→completed", &self.created_completed),
            row("  `?wait` answered after the completed stamp", &self.wait_lag),
        ];
        let (title, when) = if self.gap.is_zero() {
            ("Back-to-back tasks, followed with `?wait`".to_owned(), "as soon as the previous one completed".to_owned())
        } else {
            let gap = self.gap.as_secs();
            (format!("Lone task after {gap} s idle"), format!("after {gap} s without work"))
        };
        format!(
            "## {title} ({mode} mode)\n\n\
             {n} `run_command` `echo x` tasks on one launched VM, each submitted {when} and followed with \
             `GET /vm/tasks/{{id}}?wait=30` ({waits} `?wait` requests; {done} of {n} completed).\n\n\
             {table}",
            n = self.n,
            waits = self.waits,
            done = self.completed,
            table = table(&["", "n", "p50", "p90", "max"], &rows),
        )
    }
}
