//! The sweep (cron, every minute, and `POST /admin/sweep`): returns expired leases, fails
//! tasks nobody claims, drops entries of finished tasks, rings again for entries left
//! unclaimed, and buffers every non-terminal task found in no buffer (a lost queue message,
//! an entry removed while the task was processing), whatever its age.
//!
//! It works from listings, which carry each task's summary and each entry in KV metadata:
//! one list operation covers 1,000 tasks, and a task record is read only when the sweep is
//! about to change it. A run spends at most [`SWEEP_OP_BUDGET`] KV operations (the
//! invocation limit is 1,000) and walks the task listing from a cursor it keeps in
//! `TASK_BUFFER` (`sweep:state`), so consecutive runs cover every task, however many there
//! are and however many one server has piled up.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_task_types::{wire::BufferedTask, TaskStatus, TaskSummary, TimelineEvent, Timestamp};

use super::ConsumerService;
use crate::{
    intents::{settle_cancel, CancelSettlement},
    keys,
    store::{apply_cancel_settlement, paced},
    AppError, Clock, Ids, KvStore, QueueMessage,
};

/// KV operations one sweep run may spend, under the 1,000 of an invocation.
pub(crate) const SWEEP_OP_BUDGET: u64 = 900;
/// Buffer listing pages a run reads to know which tasks have an entry (200,000 entries).
/// Beyond that the run cannot prove an entry missing, and buffers no orphan.
const MAX_BUFFER_PAGES: u64 = 200;
/// Task listing pages (1,000 tasks each) a run walks: a history of 100,000 tasks is covered
/// every 10 minutes for 10 list operations a minute.
const MAX_WALK_PAGES: u64 = 10;
/// The most a task's handling costs: read, save, remove (paced retries aside).
const WORST_CASE_PER_TASK: u64 = 3;
/// The most a ring costs (one wait and a second try).
const RING_COST: u64 = 2;

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SweepReport {
    pub success: bool,
    /// Task summaries looked at.
    pub scanned: usize,
    pub returned_to_ready: usize,
    pub failed: usize,
    /// Buffer entries of finished tasks removed.
    pub cleaned: usize,
    /// Non-terminal tasks found in no buffer and buffered again.
    pub rebuffered: usize,
    /// Servers whose doorbell was rung again for entries left unclaimed.
    pub rung: usize,
    /// KV operations the run spent.
    #[serde(default)]
    pub ops: u64,
    /// Whether this run reached the end of the task listing (the next starts from the newest).
    #[serde(default)]
    pub cycle_complete: bool,
    /// Cancels requested across locations that became certain and were carried out
    /// (`KV_PROPAGATION_SECONDS` > 0; see [`crate::intents`]).
    #[serde(default)]
    pub cancels_settled: usize,
}

/// Where the next run continues: the listing cursor of the page it was in, and how many keys
/// of that page it had handled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SweepState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
    #[serde(default)]
    skip: usize,
}

/// What the sweep does with one task, decided from its summary and buffer entry alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Nothing to do (finished with no entry, waiting, or working under a live lease).
    Nothing,
    /// Finished, but its entry is still buffered: remove the entry (no record read).
    Clean,
    /// Waiting past `REBUFFER_AFTER_SECONDS`: ring its server again (no record read).
    Ring,
    /// Never claimed within `MAX_QUEUED_SECONDS`: fail it.
    FailUnclaimed,
    /// Its lease ended without a report: return it to pending, or fail it after the last attempt.
    ExpireLease,
    /// Not finished and in no buffer: buffer it again.
    Rebuffer,
}

/// Limits and clock of a plan.
#[derive(Debug, Clone, Copy)]
struct Horizon {
    now: Timestamp,
    rebuffer_after_ms: u64,
    max_queued_ms: u64,
    propagation_secs: u64,
}

/// The plan for a task. `entry` is `None` when it has no entry, and `missing_known` says
/// whether the buffer listing was complete enough to prove that.
fn plan(summary: &TaskSummary, entry: Option<&BufferedTask>, missing_known: bool, at: Horizon) -> Plan {
    let age = at.now.millis_since(summary.created_at);
    match summary.status {
        status if status.is_terminal() => {
            if entry.is_some() {
                Plan::Clean
            } else {
                Plan::Nothing
            }
        }
        TaskStatus::Pending if age > at.max_queued_ms => Plan::FailUnclaimed,
        TaskStatus::Processing
            if summary
                .lease_expires_at
                .is_none_or(|until| lease_ended_everywhere(until, at.now, at.propagation_secs)) =>
        {
            Plan::ExpireLease
        }
        _ if age < at.rebuffer_after_ms => Plan::Nothing, // may still be in the queue
        _ => match entry {
            None if missing_known => Plan::Rebuffer,
            None => Plan::Nothing,
            Some(entry)
                if summary.status == TaskStatus::Pending
                    && at.now.millis_since(entry.buffered_at) > at.rebuffer_after_ms =>
            {
                Plan::Ring
            }
            Some(_) => Plan::Nothing,
        },
    }
}

