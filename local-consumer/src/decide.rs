//! The daemon's decisions, without I/O (the sans-IO pattern of quinn-proto): given what the
//! daemon knows (listings, jobs that ended, answers it got, the clock's reading) they say
//! what to do next: which task to start, whether its predecessor is out of the way, whether a
//! claimed task may run or must fail as possibly sent already, what a claim's or a report's
//! answer means.
//!
//! The tokio [`crate::daemon::Daemon`] does the I/O around them; the production model
//! (`edge-model`) calls the same functions from its single-threaded, simulated-time daemon, so
//! the model checks these rules rather than a restatement. Nothing here reads a clock, spawns
//! or iterates a hash map for its result: time comes in as `T` (tokio's `Instant` here, a
//! `Duration` since the model's epoch there).

use std::{collections::HashMap, ops::Add, time::Duration};

use uuid::Uuid;
use vm_task_types::{
    wire::{BufferedTask, ClaimResponse, TaskStatusResponse},
    Operation, Task, TaskStatus, Timestamp,
};

use crate::{
    edge::{ClaimOutcome, EdgeError},
    retry::RetryPolicy,
    scheduler::Scheduler,
};

/// How soon a task whose predecessor is not finished yet is checked again.
pub const PREDECESSOR_WAIT: Duration = Duration::from_millis(500);

/// How soon a task whose predecessor could not be checked (no answer) is tried again.
pub const PREDECESSOR_CHECK_RETRY: Duration = Duration::from_secs(2);

/// How far the order check follows a chain of predecessors that never ran before it waits.
pub const CANCELLED_PREDECESSORS_MAX: usize = 64;

/// KV's propagation window (`vm_task_edge::KV_PROPAGATION_SECS`): a record written this long
/// ago is visible at every location.
const KV_PROPAGATION_SECS: u64 = 60;

/// How soon a claim that got no answer is tried again (whatever the listings say).
pub const CLAIM_UNANSWERED_RETRY: Duration = Duration::from_secs(2);

/// How soon a claim refused for a reason the daemon does not know is tried again.
pub const CLAIM_REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Margin past a holding lease's end before the claim is tried again.
const HELD_MARGIN: Duration = Duration::from_millis(250);

/// How soon a task whose report was not accepted is claimed again to report it.
pub const UNREPORTED_RETRY: Duration = Duration::from_secs(5);

/// Retries of a claim answered 404 for a listed task (its record has not reached the
/// answering location yet): 1 s, 2 s, 4 s … capped at 30 s, 12 tries, about 4 minutes in
/// all, several times KV's 60 s propagation. After that the record is taken as truly absent
/// (an orphaned buffer entry with no task behind it: nothing a client can read or wait for)
/// and the daemon stops claiming it until it restarts.
pub const NOT_VISIBLE_RETRY: RetryPolicy =
    RetryPolicy { retries: 12, base: Duration::from_secs(1), cap: Duration::from_secs(30) };

/// What a task's job tells the loop when it ends. `T` is the clock's reading, `U` an outcome
/// kept to report.
#[derive(Debug)]
pub enum JobEnd<T, U> {
    /// Done here or found terminal: never start again.
    Finished(Uuid),
    /// Found cancelled, or terminal at its claim without having run here: never start it,
    /// and never count it as a finished predecessor (it may never have run, so the tasks
    /// before it may not have either; a successor asks the API, see [`predecessor`]).
    Cancelled(Uuid),
    /// Not startable yet; try again at this time if still listed.
    Deferred(BufferedTask, T),
    /// Ran, but no report was accepted (the claim was lost, or the workers stayed
    /// unreachable): when the task is claimed again, report this instead of running it again.
    Unreported(BufferedTask, Box<U>, T),
    /// The claim found no record of the listed task (not propagated yet): retry with backoff.
    NotVisible(BufferedTask),
    /// The claim got no answer (the workers went away mid-request), so it may have been
    /// granted, and then the task is no longer listed as ready: try again at this time
    /// whatever the listings say (the same claim id gets that claim back).
    ClaimUnanswered(BufferedTask, T),
}

/// A task to start now.
#[derive(Debug)]
pub struct Start<U> {
    pub task: BufferedTask,
    /// Its predecessor finished here, so the API need not be asked.
    pub previous_done: bool,
    /// It ran here and its report was not accepted: report this instead of running it.
    pub unreported: Option<U>,
}

