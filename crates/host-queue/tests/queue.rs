//! The host queue's state machine, natively: claims, fences, leases, cancel against claim,
//! per-VM order, mirroring to KV within its write limit, restarts.

use host_queue::{
    CancelRequest, EnqueueOutcome, FencedLease, FencedReport, HostQueue, MemoryStore, QueueConfig, MIRROR_WINDOW_MS,
};
use uuid::Uuid;
use vm_task_types::{
    wire::{ClaimRequest, LeaseRequest, UpdateStatusRequest},
    Operation, Task, TaskStatus, TimelineEvent, Timestamp, VmRef,
};

const T0: Timestamp = Timestamp(1_000_000);

fn at(ms: u64) -> Timestamp {
    T0.plus_millis(ms)
}

/// A pending task as the API stores it: id `n` (ids sort like UUIDv7), created at `T0`.
fn task(n: u128, vm: &str) -> Task {
    Task {
        id: Uuid::from_u128(n),
        operation: Operation::StopVm(VmRef { vm_name: vm.into(), target_server: None }),
        status: TaskStatus::Pending,
        target_server: "host-a".into(),
        previous_task_id: None,
        created_at: T0,
        updated_at: T0,
        attempts: 0,
        claim: None,
        result: None,
        error: None,
        callback_url: None,
        gen: 1,
        timeline: Vec::new(),
    }
}

fn queue() -> HostQueue<MemoryStore> {
    HostQueue::load(MemoryStore::new(), QueueConfig::default())
}

fn claim_req(claim: u128) -> ClaimRequest {
    ClaimRequest {
        consumer_id: "daemon-a".into(),
        claim_id: Some(Uuid::from_u128(1_000 + claim)),
        lease_seconds: Some(30),
        buffered_at: None,
    }
}

fn report(claim: u128, fence: Option<u64>, status: TaskStatus) -> FencedReport {
    FencedReport {
        update: UpdateStatusRequest {
            status,
            claim_id: Uuid::from_u128(1_000 + claim),
            result: None,
            error: None,
            message: None,
            retries: Vec::new(),
        },
        fence,
    }
}

fn lease(claim: u128, fence: Option<u64>) -> FencedLease {
    FencedLease {
        lease: LeaseRequest { claim_id: Uuid::from_u128(1_000 + claim), lease_seconds: Some(30), reason: None },
        fence,
    }
}

fn cancel_req() -> CancelRequest {
    CancelRequest { task: None, message: "cancelled by client".into() }
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

#[test]
fn a_task_is_pushed_claimed_and_reported() {
    let mut q = queue();
    assert_eq!(q.enqueue(task(1, "vm-1"), at(20)), EnqueueOutcome::Queued);
    let fx = q.effects(at(20));
    assert_eq!(fx.push.iter().map(|t| t.task_id).collect::<Vec<_>>(), vec![id(1)]);
    let granted = q.claim(id(1), &claim_req(1), at(30)).unwrap();
    assert_eq!(granted.task.status, TaskStatus::Processing);
    assert_eq!(granted.task.attempts, 1);
    let (done, changed) = q.report(id(1), &report(1, Some(granted.fence), TaskStatus::Completed), at(60)).unwrap();
    assert!(changed);
    assert_eq!(done.status, TaskStatus::Completed);
    let events: Vec<_> = done.timeline.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, ["buffered", "claimed", "completed"]);
    // A retried report (lost answer) is a no-op.
    let (again, changed) = q.report(id(1), &report(1, Some(granted.fence), TaskStatus::Completed), at(70)).unwrap();
    assert!(!changed);
    assert_eq!(again.gen, done.gen);
}

