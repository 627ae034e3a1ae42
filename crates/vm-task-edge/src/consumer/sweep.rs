//! The sweep (cron, every minute, and `POST /admin/sweep`): returns expired leases, fails
//! tasks nobody claims, drops entries of finished tasks, rings again for entries left
//! unclaimed, and buffers pending tasks whose queue message was lost.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use vm_task_types::{wire::BufferedTask, TaskStatus, TaskSummary, TimelineEvent};

use super::ConsumerService;
use crate::{keys, AppError, Clock, Ids, KvStore, QueueMessage};

/// Listing pages the sweep reads per run; beyond this it picks up next time.
const MAX_SCAN_PAGES: usize = 20;

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SweepReport {
    pub success: bool,
    pub scanned: usize,
    pub returned_to_ready: usize,
    pub failed: usize,
    pub cleaned: usize,
    /// Pending tasks found in no buffer (their queue message was lost) and buffered again.
    pub rebuffered: usize,
    /// Servers whose doorbell was rung again for entries left unclaimed.
    pub rung: usize,
}

impl<S: KvStore, B: KvStore, C: Clock, I: Ids> ConsumerService<'_, S, B, C, I> {
    /// Returns expired claims to ready (or fails them after the last attempt), drops buffer
    /// entries of finished tasks, and fails tasks no daemon picked up in `max_queued_secs`.
    /// Runs from the cron trigger and from `POST /admin/sweep`.
    pub async fn sweep(&self) -> Result<SweepReport, AppError> {
        let mut report = SweepReport { success: true, ..SweepReport::default() };
        let mut stale_servers = BTreeSet::new();
        let mut cursor = None;
        for _ in 0..MAX_SCAN_PAGES {
            let (entries, page) = self.buffer.list(keys::READY_PREFIX, 1000, cursor.as_deref()).await?;
            for entry in entries {
                report.scanned += 1;
                self.sweep_one(&entry, &mut report, &mut stale_servers).await?;
            }
            if page.list_complete {
                break;
            }
            cursor = page.cursor;
        }
        self.rebuffer_lost(&mut report).await?;
        // Unclaimed entries that have waited a while: ring again, in case the ring that went
        // with them was lost (a worker killed between the two writes) or has not reached the
        // daemon's location yet. One write per such server per sweep.
        for server in stale_servers {
            self.ring(&server).await?;
            report.rung += 1;
        }
        Ok(report)
    }

    /// Buffers pending tasks whose queue message never arrived. Cloudflare Queues deliver at
    /// least once, but a message can still be lost to an operator purging the queue or, on the
    /// local stack, to a `wrangler dev` restart. Reads the newest task summaries (metadata
    /// only) back to `reconcile_secs`, and for each pending task older than
    /// `rebuffer_after_secs` with no buffer entry, writes one.
    async fn rebuffer_lost(&self, report: &mut SweepReport) -> Result<(), AppError> {
        let now = self.clock.now();
        let mut cursor = None;
        for _ in 0..MAX_SCAN_PAGES {
            let page = self.tasks.list(1000, cursor.as_deref()).await?;
            for key in &page.keys {
                let Some(summary) = key.metadata.clone().and_then(|m| serde_json::from_value::<TaskSummary>(m).ok())
                else {
                    continue;
                };
                let age_ms = now.millis_since(summary.created_at);
                if age_ms > self.config.reconcile_secs * 1000 {
                    return Ok(()); // Newest first: everything after is older still.
                }
                if summary.status != TaskStatus::Pending || age_ms < self.config.rebuffer_after_secs * 1000 {
                    continue;
                }
                if self.buffer.get(&summary.target_server, summary.id).await?.is_some() {
                    continue;
                }
                let Some(task) = self.tasks.load(summary.id).await? else { continue };
                if task.status != TaskStatus::Pending || task.claim.is_some() {
                    continue;
                }
                let message = QueueMessage::of(&task);
                self.buffer_one(&message, now).await?;
                self.ring(&task.target_server).await?;
                report.rebuffered += 1;
            }
            if page.list_complete {
                break;
            }
            cursor = page.cursor;
        }
        Ok(())
    }

    async fn sweep_one(
        &self,
        entry: &BufferedTask,
        report: &mut SweepReport,
        stale_servers: &mut BTreeSet<String>,
    ) -> Result<(), AppError> {
        let now = self.clock.now();
        let queued_too_long = now.millis_since(entry.created_at) > self.config.max_queued_secs * 1000;
        let Some(mut task) = self.tasks.load(entry.task_id).await? else {
            if queued_too_long {
                self.unbuffer(&entry.target_server, entry.task_id).await?;
                report.cleaned += 1;
            }
            return Ok(());
        };
        match task.status {
            status if status.is_terminal() => {
                self.unbuffer(&entry.target_server, entry.task_id).await?;
                report.cleaned += 1;
            }
            TaskStatus::Processing if task.claim.as_ref().is_none_or(|c| c.lease_expires_at <= now) => {
                self.expire_lease(&mut task, now);
                if task.attempts >= self.config.max_attempts {
                    self.give_up(&mut task, now).await?;
                    report.failed += 1;
                } else {
                    self.save(&task).await?;
                    self.ring(&task.target_server).await?;
                    report.returned_to_ready += 1;
                }
            }
            TaskStatus::Pending if queued_too_long => {
                let reason = format!(
                    "no daemon serving {:?} claimed the task within {} s; is a local consumer running for that server?",
                    task.target_server, self.config.max_queued_secs
                );
                task.error = Some(reason.clone());
                task.record(now, "sweeper", TimelineEvent::NeverClaimed, Some(TaskStatus::Failed), reason);
                self.save(&task).await?;
                self.unbuffer(&task.target_server, task.id).await?;
                report.failed += 1;
            }
            TaskStatus::Pending if now.millis_since(entry.buffered_at) > self.config.rebuffer_after_secs * 1000 => {
                stale_servers.insert(task.target_server.clone());
            }
            _ => {}
        }
        Ok(())
    }
}
