//! [`HostQueue`]: one server's live tasks and every transition on them, decided by one owner.
//!
//! ```text
//! enqueue ─▶ pending ──claim (fence n)──▶ processing ──report(n)──▶ completed | failed
//!              │  ▲                          │
//!              │  └── release(n) / lease alarm┘ (attempt counted; out of attempts → failed)
//!              ├──cancel──▶ cancelled   (while pending: atomic with claims)
//!   processing (long command) ──cancel──▶ cancel requested ──daemon's report──▶ cancelled
//!              └──alarm───▶ failed      (never claimed within max_queued_secs)
//! ```
//!
//! Invariants, each by construction (one owner, each operation one synchronous step):
//! - a task is cancelled or claimed, never both; a `Cancelled` answer means no claim exists
//!   and none will be granted;
//! - a VM's tasks are offered and granted one at a time, oldest first (task ids are UUIDv7);
//! - only the current claim (its claim id, and its fence when given) can renew, release or
//!   report; fences only grow, across restarts of the object;
//! - a retried claim with the same claim id gets the same claim back.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;
use vm_task_types::{
    wire::{BufferedTask, ClaimRequest, UpdateStatusRequest},
    Claim, Operation, Task, TaskStatus, TimelineEntry, TimelineEvent, Timestamp,
};

use crate::{
    protocol::{CancelRequest, ClaimGranted, EnqueueOutcome, FencedLease, FencedReport, Refusal},
    store::{HostStore, StoredEntry},
};

/// KV takes one write per second per key (this is the window plus a margin for clock
/// differences). A record is written when its status changes, carrying every change since:
/// - a terminal status at once, so a list read after `?wait` agrees with it (unless KV
///   refuses: then this long after the refusal);
/// - a live one (claimed, back to pending) once it has lasted this long and this long has
///   passed since the record's last write (the API's at submission, or ours) or refusal. A task
///   claimed and finished within a second is written once, as finished: its `processing`
///   write would be refused by production KV when the claim follows the POST within the
///   second (429), and billed otherwise, for a state a list would show for milliseconds;
/// - notes (buffered, lease renewed) never on their own: they ride the next status write.
///
/// `GET` of a live task asks its object, so readers of one task never see the lag.
pub const MIRROR_WINDOW_MS: u64 = 1_100;

/// What this instance knows about a task's KV record.
#[derive(Debug, Default, Clone, Copy)]
struct Mirror {
    /// Our (or the API's) last write that KV accepted.
    written_at: Option<Timestamp>,
    /// KV's last refusal since then.
    refused_at: Option<Timestamp>,
    /// The status KV holds, when known.
    status: Option<TaskStatus>,
}

const FENCE_COUNTER: &str = "fence";
/// The error of a long command cancelled while it ran, as in the KV mode.
const RUNNING_CANCEL_MESSAGE: &str = "cancelled by client while running";
/// Timeline actors, as in the KV mode: the consumer worker buffers, the sweeper ends leases.
const WORKER: &str = "consumer-worker";
const OBJECT: &str = "sweeper";

/// The consumer worker's settings that the queue applies.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub max_attempts: u32,
    pub lease_default_secs: u64,
    pub lease_min_secs: u64,
    pub lease_max_secs: u64,
    /// A pending task nobody claims within this fails.
    pub max_queued_secs: u64,
    /// How long a finished task stays, answering retried reports and redelivered messages.
    pub retain_secs: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            lease_default_secs: 180,
            lease_min_secs: 2,
            lease_max_secs: 3600,
            max_queued_secs: 7 * 86_400,
            retain_secs: 600,
        }
    }
}

/// What the caller must do after operations: write these records to KV (then call
/// [`HostQueue::mirrored`] or [`HostQueue::mirror_refused`]) and push these tasks to the
/// connected daemon.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    pub mirror: Vec<Task>,
    pub push: Vec<BufferedTask>,
}