#[test]
fn a_record_is_written_at_most_once_per_kv_window_carrying_every_change_since() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(20));
    // The buffered note is no status change: it rides the next write, never alone.
    assert!(q.effects(at(20)).mirror.is_empty());
    assert!(q.effects(at(10 * MIRROR_WINDOW_MS)).mirror.is_empty());
    assert!(q.next_alarm() > Some(at(10 * MIRROR_WINDOW_MS)), "nothing to wake for");
    let granted = q.claim(id(1), &claim_req(1), at(30)).unwrap();
    assert!(q.effects(at(30)).mirror.is_empty(), "KV would refuse a second write within the second");
    assert_eq!(q.next_alarm(), Some(at(30 + MIRROR_WINDOW_MS)), "processing, if it lasts");
    assert!(q.kv_settled(id(1), at(30)), "waiting on KV's window counts as settled");
    q.report(id(1), &report(1, Some(granted.fence), TaskStatus::Completed), at(60)).unwrap();
    // Finished: written at once, the one write after the API's; `processing` never was.
    let fx = q.effects(at(60));
    assert_eq!(fx.mirror.iter().map(|t| t.status).collect::<Vec<_>>(), vec![TaskStatus::Completed]);
    assert!(!q.kv_settled(id(1), at(60)), "due and not written yet");
    q.mirrored(&fx.mirror[0], at(61));
    assert!(q.kv_settled(id(1), at(61)));
    assert!(q.effects(at(100 * MIRROR_WINDOW_MS)).mirror.is_empty(), "written once");
}

#[test]
fn a_task_running_past_the_window_is_written_as_processing_once_the_window_has_passed() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(20));
    q.claim(id(1), &claim_req(1), at(30)).unwrap();
    assert!(q.effects(at(29 + MIRROR_WINDOW_MS)).mirror.is_empty());
    let fx = q.effects(at(30 + MIRROR_WINDOW_MS));
    assert_eq!(fx.mirror.iter().map(|t| t.status).collect::<Vec<_>>(), vec![TaskStatus::Processing]);
}

#[test]
fn a_status_shorter_than_the_window_never_reaches_kv_even_long_after_the_last_write() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(20));
    // Claimed long after the API's write (under load, behind the VM's earlier tasks).
    let granted = q.claim(id(1), &claim_req(1), at(5_000)).unwrap();
    assert!(q.effects(at(5_000)).mirror.is_empty(), "processing waits until it has lasted a window");
    q.report(id(1), &report(1, Some(granted.fence), TaskStatus::Completed), at(5_300)).unwrap();
    let fx = q.effects(at(5_300));
    assert_eq!(fx.mirror.iter().map(|t| t.status).collect::<Vec<_>>(), vec![TaskStatus::Completed], "one write");
}

#[test]
fn a_status_that_lasts_a_window_is_written_and_a_note_rides_the_next_status_write() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(20));
    let granted = q.claim(id(1), &claim_req(1), at(5_000)).unwrap();
    assert!(q.effects(at(4_999 + MIRROR_WINDOW_MS)).mirror.is_empty());
    let written_at = at(5_000 + MIRROR_WINDOW_MS);
    let fx = q.effects(written_at);
    assert_eq!(fx.mirror.iter().map(|t| t.status).collect::<Vec<_>>(), vec![TaskStatus::Processing]);
    assert!(!q.kv_settled(id(1), written_at), "not settled until written");
    q.mirrored(&fx.mirror[0], written_at);
    assert!(q.kv_settled(id(1), written_at));
    q.heartbeat(id(1), &lease(1, Some(granted.fence)), written_at.plus_millis(10)).unwrap();
    assert!(q.kv_settled(id(1), written_at.plus_millis(10)), "KV has the status");
    assert!(q.effects(written_at.plus_millis(10 * MIRROR_WINDOW_MS)).mirror.is_empty(), "a renewed lease alone");
    let done = written_at.plus_millis(20 * MIRROR_WINDOW_MS);
    q.report(id(1), &report(1, Some(granted.fence), TaskStatus::Completed), done).unwrap();
    let fx = q.effects(done);
    assert_eq!(fx.mirror.len(), 1);
    let renewed = fx.mirror[0].claim.as_ref().map(|c| c.lease_expires_at);
    assert_eq!(renewed, Some(written_at.plus_millis(10).plus_secs(30)), "the lease renewal rode the final write");
}

