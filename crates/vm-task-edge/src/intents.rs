//! Cancel and claim intents: how a client's cancel and a daemon's claim race for a pending
//! task without compare-and-swap.
//!
//! Each side writes its own intent key, then reads the other's (`cancel:{id}`, `claim:{id}`
//! in `TASK_STORAGE`). At one location KV reads see every earlier write, so of two sides
//! that each write before they read, at least one sees the other: they cannot both miss each
//! other and both win. A claim that sees a cancel intent yields (the task becomes cancelled,
//! the daemon gets 409 and never calls Arrakis). A cancel that sees no claim intent, or only
//! one that already settled, wins outright. A cancel that sees a claim in flight waits
//! briefly for the record to show the claim's decision: cancelled (the claim yielded: 200),
//! processing under that claim (it proceeded: 409), or nothing yet (202 `cancel_requested`;
//! the intent stays, and every later claim yields to it).
//!
//! That argument needs reads to see earlier writes, which holds at one location only. Across
//! locations (`KV_PROPAGATION_SECONDS` = P > 0) a claim at another location may have written
//! its intent and read no cancel intent before either write reached the other side: both
//! would win. So there a cancel of a pending task is never answered 200 at once. It writes
//! its intent and answers 202 `cancel_requested`; the cancel becomes certain [`settle_at`]:
//! a claim that reads the cancel intent after the intent has propagated (P after it) yields,
//! so every claim that can still take the task read before then and wrote the record
//! (`processing`) by then; that write is visible everywhere P later. A read of the record
//! after 2·P (plus a margin for the write's own trip and the invocation's time) therefore
//! shows any claim that took the task, and [`settle_cancel`] decides: never claimed means
//! cancelled (it cannot run any more), claimed means the operation's own result stands. The
//! daemon's claim, a later DELETE and the sweep settle it, whichever comes first.
//!
//! The decisions are pure functions of the record and the intents, tested here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_task_types::{Task, TaskStatus, Timestamp};

/// Written by `DELETE /vm/tasks/:id` before it reads the claim intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CancelIntent {
    pub(crate) at: Timestamp,
    pub(crate) message: String,
}

impl CancelIntent {
    /// The intent's time from its listing metadata, when it was written with it.
    pub(crate) fn listed_at(metadata: Option<&serde_json::Value>) -> Option<Timestamp> {
        metadata.and_then(|m| serde_json::from_value(m.get("at")?.clone()).ok())
    }
}

/// Written by a claim about to be granted, before it reads the cancel intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClaimIntent {
    pub(crate) claim_id: Uuid,
    pub(crate) consumer_id: String,
    pub(crate) at: Timestamp,
}

/// What the record says about the claim behind `intent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimOutcome {
    /// No decision is visible yet: the claim may still read the cancel intent.
    InFlight,
    /// The claim stood down: the task is cancelled.
    Yielded,
    /// The claim took the task (it is processing under it, or finished).
    Proceeded(TaskStatus),
    /// The claim decided long ago and the task came back to pending since (released or
    /// expired): it cannot be reading the cancel intent any more.
    Settled,
}

/// Beyond `2·P`: a write reaches other locations' stores a few seconds after its own (the
/// cache TTL is what P counts), and the invocations on both sides take time (a paced write
/// waits a second or two).
pub(crate) const CANCEL_SETTLE_MARGIN_MS: u64 = 10_000;

/// When a cancel requested at `intent.at` becomes certain with propagation window
/// `propagation_secs` (P > 0).
pub(crate) fn settle_at(intent: &CancelIntent, propagation_secs: u64) -> Timestamp {
    intent.at.plus_secs(2 * propagation_secs).plus_millis(CANCEL_SETTLE_MARGIN_MS)
}

/// What a standing cancel intent means for the task as read at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelSettlement {
    /// Not certain yet: a claim elsewhere may have taken the task unseen.
    Wait { until: Timestamp },
    /// Pending and never attempted: no claim took it and none will. Cancelled.
    Cancel,
    /// Pending again after an attempt whose lease ended without a report: it will not run
    /// again, but the earlier attempt may have reached Arrakis, so it is not "cancelled": it
    /// fails, saying the outcome is unknown.
    FailUnknown,
    /// A claim took the task first (processing or finished): its own result stands.
    ClaimWon(TaskStatus),
}

