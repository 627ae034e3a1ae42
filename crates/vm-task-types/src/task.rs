//! The task record as stored by the API worker, its list summary and its result.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Operation, OperationKind, TaskStatus, Timestamp};

/// One task: what to do, where, and everything that happened to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    pub id: Uuid,
    /// Serialized inline as `type` and `payload`.
    #[serde(flatten)]
    pub operation: Operation,
    pub status: TaskStatus,
    /// The server whose daemon runs the task: the request's `targetServer`, else the server
    /// the VM registry has for the VM, else the API's default.
    pub target_server: String,
    /// The task submitted just before this one on the same VM; the daemon runs this one only
    /// once that one is terminal, which keeps per-VM submission order through queue reordering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_task_id: Option<Uuid>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// How many claims have been made on the task (lease expiries count, releases do not).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
    /// Why the task failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the task's terminal event is POSTed (signed webhook), besides the deployment's
    /// `WEBHOOK_URLS`. Validated by the API (https; http only for allowed hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Bumped on every change; lets readers and writers tell versions apart.
    #[serde(default)]
    pub gen: u64,
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
}

/// The consumer currently allowed to work on a task, until `leaseExpiresAt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub claim_id: Uuid,
    pub consumer_id: String,
    pub claimed_at: Timestamp,
    pub lease_expires_at: Timestamp,
}

/// One event in a task's life: a status change (`from`/`to` set) or a note (retry, buffered,
/// lease renewed...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    pub at: Timestamp,
    /// Who did it: `api`, `consumer-worker`, `sweeper`, `client`, or the daemon's consumer id.
    pub actor: String,
    /// A [`TimelineEvent`]'s wire name. Kept a string on the wire so a reader built before a
    /// new event was added still reads the record; writers go through the enum.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<TaskStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<TaskStatus>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Every event a timeline can hold, with its wire name. Writers name events only through this
/// enum, so a misspelt event does not compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimelineEvent {
    /// The API accepted the task.
    Created,
    /// The queue send failed; the task failed at once.
    QueueFailed,
    /// The consumer worker wrote the task's buffer entry.
    Buffered,
    /// A daemon claimed the task (pending → processing).
    Claimed,
    /// The claiming daemon gave the task back before starting (processing → pending).
    Released,
    /// A lease ended without a report (processing → pending).
    LeaseExpired,
    /// No daemon claimed the task within `MAX_QUEUED_SECONDS` (pending → failed). Wire name
    /// `expired`, kept from before the enum.
    NeverClaimed,
    /// Every claim's lease expired (→ failed).
    AttemptsExhausted,
    /// The queue gave up delivering the task (→ failed).
    DeadLettered,
    /// The client cancelled the task (→ cancelled).
    Cancelled,
    /// A client asked to cancel a task a claim was racing for; the outcome follows.
    CancelRequested,
    /// A claim saw the client's cancel and stood down (→ cancelled).
    ClaimYielded,
    /// One failed try of the daemon's operation, reported with the outcome.
    Retry,
    /// The daemon reported success (→ completed).
    Completed,
    /// The daemon reported failure (→ failed).
    Failed,
    /// One delivery attempt of the task's terminal event to a webhook URL, or why it could not
    /// be queued. Never changes the status.
    Webhook,
}