#[test]
fn a_refused_write_waits_the_window_and_carries_every_change_since() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    let granted = q.claim(id(1), &claim_req(1), at(2_000)).unwrap();
    let refused = at(2_000 + MIRROR_WINDOW_MS);
    assert_eq!(q.effects(refused).mirror.len(), 1);
    q.mirror_refused(id(1), refused);
    assert!(q.kv_settled(id(1), refused), "waiting on KV's limit counts as settled");
    q.report(id(1), &report(1, Some(granted.fence), TaskStatus::Completed), refused.plus_millis(30)).unwrap();
    assert!(q.effects(refused.plus_millis(30)).mirror.is_empty(), "coalesced while KV refuses");
    assert_eq!(q.next_alarm(), Some(refused.plus_millis(MIRROR_WINDOW_MS)));
    let fx = q.effects(refused.plus_millis(MIRROR_WINDOW_MS));
    assert_eq!(fx.mirror.len(), 1, "two transitions, one write");
    assert_eq!(fx.mirror[0].status, TaskStatus::Completed);
    q.mirrored(&fx.mirror[0], refused.plus_millis(MIRROR_WINDOW_MS));
    assert!(q.effects(at(100 * MIRROR_WINDOW_MS)).mirror.is_empty(), "written once");
}

#[test]
fn a_retried_claim_gets_its_own_claim_back_and_another_is_busy() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    let first = q.claim(id(1), &claim_req(1), at(10)).unwrap();
    let again = q.claim(id(1), &claim_req(1), at(20)).unwrap();
    assert_eq!(
        (again.claim_id, again.fence, again.lease_expires_at),
        (first.claim_id, first.fence, first.lease_expires_at)
    );
    assert_eq!(again.task.attempts, 1, "a repeat is not another attempt");
    let other = q.claim(id(1), &claim_req(2), at(20)).unwrap_err();
    assert_eq!(other.status, 409);
    assert_eq!(other.body.lease_expires_at, Some(first.lease_expires_at));
}

#[test]
fn a_stale_claim_cannot_report_after_its_lease_ended_and_another_took_over() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    let old = q.claim(id(1), &claim_req(1), at(10)).unwrap();
    q.on_alarm(old.lease_expires_at);
    let t = q.task(id(1)).unwrap();
    assert_eq!(t.status, TaskStatus::Pending);
    assert_eq!(t.event_at(TimelineEvent::LeaseExpired), Some(old.lease_expires_at));
    assert_eq!(q.effects(old.lease_expires_at).push.len(), 1, "pushed again");
    let new = q.claim(id(1), &claim_req(2), old.lease_expires_at.plus_millis(5)).unwrap();
    assert!(new.fence > old.fence);
    let stale =
        q.report(id(1), &report(1, Some(old.fence), TaskStatus::Completed), new.lease_expires_at.plus_millis(0));
    assert_eq!(stale.unwrap_err().status, 409);
    // The current claim id with an old fence is refused as well.
    let wrong_fence = report(2, Some(old.fence), TaskStatus::Completed);
    assert_eq!(q.report(id(1), &wrong_fence, old.lease_expires_at.plus_millis(6)).unwrap_err().status, 409);
    assert_eq!(
        q.heartbeat(id(1), &lease(1, Some(old.fence)), old.lease_expires_at.plus_millis(6)).unwrap_err().status,
        409
    );
    let done = q.report(id(1), &report(2, Some(new.fence), TaskStatus::Failed), old.lease_expires_at.plus_millis(7));
    assert_eq!(done.unwrap().0.status, TaskStatus::Failed);
}

