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
    fn a_cancelled_record_means_the_claim_yielded() {
        let mut task = pending();
        task.record(Timestamp(150), "client", TimelineEvent::Cancelled, Some(TaskStatus::Cancelled), "");
        assert_eq!(claim_outcome(&task, &intent(100)), ClaimOutcome::Yielded);
    }
}