/// What the daemon knows about its work, and the rules that turn it into the next step.
#[derive(Debug)]
pub struct Core<T, U> {
    scheduler: Scheduler<T>,
    /// Outcomes of tasks that ran here but whose report was not accepted, by task id.
    unreported: HashMap<Uuid, U>,
    /// Claims answered 404 so far, by task id, for the backoff of [`NOT_VISIBLE_RETRY`].
    not_visible: HashMap<Uuid, u32>,
}

impl<T, U> Default for Core<T, U> {
    fn default() -> Self {
        Self { scheduler: Scheduler::default(), unreported: HashMap::new(), not_visible: HashMap::new() }
    }
}

impl<T: Copy + Ord + Add<Duration, Output = T>, U: Clone> Core<T, U> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A listing came: `complete` replaces the view of what is buffered, a partial one (a
    /// page, a push) adds to it.
    pub fn listed(&mut self, tasks: Vec<BufferedTask>, complete: bool) {
        if complete {
            self.scheduler.offer(tasks)
        } else {
            self.scheduler.add(tasks)
        }
    }

    /// The next task to start now, if any may: the oldest listed task of a VM with nothing of
    /// it running or deferred, not finished here. It counts as running until its
    /// [`JobEnd`] comes back through [`Core::ended`].
    pub fn next(&mut self, now: T) -> Option<Start<U>> {
        let task = self.scheduler.next(now)?;
        let previous_done = task.previous_task_id.is_some_and(|p| self.scheduler.has_finished_ran(p));
        let unreported = self.unreported.get(&task.task_id).cloned();
        Some(Start { task, previous_done, unreported })
    }

    /// Applies a job's end at `now`.
    pub fn ended(&mut self, end: JobEnd<T, U>, now: T) {
        match end {
            JobEnd::Finished(id) => {
                self.unreported.remove(&id);
                self.not_visible.remove(&id);
                self.scheduler.finish(id);
            }
            JobEnd::Cancelled(id) => {
                self.not_visible.remove(&id);
                self.scheduler.finish_cancelled(id);
            }
            JobEnd::Deferred(task, at) => self.scheduler.defer(task, at),
            JobEnd::ClaimUnanswered(task, at) => self.scheduler.defer_unlisted(task, at),
            JobEnd::NotVisible(task) => {
                let id = task.task_id;
                let tries = self.not_visible.entry(id).or_default();
                *tries += 1;
                if *tries > NOT_VISIBLE_RETRY.retries {
                    tracing::error!(
                        task = %id,
                        tries = *tries,
                        "the API still has no record of this listed task after minutes of retries: its buffer entry is an orphan; no longer claiming it"
                    );
                    self.not_visible.remove(&id);
                    self.scheduler.finish(id);
                } else {
                    let at = now + NOT_VISIBLE_RETRY.ceiling(*tries);
                    self.scheduler.defer(task, at);
                }
            }
            JobEnd::Unreported(task, update, at) => {
                self.unreported.insert(task.task_id, *update);
                self.scheduler.defer(task, at);
            }
        }
    }

    /// The listing and bookkeeping of tasks.
    pub fn scheduler(&self) -> &Scheduler<T> {
        &self.scheduler
    }
}

/// What one status read of a task's predecessor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predecessor {
    /// Out of the way: terminal after running, on another server, or unknown long enough.
    Done,
    /// Not finished yet (or not visible here yet): the successor waits.
    NotYet,
    /// It never ran (cancelled, or failed before any claim), so it vouches for nothing before
    /// it: ask about this one, its own predecessor.
    Before(Uuid),
}

/// Whether a task's predecessor is out of the way, from its status (`None`: the API has no
/// record of it), the daemon's servers, when the successor was created and the time now.
///
/// A predecessor that ended without ever running (cancelled, or failed before any claim: its
/// queue message dead-lettered, nobody claimed it in time) says nothing about the tasks
/// before it: the check follows the chain back to the nearest predecessor that did run. (The
/// production model, durable mode: step 2 dead-lettered while step 1's message was still on
/// its way, and step 3 ran before step 1.) A predecessor the API cannot find is unknown only
/// once twice KV's propagation window has passed since the successor was created (the
/// predecessor's record was written before that, and a location may cache its absence for
/// 60 s from a read made while the write was still on its way); sooner, the answering
/// location may just not have it yet.
pub fn predecessor(
    status: Option<&TaskStatusResponse>,
    servers: &[String],
    successor_created: Timestamp,
    now: Timestamp,
) -> Predecessor {
    let Some(status) = status else {
        return if successor_created.plus_secs(2 * KV_PROPAGATION_SECS) <= now {
            Predecessor::Done
        } else {
            Predecessor::NotYet
        };
    };
    if !servers.contains(&status.target_server) {
        return Predecessor::Done;
    }
    match (never_ran(status), status.previous_task_id) {
        (true, Some(before)) => Predecessor::Before(before),
        _ if status.status.is_terminal() => Predecessor::Done,
        _ => Predecessor::NotYet,
    }
}

