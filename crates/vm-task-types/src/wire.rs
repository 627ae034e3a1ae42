//! Request and response bodies of both workers' HTTP APIs (camelCase JSON).
//!
//! The API worker's responses keep the original system's fields (`success`, `taskId`,
//! `status`, `message`) and add to them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{OperationKind, PortForward, Task, TaskResult, TaskStatus, TaskSummary, Timestamp, VmState};

/// Every error body: `success: false`, a message naming the problem, a stable code, and where
/// it applies the field at fault or the task's current status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub success: bool,
    pub error: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_status: Option<TaskStatus>,
    /// For a claim refused because another lease holds the task: when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<Timestamp>,
}

// ---------------------------------------------------------------------------------------------
// API worker

/// `POST /vm/tasks` → 202 (201-style body; 200 when an `Idempotency-Key` replays a task).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTaskResponse {
    pub success: bool,
    pub task_id: Uuid,
    pub status: TaskStatus,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: OperationKind,
    pub vm_name: String,
    pub target_server: String,
    pub created_at: Timestamp,
    /// Things the client should know that did not stop the task being queued, e.g. that no
    /// live host serves `targetServer`. Absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What a daemon says about itself on a poll (`/tasks/ready` query parameters `consumerId`,
/// `hostName`, `version`, `concurrency`, `inFlight`, `arrakis`), and what the host registry
/// keeps per server name and consumer, with when it was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    /// The server name this record is for.
    pub server: String,
    pub consumer_id: String,
    pub host_name: String,
    pub version: String,
    /// `MAX_CONCURRENCY`: tasks the daemon runs at once.
    pub concurrency: u32,
    /// Every server name the daemon serves (cut short if it would not fit KV metadata).
    pub servers: Vec<String>,
    /// Tasks running when it reported.
    pub in_flight: u32,
    /// Whether its Arrakis answered a health check when it reported; absent if not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrakis_reachable: Option<bool>,
    pub last_seen: Timestamp,
}

/// One row of `GET /hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostEntry {
    #[serde(flatten)]
    pub record: HostRecord,
    /// Seen within the deployment's `HOST_LIVE_SECONDS`.
    pub live: bool,
    pub last_seen_secs_ago: u64,
}

/// `GET /hosts?server=`: the host registry, by server name then consumer id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListHostsResponse {
    pub success: bool,
    pub hosts: Vec<HostEntry>,
    pub count: usize,
    /// A host is live when seen within this many seconds (`HOST_LIVE_SECONDS`).
    pub live_within_secs: u64,
}

/// `GET /vm/tasks/:id/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatusResponse {
    pub success: bool,
    pub task_id: Uuid,
    #[serde(rename = "type")]
    pub kind: OperationKind,
    pub status: TaskStatus,
    pub vm_name: String,
    pub target_server: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub attempts: u32,
    /// The VM's task submitted before this one, if any: lets a daemon whose predecessor was
    /// cancelled check the task before that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_task_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TaskStatusResponse {
    pub fn of(task: &Task) -> Self {
        Self {
            success: true,
            task_id: task.id,
            kind: task.kind(),
            status: task.status,
            vm_name: task.vm_name().to_owned(),
            target_server: task.target_server.clone(),
            created_at: task.created_at,
            updated_at: task.updated_at,
            attempts: task.attempts,
            previous_task_id: task.previous_task_id,
            result: task.result.clone(),
            error: task.error.clone(),
        }
    }
}

/// `GET /vm/tasks/:id`: the whole record with its timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskDetailResponse {
    pub success: bool,
    pub task: Task,
}

/// `GET /vm/tasks?limit=&cursor=`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListTasksResponse {
    pub success: bool,
    pub tasks: Vec<TaskSummary>,
    pub count: usize,
    /// Pass back as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    pub list_complete: bool,
    /// True when the page stopped because this request's scan budget ran out before `limit`
    /// tasks matched the filters: fewer tasks (maybe none), and more may match after `cursor`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// Listing keys this request examined (filters are applied to listing metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanned: Option<usize>,
}

/// One VM of `GET /vms`, from the registry entry's listing metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSummary {
    pub vm_name: String,
    pub server: String,
    /// Last state a finished task established; absent until one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub last_task_id: Uuid,
    #[serde(rename = "lastTaskType")]
    pub last_task_kind: OperationKind,
    pub updated_at: Timestamp,
    /// Lifecycle tasks submitted after `state` was established and not taken into account:
    /// when `settled`, those still unfinished.
    #[serde(default)]
    pub unsettled: usize,
    /// False when this listing could not read the VM's unsettled lifecycle tasks within its
    /// read budget: `state` may be older than the VM's last finished task, and
    /// `GET /vm/{vmName}/status` has the current one.
    #[serde(default = "settled_default")]
    pub settled: bool,
}