/// Whether a lease that ended at `until` has ended as every location sees it: KV's
/// propagation window has passed since. A report or renewal made before the lease ended (at
/// any location) is visible to any read made now, so a record that still reads `processing`
/// under this lease is not a stale copy of a task that finished. Acting sooner let a sweep
/// reading a cached `processing` write `pending` over `completed`.
fn lease_ended_everywhere(until: Timestamp, now: Timestamp, propagation_secs: u64) -> bool {
    until.plus_secs(propagation_secs) <= now
}

/// Operations left to spend in this run.
#[derive(Debug)]
struct Budget(u64);

impl Budget {
    fn spend(&mut self, ops: u64) {
        self.0 = self.0.saturating_sub(ops);
    }
}

impl<S: KvStore, B: KvStore, C: Clock, I: Ids> ConsumerService<'_, S, B, C, I> {
    /// One sweep run. Runs from the cron trigger and from `POST /admin/sweep`.
    pub async fn sweep(&self) -> Result<SweepReport, AppError> {
        let mut report = SweepReport { success: true, ..SweepReport::default() };
        let mut budget = Budget(SWEEP_OP_BUDGET);
        let state: SweepState = self.buffer_json(keys::SWEEP_STATE).await?.unwrap_or_default();
        budget.spend(1);
        let (entries, listing_complete) = self.buffered_entries(&mut budget).await?;
        let horizon = Horizon {
            now: self.clock.now(),
            rebuffer_after_ms: self.config.rebuffer_after_secs * 1000,
            max_queued_ms: self.config.max_queued_secs * 1000,
            propagation_secs: self.config.kv_propagation_secs,
        };
        let mut ring: BTreeSet<String> = BTreeSet::new();
        let mut next = state.clone();
        let mut pages = 0;
        'pages: loop {
            if pages == MAX_WALK_PAGES {
                break;
            }
            pages += 1;
            // The listing page, the cursor's write at the end, and the rings must fit.
            if budget.0 < 2 + 1 + RING_COST * (ring.len() as u64 + 1) + WORST_CASE_PER_TASK {
                break;
            }
            let page = self.tasks.list(1000, next.cursor.as_deref()).await?;
            budget.spend(1);
            for key in page.keys.iter().skip(next.skip) {
                if budget.0 < 1 + RING_COST * (ring.len() as u64 + 1) + WORST_CASE_PER_TASK {
                    break 'pages;
                }
                next.skip += 1;
                let Some(summary) = key.metadata.clone().and_then(|m| serde_json::from_value::<TaskSummary>(m).ok())
                else {
                    continue;
                };
                report.scanned += 1;
                let entry = entries.get(&summary.id);
                let step = plan(&summary, entry, listing_complete, horizon);
                self.carry_out(step, &summary, &mut report, &mut ring, &mut budget).await?;
            }
            if page.list_complete {
                next = SweepState::default();
                report.cycle_complete = true;
                break;
            }
            next = SweepState { cursor: page.cursor, skip: 0 };
        }
        if self.config.kv_propagation_secs > 0 {
            self.settle_cancels(&mut report, &mut budget).await?;
        }
        for server in ring {
            if budget.0 < RING_COST + 1 {
                break;
            }
            self.ring(&server).await?;
            budget.spend(RING_COST);
            report.rung += 1;
        }
        if next != state {
            paced(&self.clock, || self.put_buffer_json(keys::SWEEP_STATE, &next)).await?;
            budget.spend(1);
        }
        report.ops = SWEEP_OP_BUDGET - budget.0;
        Ok(report)
    }

    /// Settles the cancels requested across locations that are certain by now (a pending task
    /// whose daemon is away has no claim to settle it), and drops the intents of tasks finished
    /// long enough that every location sees them finished (a claim there reads the record
    /// first: the intent is no longer what stops it). One list operation covers 1,000 intents;
    /// only those due cost a read.
    async fn settle_cancels(&self, report: &mut SweepReport, budget: &mut Budget) -> Result<(), AppError> {
        let now = self.clock.now();
        let propagation = self.config.kv_propagation_secs;
        let mut cursor = None;
        loop {
            if budget.0 < 1 + WORST_CASE_PER_TASK + RING_COST + 1 {
                return Ok(());
            }
            let (intents, page) = self.tasks.list_cancel_intents(cursor.as_deref()).await?;
            budget.spend(1);
            for (id, at) in intents {
                // Listed without its time (written before it carried one): read it.
                if at.is_some_and(|at| now < at.plus_secs(2 * propagation)) {
                    continue;
                }
                if budget.0 < WORST_CASE_PER_TASK + 1 + RING_COST + 1 {
                    return Ok(());
                }
                let Some(intent) = self.tasks.cancel_intent(id).await? else { continue };
                let Some(task) = self.tasks.load(id).await? else { continue };
                budget.spend(2);
                if task.status.is_terminal() {
                    if now >= task.updated_at.plus_secs(2 * propagation) {
                        paced(&self.clock, || self.tasks.drop_cancel_intent(id)).await?;
                        budget.spend(1);
                    }
                    continue;
                }
                let settlement = settle_cancel(&task, &intent, now, propagation);
                if matches!(settlement, CancelSettlement::Cancel | CancelSettlement::FailUnknown) {
                    apply_cancel_settlement(&self.tasks, &self.buffer, &self.clock, task, &intent, settlement).await?;
                    budget.spend(2);
                    report.cancels_settled += 1;
                }
            }
            match page.cursor {
                Some(next) if !page.list_complete => cursor = Some(next),
                _ => return Ok(()),
            }
        }
    }

    /// Every buffered entry by task id, as far as [`MAX_BUFFER_PAGES`] reach, and whether
    /// that was all of them.
    async fn buffered_entries(&self, budget: &mut Budget) -> Result<(BTreeMap<Uuid, BufferedTask>, bool), AppError> {
        let mut entries = BTreeMap::new();
        let mut cursor = None;
        for _ in 0..MAX_BUFFER_PAGES.min(budget.0 / 3) {
            let (page_entries, page) = self.buffer.list(keys::READY_PREFIX, 1000, cursor.as_deref()).await?;
            budget.spend(1);
            entries.extend(page_entries.into_iter().map(|e| (e.task_id, e)));
            if page.list_complete {
                return Ok((entries, true));
            }
            cursor = page.cursor;
        }
        Ok((entries, false))
    }

    async fn carry_out(
        &self,
        step: Plan,
        summary: &TaskSummary,
        report: &mut SweepReport,
        ring: &mut BTreeSet<String>,
        budget: &mut Budget,
    ) -> Result<(), AppError> {
        let now = self.clock.now();
        match step {
            Plan::Nothing => {}
            Plan::Clean => {
                self.unbuffer(&summary.target_server, summary.id).await?;
                budget.spend(1);
                report.cleaned += 1;
            }
            Plan::Ring => {
                ring.insert(summary.target_server.clone());
            }
            Plan::FailUnclaimed | Plan::ExpireLease | Plan::Rebuffer => {
                // The summary decided; the record (read now) is what gets changed.
                let Some(mut task) = self.tasks.load(summary.id).await? else { return Ok(()) };
                budget.spend(1);
                match (step, task.status) {
                    (Plan::FailUnclaimed, TaskStatus::Pending) => {
                        let reason = format!(
                            "no daemon serving {:?} claimed the task within {} s; is a local consumer running for that server?",
                            task.target_server, self.config.max_queued_secs
                        );
                        task.error = Some(reason.clone());
                        task.record(now, "sweeper", TimelineEvent::NeverClaimed, Some(TaskStatus::Failed), reason);
                        self.save(&task).await?;
                        self.unbuffer(&task.target_server, task.id).await?;
                        budget.spend(2);
                        report.failed += 1;
                    }
                    (Plan::ExpireLease, TaskStatus::Processing)
                        if task.claim.as_ref().is_none_or(|c| {
                            lease_ended_everywhere(c.lease_expires_at, now, self.config.kv_propagation_secs)
                        }) =>
                    {
                        self.expire_lease(&mut task, now);
                        if task.attempts >= self.config.max_attempts {
                            self.give_up(&mut task, now).await?;
                            budget.spend(2);
                            report.failed += 1;
                        } else {
                            self.save(&task).await?;
                            budget.spend(1);
                            // The entry may be gone too (removed while processing): put it back.
                            self.buffer_one(&QueueMessage::of(&task), now).await?;
                            budget.spend(1);
                            ring.insert(task.target_server.clone());
                            report.returned_to_ready += 1;
                        }
                    }
                    (Plan::Rebuffer, TaskStatus::Pending | TaskStatus::Processing) => {
                        // No record write: a claim or a report may be writing it right now. A
                        // processing task's entry lets a daemon find it again after its lease.
                        self.buffer_one(&QueueMessage::of(&task), now).await?;
                        budget.spend(1);
                        if task.status == TaskStatus::Pending {
                            ring.insert(task.target_server.clone());
                        }
                        report.rebuffered += 1;
                    }
                    _ => {} // The record moved on since its summary was written.
                }
            }
        }
        Ok(())
    }

    async fn buffer_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AppError> {
        match self.buffer.kv.get(key).await? {
            None => Ok(None),
            // An unreadable state restarts the walk rather than stopping every sweep.
            Some(text) => Ok(serde_json::from_str(&text).ok()),
        }
    }

    async fn put_buffer_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), AppError> {
        let text = serde_json::to_string(value).map_err(|e| AppError::Unavailable(e.to_string()))?;
        Ok(self.buffer.kv.put(key, &text, None).await?)
    }
}