/// Whether a task ended without any daemon having run it: cancelled, or failed with no claim.
pub fn never_ran(status: &TaskStatusResponse) -> bool {
    status.status == TaskStatus::Cancelled || (status.status == TaskStatus::Failed && status.attempts == 0)
}

/// Why a claimed task must not run here, if it must not: a `run_command` on its second
/// attempt or later. An earlier attempt's lease ended without a report (its daemon crashed,
/// was cut off, or lost the claim), so that attempt may have sent the command to the guest,
/// and a command is never sent twice. (A released claim gives its attempt back, and a
/// launch, stop or delete looks at the VM first, so those are safe to run again. A long
/// command's job in the guest is named by its task id: a later attempt finds it and watches
/// it instead of sending it again.)
pub fn not_resent(task: &Task) -> Option<String> {
    let short_command = matches!(&task.operation, Operation::RunCommand(cmd) if !cmd.is_long());
    (short_command && task.attempts > 1).then(|| {
        format!(
            "not re-sent: this is attempt {} and an earlier attempt ended without a report, so the command may already have run in the guest; commands are never sent twice (submit it again if it is safe to repeat)",
            task.attempts
        )
    })
}

/// What a claim's refusal means, at wall-clock time `now`: a terminal 409 is the task
/// finished, a 409 naming a lease's end is held until then, a 404 is a record not visible
/// here yet (the buffer entry proves the task exists); anything else stays an error.
pub fn claim_refused(error: EdgeError, now: Timestamp) -> Result<ClaimOutcome, EdgeError> {
    match error {
        EdgeError::Refused { status: 409, body } => match (body.current_status, body.lease_expires_at) {
            (Some(status), _) if status.is_terminal() => Ok(ClaimOutcome::Finished(status)),
            (_, Some(until)) => Ok(ClaimOutcome::Held(Duration::from_millis(until.millis_since(now)))),
            _ => Err(EdgeError::Refused { status: 409, body }),
        },
        EdgeError::Refused { status: 404, .. } => Ok(ClaimOutcome::NotVisible),
        e => Err(e),
    }
}

/// What to do with a claim's result at `now`: run the claimed task, or end its job so.
pub fn after_claim<T: Add<Duration, Output = T>, U>(
    task: BufferedTask,
    claimed: Result<ClaimOutcome, EdgeError>,
    now: T,
) -> Result<Box<ClaimResponse>, JobEnd<T, U>> {
    let id = task.task_id;
    match claimed {
        Ok(ClaimOutcome::Claimed(claim)) => Ok(claim),
        Ok(ClaimOutcome::Finished(TaskStatus::Cancelled)) => {
            tracing::info!("task is cancelled; skipping");
            Err(JobEnd::Cancelled(id))
        }
        Ok(ClaimOutcome::Finished(status)) => {
            // Finished without running here: it may never have run at all (dead-lettered,
            // never claimed in time), so it vouches for nothing before it, as a cancelled one.
            tracing::info!(%status, "task is already terminal; skipping");
            Err(JobEnd::Cancelled(id))
        }
        Ok(ClaimOutcome::NotVisible) => {
            tracing::info!("the API has no record of the listed task yet (KV propagation); will retry");
            Err(JobEnd::NotVisible(task))
        }
        Ok(ClaimOutcome::Held(remaining)) => {
            tracing::info!(
                remaining_ms = remaining.as_millis() as u64,
                "task is held by another claim; retrying when its lease ends"
            );
            Err(JobEnd::Deferred(task, now + remaining + HELD_MARGIN))
        }
        Err(e) => {
            tracing::warn!(error = %e, "claim failed; will retry");
            if e.is_transient() {
                Err(JobEnd::ClaimUnanswered(task, now + CLAIM_UNANSWERED_RETRY))
            } else {
                Err(JobEnd::Deferred(task, now + CLAIM_REFUSED_RETRY))
            }
        }
    }
}

