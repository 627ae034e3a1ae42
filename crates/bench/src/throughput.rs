//! Throughput: tasks over many VMs from concurrent submitters, on a fresh stack per daemon
//! `MAX_CONCURRENCY`; tasks per second from the first submission until all are terminal.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Result;
use futures::{stream, StreamExt};
use serde_json::json;
use stack::Stack;
use vm_task_types::TaskStatus;

use crate::{
    measure::{fetch_tasks, log_len, percentile, snapshot, DaemonProbe, Ops, Requests},
    report::{describe_counts, mark, meminfo_kb, ms, table},
    timeline::{phase_ends, statuses, Splits},
    BenchOptions, SERVER, THROUGHPUT_TIMEOUT,
};

/// Target printed beside the throughput figures.
const TARGET_TASKS_PER_SEC: f64 = 50.0;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    pub(crate) idle_before_kb: u64,
    pub(crate) rss_after_kb: u64,
    pub(crate) hwm_kb: u64,
}

#[derive(Debug)]
pub(crate) struct ThroughputResult {
    pub(crate) concurrency: usize,
    pub(crate) submitted: usize,
    post_errors: usize,
    /// First POST sent until the last POST answered.
    submit_phase: Duration,
    /// First POST sent until the daemon had reported every accepted task.
    wall: Option<Duration>,
    statuses: BTreeMap<String, usize>,
    pub(crate) completed: usize,
    splits: Splits,
    /// When the last task was buffered, claimed and completed, in ms after the first was created.
    ends: Option<[u64; 3]>,
    post_ms: Vec<u64>,
    pub(crate) ops: Ops,
    pub(crate) requests: Requests,
    pub(crate) memory: Option<Memory>,
}

/// Task `j` of VM `v`: `launch_vm` first, then `run_command`s.
fn vm_tasks(tasks: usize, vms: usize, v: usize) -> usize {
    tasks / vms + usize::from(v < tasks % vms)
}

/// Runs on `stack`, whose daemon runs with MAX_CONCURRENCY `concurrency`.
pub(crate) async fn throughput(
    opts: &BenchOptions,
    stack: &Stack,
    daemon: &DaemonProbe,
    concurrency: usize,
) -> Result<ThroughputResult> {
    let pid = stack.daemon_pid();
    if pid.is_none() {
        tracing::warn!("could not find the daemon's pid; no memory figures");
    }
    let api = stack.client();
    let log = stack.log_path("wrangler");
    // Let the daemon settle into waiting for work.
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
    // `submitters` VMs in flight at any time; each submitter sends its VM's tasks in order.
    let submit_vm = |v: usize| {
        let api = &api;
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
    };
    let per_vm: Vec<_> = stream::iter(0..vms).map(submit_vm).buffer_unordered(opts.submitters).collect().await;
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

impl ThroughputResult {
    /// Tasks per second from the first POST until every accepted task was reported.
    pub(crate) fn rate(&self) -> Option<f64> {
        self.wall.map(|w| self.submitted as f64 / w.as_secs_f64())
    }
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    meminfo_kb(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, key)
}

pub(crate) fn render_throughput(
    opts: &BenchOptions,
    results: &[ThroughputResult],
    targets: &mut Vec<(String, bool)>,
) -> String {
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
         at the daemon's default MAX_CONCURRENCY on the mode's stack after its other sections, any other on a \
         fresh stack. Rate: tasks from the first POST until the daemon had reported \
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_spread_over_vms() {
        assert_eq!((0..50).map(|v| vm_tasks(500, 50, v)).sum::<usize>(), 500);
        assert_eq!((vm_tasks(7, 3, 0), vm_tasks(7, 3, 1), vm_tasks(7, 3, 2)), (3, 2, 2));
    }
}