#[test]
fn leases_that_keep_expiring_use_up_the_attempts_and_fail_the_task() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    let mut now = at(10);
    for attempt in 1..=3 {
        let granted = q.claim(id(1), &claim_req(attempt), now).unwrap();
        now = granted.lease_expires_at;
        q.on_alarm(now);
    }
    let t = q.task(id(1)).unwrap();
    assert_eq!(t.status, TaskStatus::Failed);
    assert!(t.error.as_deref().unwrap().contains("gave up after 3 attempts"), "{:?}", t.error);
    assert_eq!(q.claim(id(1), &claim_req(9), now).unwrap_err().status, 409);
}

#[test]
fn a_heartbeat_extends_the_lease_and_the_alarm_follows_it() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    let granted = q.claim(id(1), &claim_req(1), at(10)).unwrap();
    let renewed = q.heartbeat(id(1), &lease(1, Some(granted.fence)), at(20_000)).unwrap();
    let until = renewed.claim.unwrap().lease_expires_at;
    assert_eq!(until, at(50_000));
    q.on_alarm(granted.lease_expires_at);
    assert_eq!(q.task(id(1)).unwrap().status, TaskStatus::Processing, "the renewed lease holds");
    q.on_alarm(until);
    assert_eq!(q.task(id(1)).unwrap().status, TaskStatus::Pending);
}

#[test]
fn a_release_gives_the_task_back_without_using_an_attempt() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    q.effects(at(0));
    let granted = q.claim(id(1), &claim_req(1), at(10)).unwrap();
    let released = q.release(id(1), &lease(1, Some(granted.fence)), at(20)).unwrap();
    assert_eq!((released.status, released.attempts), (TaskStatus::Pending, 0));
    assert_eq!(q.effects(at(20)).push.len(), 1, "offered again");
    assert_eq!(
        q.report(id(1), &report(1, Some(granted.fence), TaskStatus::Completed), at(30)).unwrap_err().status,
        409
    );
}

/// Every order of a claim and a cancel on a pending task: exactly one wins, and the loser is
/// told so. With one owner there is no interleaving inside an operation to attack; the race
/// test checks the answers across many tasks and both orders.
#[test]
fn cancel_and_claim_never_both_win() {
    let mut q = queue();
    let mut violations = 0;
    for n in 1..=400u128 {
        q.enqueue(task(n, &format!("vm-{n}")), at(0));
        let claim_first = n % 2 == 0;
        let (claim, cancel) = if claim_first {
            let claim = q.claim(id(n), &claim_req(n), at(10));
            (claim, q.cancel(id(n), &cancel_req(), at(11)))
        } else {
            let cancel = q.cancel(id(n), &cancel_req(), at(10));
            (q.claim(id(n), &claim_req(n), at(11)), cancel)
        };
        let status = q.task(id(n)).unwrap().status;
        match (claim.is_ok(), cancel.is_ok()) {
            (true, false) if status == TaskStatus::Processing => {}
            (false, true) if status == TaskStatus::Cancelled => {}
            _ => violations += 1,
        }
    }
    assert_eq!(violations, 0);
}

#[test]
fn a_task_cancelled_before_its_message_arrives_never_becomes_claimable() {
    let mut q = queue();
    let record = task(1, "vm-1");
    assert_eq!(q.cancel(id(1), &cancel_req(), at(5)).unwrap_err().status, 404, "without the record: unknown");
    let cancelled = q.cancel(id(1), &CancelRequest { task: Some(record.clone()), ..cancel_req() }, at(5)).unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert_eq!(q.enqueue(record, at(10)), EnqueueOutcome::Duplicate);
    assert!(q.ready().is_empty());
    assert_eq!(q.claim(id(1), &claim_req(1), at(20)).unwrap_err().body.current_status, Some(TaskStatus::Cancelled));
    // A second cancel is answered the same way.
    assert_eq!(q.cancel(id(1), &cancel_req(), at(30)).unwrap().status, TaskStatus::Cancelled);
}