/// What the job does once the predecessor check is over (`Ok(done)`, or no answer), at `now`:
/// go on to the claim (`None`), or end deferred.
pub fn after_predecessor_check<T: Add<Duration, Output = T>, U>(
    task: BufferedTask,
    checked: Result<bool, EdgeError>,
    now: T,
) -> Option<JobEnd<T, U>> {
    match checked {
        Ok(true) => None,
        Ok(false) => {
            tracing::debug!(previous = ?task.previous_task_id, "waiting for the VM's previous task");
            Some(JobEnd::Deferred(task, now + PREDECESSOR_WAIT))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check the previous task; will retry");
            Some(JobEnd::Deferred(task, now + PREDECESSOR_CHECK_RETRY))
        }
    }
}

/// What to do after one attempt to report a task's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterReport {
    /// Accepted: the task is finished here.
    Accepted,
    /// Refused for its content (400, 413, 422) the first time: report the task `failed` with
    /// the reason instead, so it ends readable rather than stuck.
    ReportFailedInstead,
    /// Refused otherwise (the claim is no longer ours): keep the outcome and report it when
    /// the task is claimed again, never running it again ([`JobEnd::Unreported`]).
    Keep,
    /// No answer, or a transient error: try the same report again (while the caller's
    /// deadline allows).
    Retry,
}

/// What a report's answer means; `content_refused_before`: a failed report already replaced
/// one the API refused for its content.
pub fn after_report(answer: &Result<(), EdgeError>, content_refused_before: bool) -> AfterReport {
    match answer {
        Ok(()) => AfterReport::Accepted,
        Err(EdgeError::Refused { status: 400 | 413 | 422, .. }) if !content_refused_before => {
            AfterReport::ReportFailedInstead
        }
        Err(EdgeError::Refused { .. }) => AfterReport::Keep,
        Err(EdgeError::Transient(_)) => AfterReport::Retry,
    }
}

#[cfg(test)]
mod tests {
    use vm_task_types::{wire::ErrorBody, OperationKind};

    use super::*;

    fn buffered(ms: u64, vm: &str) -> BufferedTask {
        BufferedTask {
            task_id: uuid::Builder::from_unix_timestamp_millis(ms, &[0; 10]).into_uuid(),
            kind: OperationKind::RunCommand,
            vm_name: vm.into(),
            target_server: "production".into(),
            previous_task_id: None,
            created_at: Timestamp(ms),
            buffered_at: Timestamp(ms),
        }
    }

    fn status(status: TaskStatus, attempts: u32, previous: Option<Uuid>) -> TaskStatusResponse {
        TaskStatusResponse {
            success: true,
            task_id: Uuid::nil(),
            kind: OperationKind::RunCommand,
            status,
            vm_name: "a".into(),
            target_server: "production".into(),
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            attempts,
            previous_task_id: previous,
            result: None,
            error: None,
        }
    }

    fn refused(status: u16, current: Option<TaskStatus>, until: Option<Timestamp>) -> EdgeError {
        let body = ErrorBody {
            success: false,
            error: "refused".into(),
            code: "conflict".into(),
            field: None,
            current_status: current,
            lease_expires_at: until,
        };
        EdgeError::Refused { status, body }
    }

    #[test]
    fn a_predecessor_that_never_ran_sends_the_check_to_the_one_before_it() {
        let servers = ["production".to_owned()];
        let (created, now) = (Timestamp(1_000), Timestamp(2_000));
        let before = Uuid::from_u128(7);
        let check = |s: &TaskStatusResponse| predecessor(Some(s), &servers, created, now);
        assert_eq!(check(&status(TaskStatus::Cancelled, 0, Some(before))), Predecessor::Before(before));
        assert_eq!(check(&status(TaskStatus::Failed, 0, Some(before))), Predecessor::Before(before), "dead-lettered");
        assert_eq!(check(&status(TaskStatus::Failed, 1, Some(before))), Predecessor::Done, "it ran");
        assert_eq!(check(&status(TaskStatus::Processing, 1, Some(before))), Predecessor::NotYet);
        assert_eq!(check(&status(TaskStatus::Cancelled, 0, None)), Predecessor::Done, "the first of its VM");
    }