/// Settles a cancel intent against the record read at `now` (`propagation_secs` > 0).
pub(crate) fn settle_cancel(
    task: &Task,
    intent: &CancelIntent,
    now: Timestamp,
    propagation_secs: u64,
) -> CancelSettlement {
    let until = settle_at(intent, propagation_secs);
    match task.status {
        TaskStatus::Pending if now < until => CancelSettlement::Wait { until },
        TaskStatus::Pending if task.attempts == 0 => CancelSettlement::Cancel,
        TaskStatus::Pending => CancelSettlement::FailUnknown,
        status => CancelSettlement::ClaimWon(status),
    }
}

/// Reads the claim's decision off the task record.
pub(crate) fn claim_outcome(task: &Task, intent: &ClaimIntent) -> ClaimOutcome {
    match task.status {
        TaskStatus::Cancelled => ClaimOutcome::Yielded,
        TaskStatus::Pending => {
            let back_to_pending = task.timeline.iter().any(|e| e.to == Some(TaskStatus::Pending) && e.at >= intent.at);
            if back_to_pending {
                ClaimOutcome::Settled
            } else {
                ClaimOutcome::InFlight
            }
        }
        status => ClaimOutcome::Proceeded(status),
    }
}

#[cfg(test)]
mod tests {
    use vm_task_types::{Operation, TimelineEvent, VmRef};

    use super::*;

    fn pending() -> Task {
        Task {
            id: Uuid::nil(),
            operation: Operation::StopVm(VmRef { vm_name: "vm-1".into(), target_server: None }),
            status: TaskStatus::Pending,
            target_server: "production".into(),
            previous_task_id: None,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            attempts: 0,
            claim: None,
            result: None,
            error: None,
            callback_url: None,
            gen: 0,
            timeline: Vec::new(),
        }
    }

    fn intent(at: u64) -> ClaimIntent {
        ClaimIntent { claim_id: Uuid::from_u128(1), consumer_id: "host-a".into(), at: Timestamp(at) }
    }

    #[test]
    fn a_pending_record_means_the_claim_is_in_flight_until_it_returned_to_pending_since() {
        let mut task = pending();
        assert_eq!(claim_outcome(&task, &intent(100)), ClaimOutcome::InFlight);
        task.record(Timestamp(150), "host-a", TimelineEvent::Claimed, Some(TaskStatus::Processing), "");
        assert_eq!(claim_outcome(&task, &intent(100)), ClaimOutcome::Proceeded(TaskStatus::Processing));
        task.record(Timestamp(200), "host-a", TimelineEvent::Released, Some(TaskStatus::Pending), "");
        assert_eq!(claim_outcome(&task, &intent(100)), ClaimOutcome::Settled);
        assert_eq!(claim_outcome(&task, &intent(300)), ClaimOutcome::InFlight, "a newer claim is in flight");
    }

    #[test]
    fn across_locations_a_cancel_is_certain_only_two_propagation_windows_after_its_intent() {
        let intent = CancelIntent { at: Timestamp(1_000_000), message: "cancelled by client".into() };
        let settle = Timestamp(1_000_000 + 120_000 + CANCEL_SETTLE_MARGIN_MS);
        assert_eq!(settle_at(&intent, 60), settle);
        let mut task = pending();
        assert_eq!(
            settle_cancel(&task, &intent, Timestamp(settle.0 - 1), 60),
            CancelSettlement::Wait { until: settle }
        );
        assert_eq!(settle_cancel(&task, &intent, settle, 60), CancelSettlement::Cancel);
        task.attempts = 1; // claimed once, its lease ended, back to pending
        assert_eq!(settle_cancel(&task, &intent, settle, 60), CancelSettlement::FailUnknown);
        task.record(Timestamp(1_000_500), "host-a", TimelineEvent::Claimed, Some(TaskStatus::Processing), "");
        assert_eq!(
            settle_cancel(&task, &intent, Timestamp(settle.0 - 1), 60),
            CancelSettlement::ClaimWon(TaskStatus::Processing),
            "a claim that took the task wins whenever it is seen"
        );
    }

    #[test]
    fn a_cancelled_record_means_the_claim_yielded() {
        let mut task = pending();
        task.record(Timestamp(150), "client", TimelineEvent::Cancelled, Some(TaskStatus::Cancelled), "");
        assert_eq!(claim_outcome(&task, &intent(100)), ClaimOutcome::Yielded);
    }
}