#[cfg(test)]
mod tests {
    use vm_task_types::OperationKind;

    use super::*;

    const AT: Horizon = Horizon {
        now: Timestamp(1_000_000),
        rebuffer_after_ms: 60_000,
        max_queued_ms: 600_000,
        propagation_secs: crate::KV_PROPAGATION_SECS,
    };

    fn summary(status: TaskStatus, created_ms_ago: u64, lease_until: Option<u64>) -> TaskSummary {
        TaskSummary {
            id: Uuid::nil(),
            kind: OperationKind::StopVm,
            vm_name: "vm-1".into(),
            status,
            target_server: "production".into(),
            created_at: Timestamp(AT.now.0 - created_ms_ago),
            updated_at: Timestamp(AT.now.0 - created_ms_ago),
            lease_expires_at: lease_until.map(Timestamp),
        }
    }

    fn entry(buffered_ms_ago: u64) -> BufferedTask {
        BufferedTask {
            task_id: Uuid::nil(),
            kind: OperationKind::StopVm,
            vm_name: "vm-1".into(),
            target_server: "production".into(),
            previous_task_id: None,
            created_at: Timestamp(0),
            buffered_at: Timestamp(AT.now.0 - buffered_ms_ago),
        }
    }

    #[test]
    fn waiting_and_working_tasks_need_nothing_and_no_record_read() {
        assert_eq!(plan(&summary(TaskStatus::Pending, 1_000, None), Some(&entry(900)), true, AT), Plan::Nothing);
        let working = summary(TaskStatus::Processing, 100_000, Some(AT.now.0 + 1));
        assert_eq!(plan(&working, Some(&entry(90_000)), true, AT), Plan::Nothing);
        assert_eq!(plan(&summary(TaskStatus::Completed, 100_000, None), None, true, AT), Plan::Nothing);
    }

