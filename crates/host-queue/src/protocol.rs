//! Bodies the host queue object takes and gives: its HTTP replies (supersets of the KV mode's
//! wire types, so a daemon reads them with the same structs), the fencing fields, and the
//! messages pushed to a connected daemon over its WebSocket.

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_task_types::{
    wire::{BufferedTask, ErrorBody, LeaseRequest, UpdateStatusRequest},
    Task, TaskStatus, Timestamp,
};

/// An operation the queue turned down: the HTTP status and the same error body the workers
/// send everywhere else.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub body: ErrorBody,
}

impl Refusal {
    fn new(status: u16, code: &str, message: String) -> Self {
        Self {
            status,
            body: ErrorBody {
                success: false,
                error: message,
                code: code.into(),
                field: None,
                current_status: None,
                lease_expires_at: None,
            },
        }
    }

    pub(crate) fn not_found(id: Uuid) -> Self {
        Self::new(404, "not_found", format!("task {id} is not held by this server's queue"))
    }

    pub(crate) fn conflict(message: String, current: TaskStatus) -> Self {
        let mut refusal = Self::new(409, "conflict", message);
        refusal.body.current_status = Some(current);
        refusal
    }

    pub(crate) fn busy(message: String, current: TaskStatus, until: Option<Timestamp>) -> Self {
        let mut refusal = Self::conflict(message, current);
        refusal.body.lease_expires_at = until;
        refusal
    }

    pub(crate) fn not_found_path(method: &str, path: &str) -> Self {
        Self::new(404, "not_found", format!("the host queue has no route {method} {path}"))
    }

    /// A body that does not parse: the same code and wording as the KV mode's handlers.
    pub fn bad_body(error: impl std::fmt::Display) -> Self {
        Self::new(400, "invalid_body", format!("invalid request body: {error}"))
    }

    pub fn bad_request(message: String) -> Self {
        Self::new(400, "invalid_request", message)
    }

    pub fn invalid_field(error: vm_task_types::FieldError) -> Self {
        let mut refusal = Self::new(400, "invalid_field", error.to_string());
        refusal.body.field = Some(error.field);
        refusal
    }

    /// The machine-readable code (`conflict`, `not_found`...).
    pub fn code(&self) -> &str {
        &self.body.code
    }
}

/// A granted (or repeated) claim: the KV mode's `ClaimResponse` fields plus the fencing number
/// every later heartbeat, release and report of this claim should carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimGranted {
    pub success: bool,
    pub task: Task,
    pub claim_id: Uuid,
    pub lease_expires_at: Timestamp,
    /// Grows with every claim the server's queue grants; an operation carrying an older one is
    /// refused, even if it somehow carries the current claim id.
    pub fence: u64,
}

/// A heartbeat or release, with the claim's fencing number when the daemon has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FencedLease {
    #[serde(flatten)]
    pub lease: LeaseRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
}

/// A status report, with the claim's fencing number when the daemon has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FencedReport {
    #[serde(flatten)]
    pub update: UpdateStatusRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
}

/// A client's cancel, forwarded by the API worker with the record it read, so a task whose
/// queue message has not reached the object yet can be cancelled (and stay cancelled) too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    pub message: String,
}

/// What became of a task handed to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EnqueueOutcome {
    /// New: stored, and pushed to the connected daemon.
    Queued,
    /// Already held (a redelivered queue message): nothing changed.
    Duplicate,
    /// The record is terminal already (cancelled while queued, say): not queued.
    Finished,
}

/// `POST /enqueue-batch`: the tasks of one queue batch bound for this server, in the batch's
/// order, handed over in one request (one per server and batch instead of one per message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnqueueBatch {
    pub tasks: Vec<Task>,
}

/// The reply to [`EnqueueBatch`]: each task's outcome, in the request's order, so the
/// consumer acks or retries each message on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnqueueBatchReply {
    pub outcomes: Vec<EnqueueOutcome>,
}

/// The tasks a daemon may claim now, oldest first: one per VM, the VM's oldest live task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyList {
    pub success: bool,
    /// Changes whenever new work may have become claimable; a long poll waits for it to change.
    pub version: String,
    pub tasks: Vec<BufferedTask>,
    pub count: usize,
}

/// A message pushed to a daemon's WebSocket (on the wire in `vm-task-types`).
pub use vm_task_types::wire::HostPush as Push;