fn settled_default() -> bool {
    true
}

/// `GET /vms?server=&state=&limit=&cursor=`: VMs by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListVmsResponse {
    pub success: bool,
    pub vms: Vec<VmSummary>,
    pub count: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    pub list_complete: bool,
    /// As in [`ListTasksResponse::partial`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanned: Option<usize>,
}

/// `PUT /vm/tasks/:id/status`, sent by the daemon holding the task's claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStatusRequest {
    pub status: TaskStatus,
    pub claim_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Transient failures the daemon retried on the way, recorded on the task's timeline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retries: Vec<RetryNote>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryNote {
    pub at: Timestamp,
    pub attempt: u32,
    pub error: String,
}

/// `PUT /vm/tasks/:id/status` and `DELETE /vm/tasks/:id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateStatusResponse {
    pub success: bool,
    pub task_id: Uuid,
    pub status: TaskStatus,
    pub message: String,
}

/// `DELETE /vm/tasks/:id` answered 202: the cancel is recorded but not final yet; the task's
/// record says how it ends. One type for both dispatch modes, so the answer and its wording
/// do not drift apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRequestedResponse {
    pub success: bool,
    pub task_id: Uuid,
    /// Always `cancel_requested`, which is no task status.
    pub status: String,
    /// Across locations: when the cancel becomes final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_final_at: Option<Timestamp>,
    pub message: String,
}

impl CancelRequestedResponse {
    fn new(task_id: Uuid, cancel_final_at: Option<Timestamp>, message: String) -> Self {
        Self { success: true, task_id, status: "cancel_requested".into(), cancel_final_at, message }
    }

    /// A daemon's claim was in flight and did not decide in time.
    pub fn claim_in_flight(task_id: Uuid) -> Self {
        Self::new(
            task_id,
            None,
            "a daemon is claiming the task; it will not run if the claim sees this cancel, and every later \
             claim will; read the task for the outcome"
                .into(),
        )
    }

    /// A long command is running: the daemon stops it at its next heartbeat.
    pub fn running(task_id: Uuid) -> Self {
        Self::new(
            task_id,
            None,
            "the command is running; the daemon stops it in the guest at its next heartbeat and the task \
             ends cancelled with the output so far; read the task for the outcome"
                .into(),
        )
    }

    /// A pending task where a claim at another location may not have seen the cancel yet; KV
    /// shows a write everywhere within `propagation_secs`.
    pub fn until(task_id: Uuid, final_at: Timestamp, propagation_secs: u64) -> Self {
        Self::new(
            task_id,
            Some(final_at),
            format!(
                "no daemon will run the task from now on; one at another location may have claimed it before \
                 this cancel reached it, which KV shows everywhere within {} s. At {final_at} the task is \
                 cancelled unless such a claim took it (then its own result stands); read the task for the \
                 outcome",
                2 * propagation_secs
            ),
        )
    }
}

/// `GET /vm/:vmName/status`, answered from the VM registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatusResponse {
    pub success: bool,
    pub vm_name: String,
    pub server: String,
    /// Last state a finished task established; absent until one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_forwards: Option<Vec<PortForward>>,
    /// The task that established `state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_task_id: Option<Uuid>,
    pub last_task_id: Uuid,
    pub last_task_status: TaskStatus,
    #[serde(rename = "lastTaskType")]
    pub last_task_kind: OperationKind,
    pub updated_at: Timestamp,
}

// ---------------------------------------------------------------------------------------------
// Consumer worker

/// One buffered task as listed from KV metadata, without reading its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BufferedTask {
    pub task_id: Uuid,
    #[serde(rename = "type")]
    pub kind: OperationKind,
    pub vm_name: String,
    pub target_server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_task_id: Option<Uuid>,
    pub created_at: Timestamp,
    pub buffered_at: Timestamp,
}

/// `GET /tasks/ready?server=a,b&wait=S&since=BELL`: oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyTasksResponse {
    pub success: bool,
    pub tasks: Vec<BufferedTask>,
    pub count: usize,
    /// The doorbell value at the time of the listing; pass it back as `since` to wait for work
    /// that arrives after it.
    pub bell: String,
    /// False when the listing stopped at its page limit and more tasks are buffered.
    pub list_complete: bool,
}

/// A message the `durable` dispatch mode's host queue pushes to a daemon's WebSocket
/// (`GET /hosts/{server}/connect` on the consumer worker). A push is a hint: everything in it
/// can also be listed with `GET /tasks/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum HostPush {
    /// Tasks that became claimable; on connect, everything claimable now.
    Ready { tasks: Vec<BufferedTask> },
    /// The answer to the daemon's [`HostCall`] numbered `call`: the status and body the same
    /// operation gets over HTTP.
    Answer { call: u64, status: u16, body: serde_json::Value },
}

