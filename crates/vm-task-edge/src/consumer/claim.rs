//! What a claim does with a task, decided from the record alone: no I/O, tested alone.

use uuid::Uuid;
use vm_task_types::{Task, TaskStatus, Timestamp};

/// The outcome of a claim on a task as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClaimDecision {
    /// The task is finished or cancelled: refuse with 409 and drop its buffer entry.
    Refuse(TaskStatus),
    /// The claim already holds the task (its first answer was lost): answer again, write nothing.
    Repeat,
    /// Another claim holds the task until `until`.
    Busy { until: Timestamp },
    /// Every attempt is used: the task fails. `lease_expired`: a previous lease ended first.
    GiveUp { lease_expired: bool },
    /// A new claim. `lease_expired`: the previous holder's lease ended without a report.
    Grant { lease_expired: bool },
}

/// Decides a claim proposing `proposed` (the daemon's claim id, if it sent one) at `now`.
pub(super) fn decide(task: &Task, proposed: Option<Uuid>, now: Timestamp, max_attempts: u32) -> ClaimDecision {
    let mut lease_expired = false;
    match task.status {
        status if status.is_terminal() => return ClaimDecision::Refuse(status),
        TaskStatus::Processing => {
            if let (Some(proposed), Some(held)) = (proposed, &task.claim) {
                if held.claim_id == proposed {
                    return ClaimDecision::Repeat;
                }
            }
            let until = task.claim.as_ref().map(|c| c.lease_expires_at).unwrap_or(now);
            if now < until {
                return ClaimDecision::Busy { until };
            }
            lease_expired = true;
        }
        _ => {}
    }
    if task.attempts >= max_attempts {
        ClaimDecision::GiveUp { lease_expired }
    } else {
        ClaimDecision::Grant { lease_expired }
    }
}

#[cfg(test)]
mod tests {
    use vm_task_types::{Claim, Operation, VmRef};

    use super::*;

    const NOW: Timestamp = Timestamp(10_000);

    fn task(status: TaskStatus, attempts: u32, lease_until: Option<u64>) -> Task {
        Task {
            id: Uuid::nil(),
            operation: Operation::StopVm(VmRef { vm_name: "vm-1".into(), target_server: None }),
            status,
            target_server: "production".into(),
            previous_task_id: None,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            attempts,
            claim: lease_until.map(|ms| Claim {
                claim_id: Uuid::from_u128(1),
                consumer_id: "host-a".into(),
                claimed_at: Timestamp(0),
                lease_expires_at: Timestamp(ms),
            }),
            result: None,
            error: None,
            callback_url: None,
            gen: 0,
            timeline: Vec::new(),
        }
    }

    #[test]
    fn finished_tasks_are_refused_whatever_their_claim() {
        for status in [TaskStatus::Completed, TaskStatus::Failed, TaskStatus::Cancelled] {
            assert_eq!(decide(&task(status, 1, Some(20_000)), None, NOW, 3), ClaimDecision::Refuse(status));
        }
    }

    #[test]
    fn a_pending_task_is_granted_until_its_attempts_are_used() {
        assert_eq!(
            decide(&task(TaskStatus::Pending, 2, None), None, NOW, 3),
            ClaimDecision::Grant { lease_expired: false }
        );
        assert_eq!(
            decide(&task(TaskStatus::Pending, 3, None), None, NOW, 3),
            ClaimDecision::GiveUp { lease_expired: false }
        );
    }

    #[test]
    fn a_live_lease_is_busy_unless_the_same_claim_asks_again() {
        let held = task(TaskStatus::Processing, 1, Some(20_000));
        assert_eq!(decide(&held, Some(Uuid::from_u128(2)), NOW, 3), ClaimDecision::Busy { until: Timestamp(20_000) });
        assert_eq!(decide(&held, None, NOW, 3), ClaimDecision::Busy { until: Timestamp(20_000) });
        assert_eq!(decide(&held, Some(Uuid::from_u128(1)), NOW, 3), ClaimDecision::Repeat);
    }

    #[test]
    fn an_ended_lease_is_taken_over_or_ends_the_task() {
        let ended = task(TaskStatus::Processing, 1, Some(NOW.0));
        assert_eq!(decide(&ended, None, NOW, 3), ClaimDecision::Grant { lease_expired: true });
        let last = task(TaskStatus::Processing, 3, Some(5_000));
        assert_eq!(decide(&last, None, NOW, 3), ClaimDecision::GiveUp { lease_expired: true });
    }
}