#[test]
fn a_processing_task_cannot_be_cancelled() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    q.claim(id(1), &claim_req(1), at(10)).unwrap();
    let refused = q.cancel(id(1), &cancel_req(), at(20)).unwrap_err();
    assert_eq!((refused.status, refused.body.current_status), (409, Some(TaskStatus::Processing)));
}

#[test]
fn a_vms_tasks_are_offered_and_granted_one_at_a_time_oldest_first() {
    let mut q = queue();
    // Queue order differs from submission order: the later task arrives first.
    q.enqueue(task(2, "vm-1"), at(0));
    q.enqueue(task(1, "vm-1"), at(1));
    q.enqueue(task(3, "vm-2"), at(2));
    let ready: Vec<_> = q.ready().iter().map(|t| t.task_id).collect();
    assert_eq!(ready, vec![id(1), id(3)]);
    let pushed: Vec<_> = q.effects(at(2)).push.iter().map(|t| t.task_id).collect();
    assert_eq!(pushed, vec![id(1), id(3)], "the later vm-1 task is not pushed yet");
    let refused = q.claim(id(2), &claim_req(2), at(3)).unwrap_err();
    assert!(refused.body.error.contains("waits for task"), "{}", refused.body.error);
    let first = q.claim(id(1), &claim_req(1), at(4)).unwrap();
    assert!(q.ready().iter().all(|t| t.vm_name != "vm-1"), "nothing of vm-1 while its task runs");
    q.report(id(1), &report(1, Some(first.fence), TaskStatus::Completed), at(5)).unwrap();
    assert_eq!(q.effects(at(5)).push.iter().map(|t| t.task_id).collect::<Vec<_>>(), vec![id(2)]);
    q.claim(id(2), &claim_req(2), at(6)).unwrap();
}

#[test]
fn a_redelivered_message_changes_nothing() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    let granted = q.claim(id(1), &claim_req(1), at(10)).unwrap();
    assert_eq!(q.enqueue(task(1, "vm-1"), at(20)), EnqueueOutcome::Duplicate);
    assert_eq!(q.task(id(1)).unwrap().claim.as_ref().unwrap().claim_id, granted.claim_id);
    let mut finished = task(2, "vm-2");
    finished.status = TaskStatus::Cancelled;
    assert_eq!(q.enqueue(finished, at(20)), EnqueueOutcome::Finished);
}

#[test]
fn a_restarted_queue_keeps_its_tasks_and_its_fences_keep_growing() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    q.enqueue(task(2, "vm-2"), at(0));
    let first = q.claim(id(1), &claim_req(1), at(10)).unwrap();
    let store = q.into_store();
    let mut q = HostQueue::load(store, QueueConfig::default());
    assert_eq!(q.task(id(1)).unwrap().status, TaskStatus::Processing);
    // Redelivery on reconnect: what is unclaimed is offered again.
    assert_eq!(q.ready().iter().map(|t| t.task_id).collect::<Vec<_>>(), vec![id(2)]);
    let second = q.claim(id(2), &claim_req(2), at(20)).unwrap();
    assert!(second.fence > first.fence);
    // Records not yet known to be in KV are written again (once their status has lasted a
    // window, as any live status).
    assert_eq!(q.effects(at(20 + MIRROR_WINDOW_MS)).mirror.len(), 2);
    q.report(id(1), &report(1, Some(first.fence), TaskStatus::Completed), at(30)).unwrap();
}

/// The bench's worker restart after 500 tasks: the object's first request waited 3.3 s while
/// it wrote the KV record of every finished task it retained again.
/// Task 1 completed at 20 ms and its final record written to KV at 5 s.
fn finished_and_in_kv() -> HostQueue<MemoryStore> {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    let granted = q.claim(id(1), &claim_req(1), at(10)).unwrap();
    q.report(id(1), &report(1, Some(granted.fence), TaskStatus::Completed), at(20)).unwrap();
    for written in q.effects(at(5_000)).mirror {
        q.mirrored(&written, at(5_000));
    }
    q
}