/// A claim, heartbeat, release or status report a daemon sends over its push socket instead
/// of HTTP (the `durable` mode): the object behind the socket is the task's server's, so the
/// operation skips the workers' HTTP path. Answered by [`HostPush::Answer`] with the same
/// status and body as the HTTP route; a daemon whose socket drops (or says nothing in time)
/// sends the same operation over HTTP, which its idempotency makes safe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostCall {
    /// Chosen by the daemon, unique per socket; the answer carries it back.
    pub call: u64,
    pub task_id: Uuid,
    #[serde(flatten)]
    pub op: HostOp,
}

/// A [`HostCall`]'s operation and its body: the HTTP route's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", content = "body", rename_all = "camelCase")]
pub enum HostOp {
    /// `POST /tasks/{id}/claim`.
    Claim(ClaimRequest),
    /// `POST /tasks/{id}/heartbeat`.
    Heartbeat(LeaseRequest),
    /// `POST /tasks/{id}/release`.
    Release(LeaseRequest),
    /// `PUT /vm/tasks/{id}/status`.
    Report(Box<UpdateStatusRequest>),
}

impl HostOp {
    /// The operation's name, as on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            HostOp::Claim(_) => "claim",
            HostOp::Heartbeat(_) => "heartbeat",
            HostOp::Release(_) => "release",
            HostOp::Report(_) => "report",
        }
    }
}

/// `POST /tasks/:id/claim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRequest {
    pub consumer_id: String,
    /// The claim id the consumer proposes. Retrying a claim whose response was lost with the
    /// same id returns that claim again instead of a conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_id: Option<Uuid>,
    /// Requested lease; bounded by the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u64>,
    /// When the task was buffered, as its entry in `GET /tasks/ready` said. Saves the worker
    /// reading the entry back for the timeline; it is clamped to the task's creation and now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffered_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimResponse {
    pub success: bool,
    pub task: Task,
    pub claim_id: Uuid,
    pub lease_expires_at: Timestamp,
}

/// `POST /tasks/:id/heartbeat` renews a lease; `POST /tasks/:id/release` gives the task back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRequest {
    pub claim_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseResponse {
    pub success: bool,
    pub task_id: Uuid,
    pub status: TaskStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<Timestamp>,
    /// Heartbeats of a long command: the client asked to cancel it, so the daemon stops it
    /// in the guest and reports it `cancelled`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
}

/// `GET /tasks/all`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllBufferedResponse {
    pub success: bool,
    pub tasks: Vec<BufferedTask>,
    pub count: usize,
    pub list_complete: bool,
}

/// KV and queue operations one worker isolate has made since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpCounts {
    pub kv_reads: u64,
    pub kv_writes: u64,
    pub kv_deletes: u64,
    pub kv_lists: u64,
    pub queue_sends: u64,
    pub queue_acks: u64,
    pub queue_retries: u64,
    /// Durable dispatch mode (consumer worker): requests the host queue objects served (stub
    /// calls, alarms, WebSocket connects), each billed as a Durable Object request.
    #[serde(default)]
    pub do_requests: u64,
    /// WebSocket messages the objects received and woke for (billed 20 to a request); pings
    /// answered by the runtime's auto-response never reach the object and are not counted.
    #[serde(default)]
    pub do_ws_messages: u64,
    /// Wall-clock milliseconds some object had an event in progress: the duration Cloudflare
    /// bills (an object idle with only hibernatable WebSockets is not billed).
    #[serde(default)]
    pub do_active_ms: u64,
    /// SQLite rows the objects read and wrote (the storage billing units).
    #[serde(default)]
    pub do_rows_read: u64,
    #[serde(default)]
    pub do_rows_written: u64,
}

impl OpCounts {
    /// Writes, deletes and lists: the operations KV bills at the write price.
    pub fn kv_write_class(&self) -> u64 {
        self.kv_writes + self.kv_deletes + self.kv_lists
    }
}

/// `GET /stats` on either worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsResponse {
    pub success: bool,
    pub worker: String,
    /// When this isolate started counting; counters are per isolate.
    pub since: Timestamp,
    pub ops: OpCounts,
    /// Consumer worker only: buffered tasks per server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffered_by_server: Option<BTreeMap<String, usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffered_total: Option<usize>,
}

/// `GET /health` on either worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    pub success: bool,
    pub status: String,
    pub worker: String,
    pub timestamp: Timestamp,
}