impl TimelineEvent {
    pub const ALL: [TimelineEvent; 16] = [
        Self::Created,
        Self::QueueFailed,
        Self::Buffered,
        Self::Claimed,
        Self::Released,
        Self::LeaseExpired,
        Self::NeverClaimed,
        Self::AttemptsExhausted,
        Self::DeadLettered,
        Self::Cancelled,
        Self::CancelRequested,
        Self::ClaimYielded,
        Self::Retry,
        Self::Completed,
        Self::Failed,
        Self::Webhook,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::QueueFailed => "queue_failed",
            Self::Buffered => "buffered",
            Self::Claimed => "claimed",
            Self::Released => "released",
            Self::LeaseExpired => "lease_expired",
            Self::NeverClaimed => "expired",
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::DeadLettered => "dead_lettered",
            Self::Cancelled => "cancelled",
            Self::CancelRequested => "cancel_requested",
            Self::ClaimYielded => "claim_yielded",
            Self::Retry => "retry",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Webhook => "webhook",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl AsRef<str> for TimelineEvent {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for TimelineEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TimelineEntry {
    /// The event, or `None` for one written by a newer version.
    pub fn kind(&self) -> Option<TimelineEvent> {
        TimelineEvent::parse(&self.event)
    }
}

/// A VM's lifecycle state as last reported by Arrakis, plus `DELETED` for a destroyed VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum VmState {
    Running,
    Paused,
    Stopped,
    Deleted,
}

impl VmState {
    /// Parses Arrakis's uppercase status strings.
    pub fn from_arrakis(s: &str) -> Option<Self> {
        match s {
            "RUNNING" => Some(Self::Running),
            "PAUSED" => Some(Self::Paused),
            "STOPPED" => Some(Self::Stopped),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortForward {
    pub host_port: u16,
    pub guest_port: u16,
    pub description: String,
}

/// What a finished operation produced. Fields appear only where the operation has them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<VmState>,
    /// Guest address without Arrakis's CIDR suffix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_device_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_forwards: Option<Vec<PortForward>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// `run_command`: stdout and stderr, interleaved as Arrakis returns them. A long output
    /// keeps its head and tail (see `outputTruncated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// `run_command`: true when `output` is the head and tail of a longer output that did not
    /// fit the report (the daemon's `MAX_OUTPUT_BYTES`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_truncated: Option<bool>,
    /// `run_command`: the full output's size in bytes, when it was truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// `run_command`: Arrakis's `error`, e.g. `exit status 2`; absent on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `run_command`: the exit code when Arrakis reports one (0 on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// `download_files`: each requested path with its content, in request order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<crate::FileContent>>,
    /// Set when the operation's effect was already in place (deleting a VM that is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The part of a task kept in its KV key's metadata (≤ 1 KiB), so listing reads no values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskSummary {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: OperationKind,
    pub vm_name: String,
    pub status: TaskStatus,
    pub target_server: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// When the current claim's lease ends, while the task is processing: the sweep finds
    /// expired leases from listings alone, without reading records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<Timestamp>,
}

impl Task {
    pub fn kind(&self) -> OperationKind {
        self.operation.kind()
    }

    pub fn vm_name(&self) -> &str {
        self.operation.vm_name()
    }

    pub fn summary(&self) -> TaskSummary {
        TaskSummary {
            id: self.id,
            kind: self.kind(),
            vm_name: self.vm_name().to_owned(),
            status: self.status,
            target_server: self.target_server.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            lease_expires_at: self.claim.as_ref().map(|c| c.lease_expires_at),
        }
    }

    /// Whether `claim_id` is the task's current claim.
    pub fn is_claimed_by(&self, claim_id: Uuid) -> bool {
        self.claim.as_ref().is_some_and(|c| c.claim_id == claim_id)
    }

    /// Records `event` on the timeline, with a status change when `to` is set, and bumps `gen`.
    /// Callers check legality first (see [`TaskStatus::check_transition`]).
    pub fn record(
        &mut self,
        at: Timestamp,
        actor: &str,
        event: TimelineEvent,
        to: Option<TaskStatus>,
        message: impl Into<String>,
    ) {
        let from = to.map(|_| self.status);
        if let Some(to) = to {
            self.status = to;
        }
        self.timeline.push(TimelineEntry {
            at,
            actor: actor.to_owned(),
            event: event.as_str().to_owned(),
            from,
            to,
            message: message.into(),
        });
        self.updated_at = at;
        self.gen += 1;
    }

    /// When the task entered `status` most recently, from the timeline.
    pub fn entered(&self, status: TaskStatus) -> Option<Timestamp> {
        self.timeline.iter().rev().find(|e| e.to == Some(status)).map(|e| e.at)
    }

    /// When an event (`buffered`, say) was last recorded. Takes a [`TimelineEvent`] or its
    /// wire name.
    pub fn event_at(&self, event: impl AsRef<str>) -> Option<Timestamp> {
        let event = event.as_ref();
        self.timeline.iter().rev().find(|e| e.event == event).map(|e| e.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VmRef;

    pub(crate) fn sample() -> Task {
        Task {
            id: Uuid::nil(),
            operation: Operation::StopVm(VmRef { vm_name: "vm-1".into(), target_server: None }),
            status: TaskStatus::Pending,
            target_server: "production".into(),
            previous_task_id: None,
            created_at: Timestamp(1_000),
            updated_at: Timestamp(1_000),
            attempts: 0,
            claim: None,
            result: None,
            error: None,
            callback_url: None,
            gen: 0,
            timeline: vec![],
        }
    }

    #[test]
    fn stored_form_is_seed_shaped_and_round_trips() {
        let task = sample();
        let v = serde_json::to_value(&task).unwrap();
        assert_eq!(v["type"], "stop_vm");
        assert_eq!(v["payload"]["vmName"], "vm-1");
        assert_eq!(v["status"], "pending");
        assert_eq!(v["targetServer"], "production");
        assert_eq!(v["createdAt"], "1970-01-01T00:00:01.000Z");
        assert_eq!(serde_json::from_value::<Task>(v).unwrap(), task);
    }

    #[test]
    fn record_tracks_status_changes_and_generations() {
        let mut task = sample();
        task.record(Timestamp(2_000), "consumer-worker", TimelineEvent::Buffered, None, "");
        task.record(Timestamp(3_000), "host-a", TimelineEvent::Claimed, Some(TaskStatus::Processing), "");
        assert_eq!(task.status, TaskStatus::Processing);
        assert_eq!(task.gen, 2);
        assert_eq!(task.updated_at, Timestamp(3_000));
        assert_eq!(task.timeline[1].from, Some(TaskStatus::Pending));
        assert_eq!(task.entered(TaskStatus::Processing), Some(Timestamp(3_000)));
        assert_eq!(task.event_at(TimelineEvent::Buffered), Some(Timestamp(2_000)));
        assert_eq!(task.timeline[0].event, "buffered");
    }

    #[test]
    fn timeline_events_keep_their_wire_names_and_parse_back() {
        assert_eq!(TimelineEvent::NeverClaimed.as_str(), "expired");
        assert_eq!(TimelineEvent::LeaseExpired.as_str(), "lease_expired");
        let mut names: Vec<&str> = TimelineEvent::ALL.iter().map(|e| e.as_str()).collect();
        for event in TimelineEvent::ALL {
            assert_eq!(TimelineEvent::parse(event.as_str()), Some(event));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TimelineEvent::ALL.len(), "wire names are distinct");
    }

    #[test]
    fn summary_fits_in_kv_metadata() {
        let mut task = sample();
        let long = "x".repeat(crate::Limits::NAME_MAX);
        task.operation = Operation::StopVm(VmRef { vm_name: long.clone(), target_server: None });
        task.target_server = long;
        let bytes = serde_json::to_vec(&task.summary()).unwrap();
        assert!(bytes.len() < 1024, "{} bytes", bytes.len());
    }
}