    #[test]
    fn stale_entries_ring_and_finished_ones_are_cleaned() {
        assert_eq!(plan(&summary(TaskStatus::Pending, 100_000, None), Some(&entry(61_000)), true, AT), Plan::Ring);
        assert_eq!(plan(&summary(TaskStatus::Cancelled, 100_000, None), Some(&entry(1)), true, AT), Plan::Clean);
    }

    #[test]
    fn deadlines_fail_or_return_the_task() {
        assert_eq!(plan(&summary(TaskStatus::Pending, 600_001, None), Some(&entry(1)), true, AT), Plan::FailUnclaimed);
        let expired = summary(TaskStatus::Processing, 100_000, Some(AT.now.0 - 60_000));
        assert_eq!(plan(&expired, Some(&entry(1)), true, AT), Plan::ExpireLease);
    }

    /// Production model, seed 194: the sweep read a cached `processing` whose lease had just
    /// ended and wrote `pending` over the `completed` another location had already written.
    /// A lease is acted on only once KV's propagation window has passed since it ended.
    #[test]
    fn a_lease_is_acted_on_only_once_its_end_has_propagated_everywhere() {
        let just_ended = summary(TaskStatus::Processing, 100_000, Some(AT.now.0));
        assert_eq!(plan(&just_ended, Some(&entry(1)), true, AT), Plan::Nothing);
        let ended_59_s_ago = summary(TaskStatus::Processing, 100_000, Some(AT.now.0 - 59_999));
        assert_eq!(plan(&ended_59_s_ago, Some(&entry(1)), true, AT), Plan::Nothing);
    }

    #[test]
    fn a_task_in_no_buffer_is_buffered_again_only_when_the_listing_proves_it_missing() {
        assert_eq!(plan(&summary(TaskStatus::Pending, 61_000, None), None, true, AT), Plan::Rebuffer);
        let working = summary(TaskStatus::Processing, 500_000, Some(AT.now.0 + 1));
        assert_eq!(plan(&working, None, true, AT), Plan::Rebuffer);
        assert_eq!(plan(&summary(TaskStatus::Pending, 61_000, None), None, false, AT), Plan::Nothing);
        assert_eq!(plan(&summary(TaskStatus::Pending, 59_000, None), None, true, AT), Plan::Nothing, "in the queue");
    }
}