#[test]
fn a_finished_task_written_to_kv_is_not_written_again_after_a_restart() {
    let mut q = finished_and_in_kv();
    assert!(q.effects(at(6_000)).mirror.is_empty());
    // That KV has it is stored with the next write or alarm, not in a commit of its own; a
    // restart before then costs one more KV write.
    let rows = q.store().ops.rows_written;
    assert_eq!(q.next_alarm(), Some(at(5_000 + MIRROR_WINDOW_MS)));
    let mut early = HostQueue::load(q.store().clone(), QueueConfig::default());
    assert_eq!(early.effects(at(5_500)).mirror.len(), 1, "not noted yet: written again");
    q.on_alarm(at(5_000 + MIRROR_WINDOW_MS));
    assert_eq!(q.store().ops.rows_written, rows + 1);
    let mut q = HostQueue::load(q.into_store(), QueueConfig::default());
    assert_eq!(q.task(id(1)).unwrap().status, TaskStatus::Completed);
    assert!(q.effects(at(7_000)).mirror.is_empty(), "the finished record is in KV already");
}

#[test]
fn that_kv_has_a_finished_record_is_stored_with_the_next_write() {
    let mut q = finished_and_in_kv();
    q.enqueue(task(2, "vm-1"), at(5_010));
    let mut q = HostQueue::load(q.into_store(), QueueConfig::default());
    let rewritten: Vec<_> = q.effects(at(6_000)).mirror.iter().map(|t| t.id).collect();
    assert_eq!(rewritten, vec![id(2)], "only the new task's record, never the finished one's");
}

#[test]
fn an_unclaimed_task_fails_after_max_queued_and_a_finished_one_is_purged_once_mirrored() {
    let config = QueueConfig { max_queued_secs: 60, retain_secs: 10, ..QueueConfig::default() };
    let mut q = HostQueue::load(MemoryStore::new(), config);
    q.enqueue(task(1, "vm-1"), at(0));
    q.on_alarm(at(59_999));
    assert_eq!(q.task(id(1)).unwrap().status, TaskStatus::Pending);
    q.on_alarm(at(60_000));
    let t = q.task(id(1)).unwrap().clone();
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.event_at(TimelineEvent::NeverClaimed), Some(at(60_000)));
    q.on_alarm(at(80_000));
    assert!(q.task(id(1)).is_some(), "not purged before its final record is in KV");
    q.mirrored(&t, at(80_000));
    q.on_alarm(at(80_001));
    assert!(q.task(id(1)).is_none());
    assert!(q.store().is_empty());
    assert_eq!(q.next_alarm(), None, "an empty queue schedules nothing");
}

#[test]
fn a_lone_task_costs_a_handful_of_rows() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    let granted = q.claim(id(1), &claim_req(1), at(10)).unwrap();
    q.report(id(1), &report(1, Some(granted.fence), TaskStatus::Completed), at(20)).unwrap();
    let ops = q.store().ops;
    // enqueue 1, claim 2 (entry and fence counter), report 1; reads: the fence counter at load.
    assert_eq!((ops.rows_written, ops.rows_read), (4, 1));
}

#[test]
fn a_report_of_pending_or_cancelled_is_refused() {
    let mut q = queue();
    q.enqueue(task(1, "vm-1"), at(0));
    let granted = q.claim(id(1), &claim_req(1), at(10)).unwrap();
    for status in [TaskStatus::Pending, TaskStatus::Cancelled] {
        assert_eq!(q.report(id(1), &report(1, Some(granted.fence), status), at(20)).unwrap_err().status, 409);
    }
    assert_eq!(q.task(id(1)).unwrap().status, TaskStatus::Processing);
}