/// One server's queue. Build it with [`HostQueue::load`] each time the object wakes.
#[derive(Debug)]
pub struct HostQueue<S> {
    store: S,
    config: QueueConfig,
    entries: BTreeMap<Uuid, StoredEntry>,
    next_fence: u64,
    /// Each task's KV record, as far as this instance knows (not stored: after a restart every
    /// record not known to be current is written again).
    mirrors: BTreeMap<Uuid, Mirror>,
    /// Tasks that became claimable since the last [`HostQueue::effects`].
    newly_ready: BTreeSet<Uuid>,
    /// Finished tasks whose final record KV accepted, not yet noted in storage: noted with the
    /// next write (or the alarm), so the KV write's answer costs no storage commit of its own.
    unnoted: BTreeSet<Uuid>,
    /// Bumped whenever the claimable set may have grown; long polls wait for it to change.
    version: u64,
}

impl<S: HostStore> HostQueue<S> {
    /// Reads every stored entry once; later operations write through.
    pub fn load(mut store: S, config: QueueConfig) -> Self {
        let entries = store.load_entries().into_iter().map(|e| (e.task.id, e)).collect();
        let next_fence = store.counter(FENCE_COUNTER) + 1;
        Self {
            store,
            config,
            entries,
            next_fence,
            mirrors: BTreeMap::new(),
            newly_ready: BTreeSet::new(),
            unnoted: BTreeSet::new(),
            version: 1,
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn into_store(self) -> S {
        self.store
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Changes whenever new work may be claimable.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The task as the queue holds it now (never stale, unlike its KV record).
    pub fn task(&self, id: Uuid) -> Option<&Task> {
        self.entries.get(&id).map(|e| &e.task)
    }

    /// How many unfinished tasks the queue holds.
    pub fn live_count(&self) -> usize {
        self.entries.values().filter(|e| !e.task.status.is_terminal()).count()
    }

    /// A task from the queue message, with its record as the API stored it.
    pub fn enqueue(&mut self, mut task: Task, now: Timestamp) -> EnqueueOutcome {
        if self.entries.contains_key(&task.id) {
            return EnqueueOutcome::Duplicate;
        }
        if task.status.is_terminal() {
            return EnqueueOutcome::Finished;
        }
        // The API wrote the record at submission: the buffered note waits out that window.
        self.mirrors
            .insert(task.id, Mirror { written_at: Some(task.updated_at), refused_at: None, status: Some(task.status) });
        let note = format!("buffered for server {}", task.target_server);
        task.record(now.max(task.created_at), WORKER, TimelineEvent::Buffered, None, note);
        let mirrored_gen = task.gen - 1;
        let entry = StoredEntry { task, fence: 0, mirrored_gen, finished_at: None, cancel_requested: None };
        self.newly_ready.insert(entry.task.id);
        self.version += 1;
        self.put(entry);
        EnqueueOutcome::Queued
    }

    /// A queue batch's tasks for this server, in order, in one step: each as [`Self::enqueue`].
    pub fn enqueue_all(&mut self, tasks: Vec<Task>, now: Timestamp) -> Vec<EnqueueOutcome> {
        tasks.into_iter().map(|task| self.enqueue(task, now)).collect()
    }

    /// What a daemon may claim now, oldest first: each VM's oldest live task, when pending.
    pub fn ready(&self) -> Vec<BufferedTask> {
        let mut seen_vms = BTreeSet::new();
        let mut ready = Vec::new();
        for entry in self.entries.values().filter(|e| !e.task.status.is_terminal()) {
            if seen_vms.insert(entry.task.vm_name().to_owned()) && entry.task.status == TaskStatus::Pending {
                ready.push(buffered(&entry.task));
            }
        }
        ready
    }

    pub fn claim(&mut self, id: Uuid, request: &ClaimRequest, now: Timestamp) -> Result<ClaimGranted, Refusal> {
        self.expire_if_due(id, now);
        let max_attempts = self.config.max_attempts;
        let lease = self.lease_secs(request.lease_seconds);
        let entry = self.entries.get(&id).ok_or_else(|| Refusal::not_found(id))?;
        let task = &entry.task;
        match task.status {
            status if status.is_terminal() => {
                return Err(Refusal::conflict(format!("task {id} is {status}; it will not run"), status))
            }
            TaskStatus::Processing => {
                let held = task.claim.clone().expect("a processing task has a claim");
                if request.claim_id == Some(held.claim_id) {
                    // The same claim again: its first answer was lost. Nothing changes.
                    return Ok(granted(task.clone(), &held, entry.fence));
                }
                return Err(Refusal::busy(
                    format!("task {id} is claimed until {}", held.lease_expires_at),
                    task.status,
                    Some(held.lease_expires_at),
                ));
            }
            _ => {}
        }
        if let Some(earlier) = self.live_predecessor(id) {
            return Err(Refusal::conflict(
                format!("task {id} waits for task {earlier} on the same VM to finish"),
                TaskStatus::Pending,
            ));
        }
        let mut entry = self.entries.get(&id).cloned().expect("checked above");
        if entry.task.attempts >= max_attempts {
            self.give_up(&mut entry, now);
            let reason = entry.task.error.clone().unwrap_or_default();
            self.finish(entry, now);
            return Err(Refusal::conflict(reason, TaskStatus::Failed));
        }
        let fence = self.next_fence;
        self.next_fence += 1;
        self.store.set_counter(FENCE_COUNTER, fence);
        let claim = Claim {
            claim_id: request.claim_id.unwrap_or_else(|| Uuid::from_u64_pair(fence, now.as_millis())),
            consumer_id: request.consumer_id.clone(),
            claimed_at: now,
            lease_expires_at: now.plus_secs(lease),
        };
        entry.task.attempts += 1;
        entry.task.claim = Some(claim.clone());
        entry.fence = fence;
        let note = format!(
            "attempt {} of {max_attempts}, fence {fence}, lease until {}",
            entry.task.attempts, claim.lease_expires_at
        );
        entry.task.record(now, &request.consumer_id, TimelineEvent::Claimed, Some(TaskStatus::Processing), note);
        let reply = granted(entry.task.clone(), &claim, fence);
        self.put(entry);
        Ok(reply)
    }

    /// The queue gave up delivering the task (its dead letter queue). A task held here is left
    /// as it is: another copy of its message reached the queue (Queues deliver at least once,
    /// sometimes twice). One not held yet is held as `failed`, so a copy of its message that
    /// arrives later finds it finished rather than running a task KV says failed. Returns the
    /// task as it stands. (Failing it in KV from the worker instead let a concurrent copy's
    /// hand-off run it and mirror `pending` over `failed`: the production model, durable mode.)
    pub fn dead_letter(&mut self, task: Task, now: Timestamp) -> Task {
        if let Some(entry) = self.entries.get(&task.id) {
            return entry.task.clone();
        }
        if task.status.is_terminal() {
            return task;
        }
        let known = Mirror { written_at: Some(task.updated_at), refused_at: None, status: Some(task.status) };
        self.mirrors.insert(task.id, known);
        let id = task.id;
        let mirrored_gen = task.gen;
        let mut entry = StoredEntry { task, fence: 0, mirrored_gen, finished_at: None, cancel_requested: None };
        let reason = "could not be handed to its host queue: the queue gave up after its retries (dead-lettered)";
        entry.task.error = Some(reason.into());
        entry.task.record(now, WORKER, TimelineEvent::DeadLettered, Some(TaskStatus::Failed), reason);
        self.finish(entry, now);
        self.entries[&id].task.clone()
    }

    /// Whether the client asked to cancel this running long command (a heartbeat's answer).
    pub fn cancel_requested(&self, id: Uuid) -> bool {
        self.entries.get(&id).is_some_and(|e| e.cancel_requested.is_some() && !e.task.status.is_terminal())
    }

    pub fn heartbeat(&mut self, id: Uuid, request: &FencedLease, now: Timestamp) -> Result<Task, Refusal> {
        self.expire_if_due(id, now);
        let lease = self.lease_secs(request.lease.lease_seconds);
        let mut entry = self.held(id, request.lease.claim_id, request.fence)?;
        if let Some(claim) = entry.task.claim.as_mut() {
            claim.lease_expires_at = now.plus_secs(lease);
        }
        entry.task.updated_at = now;
        entry.task.gen += 1;
        let task = entry.task.clone();
        self.put(entry);
        Ok(task)
    }

    pub fn release(&mut self, id: Uuid, request: &FencedLease, now: Timestamp) -> Result<Task, Refusal> {
        self.expire_if_due(id, now);
        let mut entry = self.held(id, request.lease.claim_id, request.fence)?;
        let actor = entry.task.claim.take().map(|c| c.consumer_id).unwrap_or_default();
        entry.fence = 0;
        // A released claim never started work, so it does not count as an attempt.
        entry.task.attempts = entry.task.attempts.saturating_sub(1);
        let reason = request.lease.reason.clone().unwrap_or_else(|| "released by its consumer".into());
        entry.task.record(now, &actor, TimelineEvent::Released, Some(TaskStatus::Pending), reason);
        if self.cancel_standing(&mut entry, now) {
            let task = entry.task.clone();
            self.finish(entry, now);
            return Ok(task);
        }
        let task = entry.task.clone();
        self.put(entry);
        self.became_ready(id);
        Ok(task)
    }

    /// The daemon's outcome. A repeated report of the status the task has is a no-op.
    pub fn report(&mut self, id: Uuid, report: &FencedReport, now: Timestamp) -> Result<(Task, bool), Refusal> {
        let update: &UpdateStatusRequest = &report.update;
        let entry = self.entries.get(&id).ok_or_else(|| Refusal::not_found(id))?;
        let task = &entry.task;
        let fence_ok = report.fence.is_none_or(|f| f == entry.fence);
        if !task.is_claimed_by(update.claim_id) || !fence_ok {
            return Err(Refusal::busy(
                format!(
                    "claim {} (fence {}) does not hold task {id}; only the current claim may report on it",
                    update.claim_id,
                    report.fence.map_or("none".into(), |f| f.to_string()),
                ),
                task.status,
                task.claim.as_ref().map(|c| c.lease_expires_at),
            ));
        }
        if task.status == update.status {
            return Ok((task.clone(), false));
        }
        let event = match update.status {
            TaskStatus::Completed => TimelineEvent::Completed,
            TaskStatus::Failed => TimelineEvent::Failed,
            // A long command its client cancelled while it ran, stopped in the guest.
            TaskStatus::Cancelled if entry.cancel_requested.is_some() => TimelineEvent::Cancelled,
            TaskStatus::Cancelled => {
                return Err(Refusal::conflict(
                    "a daemon reports cancelled only for a task its client asked to cancel".into(),
                    task.status,
                ))
            }
            other => return Err(Refusal::conflict(format!("a daemon cannot report {other}"), task.status)),
        };
        if let Err(e) = task.status.check_transition(update.status) {
            return Err(Refusal::conflict(e.to_string(), task.status));
        }
        let mut entry = entry.clone();
        let consumer = entry.task.claim.as_ref().map(|c| c.consumer_id.clone()).unwrap_or_default();
        for retry in &update.retries {
            entry.task.timeline.push(TimelineEntry {
                at: retry.at,
                actor: consumer.clone(),
                event: TimelineEvent::Retry.as_str().into(),
                from: None,
                to: None,
                message: format!("attempt {} failed: {}", retry.attempt, retry.error),
            });
        }
        entry.task.result = update.result.clone().or(entry.task.result.take());
        entry.task.error = update.error.clone().or(entry.task.error.take());
        if update.status == TaskStatus::Cancelled {
            entry.task.error = entry.cancel_requested.clone();
        }
        let message = update.message.clone().or_else(|| update.error.clone()).unwrap_or_default();
        entry.task.record(now, &consumer, event, Some(update.status), message);
        self.finish(entry, now);
        Ok((self.entries[&id].task.clone(), true))
    }

    /// A client's cancel. `Ok` with a `cancelled` task: it is cancelled and will never be
    /// claimed. `Ok` with a `processing` task: a long command that is running; the cancel is on
    /// record, its daemon learns of it from its next heartbeat's answer, stops the command in the
    /// guest and reports `cancelled` (a lease that ends first ends the task `cancelled` too).
    pub fn cancel(&mut self, id: Uuid, request: &CancelRequest, now: Timestamp) -> Result<Task, Refusal> {
        let mut entry = match self.entries.get(&id) {
            Some(entry) => entry.clone(),
            // Not here yet (its queue message is on its way): hold the cancelled record, so the
            // message finds the task finished when it arrives.
            None => match &request.task {
                Some(task) if task.id == id => {
                    let known =
                        Mirror { written_at: Some(task.updated_at), refused_at: None, status: Some(task.status) };
                    self.mirrors.insert(id, known);
                    StoredEntry {
                        task: task.clone(),
                        fence: 0,
                        mirrored_gen: task.gen,
                        finished_at: None,
                        cancel_requested: None,
                    }
                }
                _ => return Err(Refusal::not_found(id)),
            },
        };
        match entry.task.status {
            TaskStatus::Cancelled => return Ok(entry.task),
            TaskStatus::Pending => {}
            TaskStatus::Processing if is_long_command(&entry.task) => {
                if entry.cancel_requested.is_none() {
                    entry.cancel_requested = Some(RUNNING_CANCEL_MESSAGE.into());
                    entry.task.record(now, "client", TimelineEvent::CancelRequested, None, RUNNING_CANCEL_MESSAGE);
                    self.put(entry.clone());
                }
                return Ok(entry.task);
            }
            other => {
                return Err(Refusal::conflict(
                    format!(
                        "task {id} is {other}; only a pending task can be cancelled, or a running command with \
                         timeoutSeconds over 30"
                    ),
                    other,
                ))
            }
        }
        entry.task.error = Some(request.message.clone());
        entry.task.record(now, "client", TimelineEvent::Cancelled, Some(TaskStatus::Cancelled), &request.message);
        self.finish(entry, now);
        Ok(self.entries[&id].task.clone())
    }

    /// The alarm: ends expired leases, fails tasks nobody claimed in time, purges old finished
    /// entries. Mirror writes that became due are in the next [`HostQueue::effects`].
    pub fn on_alarm(&mut self, now: Timestamp) {
        self.store_notes();
        let ids: Vec<Uuid> = self.entries.keys().copied().collect();
        for id in ids {
            self.expire_if_due(id, now);
            let entry = &self.entries[&id];
            if entry.task.status == TaskStatus::Pending
                && now >= entry.task.created_at.plus_secs(self.config.max_queued_secs)
            {
                let mut entry = entry.clone();
                let reason = format!("no daemon claimed the task within {} s", self.config.max_queued_secs);
                entry.task.error = Some(reason.clone());
                entry.task.record(now, OBJECT, TimelineEvent::NeverClaimed, Some(TaskStatus::Failed), reason);
                self.finish(entry, now);
                continue;
            }
            let purge_at = entry.finished_at.map(|at| at.plus_secs(self.config.retain_secs));
            if purge_at.is_some_and(|at| now >= at) && entry.mirrored_gen >= entry.task.gen {
                self.entries.remove(&id);
                self.mirrors.remove(&id);
                self.store.delete_entry(id);
            }
        }
    }

    /// Records due in KV now (their key's window has passed) and tasks to push; clears the
    /// pushes.
    pub fn effects(&mut self, now: Timestamp) -> Effects {
        let mirror = self
            .entries
            .values()
            .filter(|e| self.mirror_due_at(e).is_some_and(|due| due <= now))
            .map(|e| e.task.clone())
            .collect();
        let ready: BTreeSet<Uuid> = self.ready().iter().map(|t| t.task_id).collect();
        let push = std::mem::take(&mut self.newly_ready)
            .into_iter()
            .filter(|id| ready.contains(id))
            .filter_map(|id| self.entries.get(&id).map(|e| buffered(&e.task)))
            .collect();
        Effects { mirror, push }
    }

    /// The caller wrote this version of the task's record to KV at `now`.
    pub fn mirrored(&mut self, written: &Task, now: Timestamp) {
        self.mirrors
            .insert(written.id, Mirror { written_at: Some(now), refused_at: None, status: Some(written.status) });
        let Some(entry) = self.entries.get_mut(&written.id) else { return };
        entry.mirrored_gen = entry.mirrored_gen.max(written.gen);
        // A live task's is kept in memory only (after a restart its record is written once
        // more). A finished one's is stored: else every wake of the object (after a restart,
        // or after each hibernation) wrote the record of every finished task it still retains
        // again, a KV write each. Stored with the next write or alarm, not now: a commit of its
        // own was one of every task's four, and losing the note to a restart costs one
        // repeated KV write.
        if written.status.is_terminal() && entry.mirrored_gen >= entry.task.gen {
            self.unnoted.insert(written.id);
        }
    }

    /// Stores the notes [`Self::mirrored`] left for later.
    fn store_notes(&mut self) {
        for id in std::mem::take(&mut self.unnoted) {
            if let Some(entry) = self.entries.get(&id) {
                self.store.put_entry(entry);
            }
        }
    }

    /// KV refused the write (429: written within the last second): try after the window.
    pub fn mirror_refused(&mut self, id: Uuid, now: Timestamp) {
        self.mirrors.entry(id).or_default().refused_at = Some(now);
    }

    /// Whether no write of the task's KV record is due now: KV has its status (notes aside), or
    /// the write waits on KV's window ([`MIRROR_WINDOW_MS`]). `?wait` answers once this holds,
    /// so a list read after it agrees whenever KV allows.
    pub fn kv_settled(&self, id: Uuid, now: Timestamp) -> bool {
        let Some(entry) = self.entries.get(&id) else { return true };
        self.mirror_due_at(entry).is_none_or(|due| now < due)
    }

    /// When the object must wake next: the earliest lease end, mirror write due, never-claimed
    /// deadline, note to store or purge. `None`: nothing is scheduled (an idle object costs
    /// nothing).
    pub fn next_alarm(&self) -> Option<Timestamp> {
        let notes = self
            .unnoted
            .iter()
            .filter_map(|id| self.mirrors.get(id).and_then(|m| m.written_at))
            .map(|at| at.plus_millis(MIRROR_WINDOW_MS))
            .min();
        let entries = self
            .entries
            .values()
            .filter_map(|e| {
                let task = &e.task;
                let mirror = self.mirror_due_at(e);
                let deadline = match task.status {
                    TaskStatus::Processing => task.claim.as_ref().map(|c| c.lease_expires_at),
                    TaskStatus::Pending => Some(task.created_at.plus_secs(self.config.max_queued_secs)),
                    _ => e.finished_at.map(|at| at.plus_secs(self.config.retain_secs)),
                };
                [mirror, deadline].into_iter().flatten().min()
            })
            .min();
        entries.into_iter().chain(notes).min()
    }

    /// When the entry's record is due in KV ([`MIRROR_WINDOW_MS`]); `None` when KV has it.
    fn mirror_due_at(&self, entry: &StoredEntry) -> Option<Timestamp> {
        if entry.mirrored_gen >= entry.task.gen {
            return None;
        }
        let mirror = self.mirrors.get(&entry.task.id).copied().unwrap_or_default();
        let task = &entry.task;
        if mirror.status == Some(task.status) {
            // Only notes since (buffered, lease renewed): they ride the next status write.
            return None;
        }
        let since = if task.status.is_terminal() {
            mirror.refused_at
        } else {
            mirror.refused_at.max(mirror.written_at).max(status_since(task))
        };
        Some(since.map_or(Timestamp(0), |at| at.plus_millis(MIRROR_WINDOW_MS)))
    }

    /// The oldest live task of the same VM that comes before `id`, if any.
    fn live_predecessor(&self, id: Uuid) -> Option<Uuid> {
        let vm = self.entries.get(&id)?.task.vm_name().to_owned();
        self.entries.range(..id).find(|(_, e)| !e.task.status.is_terminal() && e.task.vm_name() == vm).map(|(k, _)| *k)
    }

    /// The entry, if `claim_id` (and `fence`, when given) holds it and it is processing.
    fn held(&self, id: Uuid, claim_id: Uuid, fence: Option<u64>) -> Result<StoredEntry, Refusal> {
        let entry = self.entries.get(&id).ok_or_else(|| Refusal::not_found(id))?;
        let task = &entry.task;
        if task.status != TaskStatus::Processing
            || !task.is_claimed_by(claim_id)
            || fence.is_some_and(|f| f != entry.fence)
        {
            return Err(Refusal::busy(
                format!("claim {claim_id} does not hold task {id} (it is {})", task.status),
                task.status,
                task.claim.as_ref().map(|c| c.lease_expires_at),
            ));
        }
        Ok(entry.clone())
    }

    /// A processing task whose lease ended goes back to pending, or fails out of attempts.
    fn expire_if_due(&mut self, id: Uuid, now: Timestamp) {
        let Some(entry) = self.entries.get(&id) else { return };
        let ended = entry.task.claim.as_ref().is_some_and(|c| now >= c.lease_expires_at);
        if entry.task.status != TaskStatus::Processing || !ended {
            return;
        }
        let mut entry = entry.clone();
        let holder = entry.task.claim.take().map(|c| c.consumer_id).unwrap_or_default();
        entry.fence = 0;
        let note = format!(
            "lease of {holder} expired without a report (attempt {} of {})",
            entry.task.attempts, self.config.max_attempts
        );
        entry.task.record(now, OBJECT, TimelineEvent::LeaseExpired, Some(TaskStatus::Pending), note);
        if self.cancel_standing(&mut entry, now) {
            self.finish(entry, now);
        } else if entry.task.attempts >= self.config.max_attempts {
            self.give_up(&mut entry, now);
            self.finish(entry, now);
        } else {
            self.put(entry);
            self.became_ready(id);
        }
    }

    /// A task back from a claim (released, lease ended) whose client asked to cancel it while
    /// it ran: cancelled now rather than run again. Returns whether it was.
    fn cancel_standing(&self, entry: &mut StoredEntry, now: Timestamp) -> bool {
        let Some(message) = entry.cancel_requested.clone() else { return false };
        entry.task.error = Some(message.clone());
        entry.task.record(now, "client", TimelineEvent::Cancelled, Some(TaskStatus::Cancelled), message);
        true
    }

    fn give_up(&self, entry: &mut StoredEntry, now: Timestamp) {
        let reason = format!(
            "gave up after {} attempts: every lease expired without a report from the daemon",
            entry.task.attempts
        );
        entry.task.error = Some(reason.clone());
        entry.task.claim = None;
        entry.fence = 0;
        entry.task.record(now, OBJECT, TimelineEvent::AttemptsExhausted, Some(TaskStatus::Failed), reason);
        entry.finished_at = Some(now);
    }

    /// Stores a terminal entry; its VM's next task may become claimable.
    fn finish(&mut self, mut entry: StoredEntry, now: Timestamp) {
        // The fence stays: a retried report of the finished claim is answered, not refused.
        entry.finished_at = Some(now);
        let vm = entry.task.vm_name().to_owned();
        let id = entry.task.id;
        self.put(entry);
        let next = self.entries.range(id..).find(|(_, e)| !e.task.status.is_terminal() && e.task.vm_name() == vm);
        if let Some((&next, _)) = next {
            self.became_ready(next);
        }
    }

    fn became_ready(&mut self, id: Uuid) {
        self.newly_ready.insert(id);
        self.version += 1;
    }

    fn put(&mut self, entry: StoredEntry) {
        self.store_notes();
        self.store.put_entry(&entry);
        self.entries.insert(entry.task.id, entry);
    }

    fn lease_secs(&self, requested: Option<u64>) -> u64 {
        requested
            .unwrap_or(self.config.lease_default_secs)
            .clamp(self.config.lease_min_secs, self.config.lease_max_secs)
    }
}

/// When the task's current status began: its last status change on the timeline.
fn status_since(task: &Task) -> Option<Timestamp> {
    task.timeline.iter().rev().find(|e| e.to.is_some()).map(|e| e.at)
}

/// Only a long command can be stopped while it runs (the daemon runs it as a guest job).
fn is_long_command(task: &Task) -> bool {
    matches!(&task.operation, Operation::RunCommand(command) if command.is_long())
}

fn granted(task: Task, claim: &Claim, fence: u64) -> ClaimGranted {
    ClaimGranted { success: true, claim_id: claim.claim_id, lease_expires_at: claim.lease_expires_at, fence, task }
}

fn buffered(task: &Task) -> BufferedTask {
    BufferedTask {
        task_id: task.id,
        kind: task.kind(),
        vm_name: task.vm_name().to_owned(),
        target_server: task.target_server.clone(),
        previous_task_id: task.previous_task_id,
        created_at: task.created_at,
        buffered_at: task.event_at(TimelineEvent::Buffered).unwrap_or(task.created_at),
    }
}
