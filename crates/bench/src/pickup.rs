//! Idle pickup: one task submitted after the daemon has been idle longer than a long poll.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use stack::Stack;

use crate::{
    measure::DaemonProbe,
    report::{mark, ms, table},
    timeline::{phases, Phases},
    DAEMON, SERVER, TASK_TIMEOUT,
};

/// Target printed beside the pickup figure.
const TARGET_PICKUP_MS: u64 = 2000;

#[derive(Debug)]
pub(crate) struct PickupResult {
    idle_for: Duration,
    phases: Option<Phases>,
    status: String,
}

pub(crate) async fn pickup(
    stack: &Stack,
    daemon: &DaemonProbe,
    idle_since: Instant,
    idle_secs: u64,
) -> Result<PickupResult> {
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
    pub(crate) fn render(&self, targets: &mut Vec<(String, bool)>) -> String {
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
            poll = DAEMON.poll_wait_seconds,
        )
    }
}