    #[test]
    fn an_unknown_predecessor_is_out_of_the_way_only_after_twice_the_propagation_window() {
        let servers = ["production".to_owned()];
        let created = Timestamp(1_000_000);
        assert_eq!(predecessor(None, &servers, created, created.plus_secs(119)), Predecessor::NotYet);
        assert_eq!(predecessor(None, &servers, created, created.plus_secs(120)), Predecessor::Done);
    }

    #[test]
    fn a_claims_answer_decides_run_skip_or_retry_and_when() {
        let now = Duration::from_secs(100);
        let task = buffered(1, "a");
        let end = |e: EdgeError| after_claim::<_, ()>(task.clone(), claim_refused(e, Timestamp(10_000)), now).err();
        assert!(matches!(end(refused(409, Some(TaskStatus::Completed), None)), Some(JobEnd::Cancelled(_))));
        let held = end(refused(409, Some(TaskStatus::Processing), Some(Timestamp(13_000))));
        assert!(matches!(held, Some(JobEnd::Deferred(_, at)) if at == now + Duration::from_millis(3_250)), "{held:?}");
        assert!(matches!(end(refused(404, None, None)), Some(JobEnd::NotVisible(_))));
        let lost = end(EdgeError::Transient("reset".into()));
        assert!(matches!(lost, Some(JobEnd::ClaimUnanswered(_, at)) if at == now + CLAIM_UNANSWERED_RETRY));
        let odd = end(refused(409, None, None));
        assert!(matches!(odd, Some(JobEnd::Deferred(_, at)) if at == now + CLAIM_REFUSED_RETRY), "{odd:?}");
    }

    #[test]
    fn a_refused_report_is_kept_a_content_refusal_is_replaced_once_and_a_lost_one_retried() {
        assert_eq!(after_report(&Ok(()), false), AfterReport::Accepted);
        assert_eq!(after_report(&Err(refused(409, None, None)), false), AfterReport::Keep);
        assert_eq!(after_report(&Err(refused(404, None, None)), false), AfterReport::Keep);
        assert_eq!(after_report(&Err(refused(413, None, None)), false), AfterReport::ReportFailedInstead);
        assert_eq!(after_report(&Err(refused(413, None, None)), true), AfterReport::Keep);
        assert_eq!(after_report(&Err(EdgeError::Transient("reset".into())), false), AfterReport::Retry);
    }

    #[test]
    fn a_claim_answered_404_is_retried_with_backoff_then_given_up_as_an_orphan() {
        let mut core: Core<Duration, ()> = Core::new();
        let task = buffered(1, "a");
        core.listed(vec![task.clone()], true);
        let mut now = Duration::ZERO;
        for tries in 1..=NOT_VISIBLE_RETRY.retries {
            let started = core.next(now).expect("due again").task;
            core.ended(JobEnd::NotVisible(started), now);
            assert!(core.next(now).is_none(), "try {tries} waits its backoff");
            now += NOT_VISIBLE_RETRY.ceiling(tries);
        }
        let last = core.next(now).expect("the last try").task;
        core.ended(JobEnd::NotVisible(last), now);
        core.listed(vec![task], true);
        assert!(core.next(now + Duration::from_secs(3600)).is_none(), "an orphan is not claimed again");
    }

    #[test]
    fn an_unreported_outcome_comes_back_with_the_task_and_a_predecessor_seen_finishing_needs_no_check() {
        let mut core: Core<Duration, &str> = Core::new();
        let (first, mut second) = (buffered(1, "a"), buffered(2, "a"));
        second.previous_task_id = Some(first.task_id);
        core.listed(vec![first.clone(), second.clone()], true);
        let now = Duration::ZERO;
        let start = core.next(now).unwrap();
        core.ended(JobEnd::Unreported(start.task, Box::new("completed"), now + UNREPORTED_RETRY), now);
        assert!(core.next(now).is_none(), "the second waits for the first");
        let again = core.next(now + UNREPORTED_RETRY).unwrap();
        assert_eq!((again.task.task_id, again.unreported), (first.task_id, Some("completed")));
        core.ended(JobEnd::Finished(first.task_id), now);
        let next = core.next(now + UNREPORTED_RETRY).unwrap();
        assert!(next.task.task_id == second.task_id && next.previous_done);
    }
}
