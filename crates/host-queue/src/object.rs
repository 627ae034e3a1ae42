//! The object's own HTTP interface, reached only through its stub by the two workers (never by
//! clients): one synchronous step of the [`HostQueue`] per request, so each is atomic.
//! Waiting (long polls, `?wait`) is the caller's loop around these steps.
//!
//! | request | body | reply |
//! |---|---|---|
//! | `POST /enqueue` | the task record | [`EnqueueOutcome`] |
//! | `POST /enqueue-batch` | [`EnqueueBatch`]: a queue batch's tasks for this server, in order | [`EnqueueBatchReply`]: one outcome per task, in order |
//! | `GET /ready` | — | [`ReadyList`] |
//! | `GET /tasks/{id}` | — | `TaskDetailResponse` (404 when not held) |
//! | `POST /tasks/{id}/claim` | `ClaimRequest` | [`crate::ClaimGranted`] |
//! | `POST /tasks/{id}/heartbeat`, `/release` | [`FencedLease`] | `LeaseResponse` |
//! | `PUT /tasks/{id}/status` | [`FencedReport`] | `UpdateStatusResponse` |
//! | `POST /tasks/{id}/cancel` | [`CancelRequest`] | `UpdateStatusResponse`; 202 `cancel_requested` for a running long command |
//! | `POST /tasks/{id}/dead-letter` | the task record | `UpdateStatusResponse`: failed, or the task as held |
//!
//! A connected daemon may send its claims, heartbeats, releases and reports as [`HostCall`]s
//! over its socket instead ([`handle_call`]): the same steps, answered with the same statuses
//! and bodies.

use serde::{de::DeserializeOwned, Serialize};
use uuid::Uuid;
use vm_task_types::{
    validate::check_segment,
    wire::{
        CancelRequestedResponse, ClaimRequest, HostCall, HostOp, HostPush, LeaseResponse, TaskDetailResponse,
        UpdateStatusResponse,
    },
    Task, TaskStatus, Timestamp,
};

use crate::{
    protocol::{
        CancelRequest, EnqueueBatch, EnqueueBatchReply, EnqueueOutcome, FencedLease, FencedReport, ReadyList, Refusal,
    },
    queue::HostQueue,
    store::HostStore,
};

/// A reply: status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(status: u16, body: &impl Serialize) -> Self {
        Self { status, body: serde_json::to_string(body).unwrap_or_else(|_| "{}".into()) }
    }

    fn refused(refusal: Refusal) -> Self {
        Self::json(refusal.status, &refusal.body)
    }
}

/// Serves one request on `queue` at `now`. `instance` tells this load of the object apart from
/// earlier ones in the ready list's version.
pub fn handle<S: HostStore>(
    queue: &mut HostQueue<S>,
    instance: u64,
    method: &str,
    path: &str,
    body: &[u8],
    now: Timestamp,
) -> Reply {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let outcome = match (method, segments.as_slice()) {
        ("POST", ["enqueue"]) => parse::<Task>(body).map(|task| {
            let outcome: EnqueueOutcome = queue.enqueue(task, now);
            Reply::json(200, &outcome)
        }),
        ("POST", ["enqueue-batch"]) => parse::<EnqueueBatch>(body).map(|batch| {
            let outcomes = queue.enqueue_all(batch.tasks, now);
            Reply::json(200, &EnqueueBatchReply { outcomes })
        }),
        ("GET", ["ready"]) => Ok(Reply::json(200, &ready_list(queue, instance))),
        ("GET", ["tasks", id]) => task_id(id).and_then(|id| {
            let task = queue.task(id).cloned().ok_or_else(|| Refusal::not_found(id))?;
            Ok(Reply::json(200, &TaskDetailResponse { success: true, task }))
        }),
        ("POST", ["tasks", id, "claim"]) => task_id(id).and_then(|id| {
            let request: ClaimRequest = parse(body)?;
            check_segment("consumerId", &request.consumer_id, 128).map_err(Refusal::invalid_field)?;
            Ok(Reply::json(200, &queue.claim(id, &request, now)?))
        }),
        ("POST", ["tasks", id, op @ ("heartbeat" | "release")]) => task_id(id).and_then(|id| {
            let request: FencedLease = parse(body)?;
            let task = if *op == "heartbeat" {
                queue.heartbeat(id, &request, now)?
            } else {
                queue.release(id, &request, now)?
            };
            let lease_expires_at = task.claim.as_ref().map(|c| c.lease_expires_at);
            Ok(Reply::json(
                200,
                &LeaseResponse {
                    success: true,
                    task_id: id,
                    status: task.status,
                    lease_expires_at,
                    cancel_requested: *op == "heartbeat" && queue.cancel_requested(id),
                },
            ))
        }),
        ("PUT", ["tasks", id, "status"]) => task_id(id).and_then(|id| {
            let report: FencedReport = parse(body)?;
            let (task, changed) = queue.report(id, &report, now)?;
            let message = if changed { "status updated" } else { "status unchanged" };
            Ok(Reply::json(200, &status_reply(&task, message)))
        }),
        ("POST", ["tasks", id, "dead-letter"]) => task_id(id).and_then(|id| {
            let task: Task = parse(body)?;
            if task.id != id {
                return Err(Refusal::bad_request(format!("the record is task {}, not {id}", task.id)));
            }
            let task = queue.dead_letter(task, now);
            Ok(Reply::json(200, &status_reply(&task, "dead letter recorded")))
        }),
        ("POST", ["tasks", id, "cancel"]) => task_id(id).and_then(|id| {
            let request: CancelRequest = parse(body)?;
            let task = queue.cancel(id, &request, now)?;
            if task.status == TaskStatus::Cancelled {
                return Ok(Reply::json(200, &status_reply(&task, "task cancelled")));
            }
            // A running long command: the same 202 as the KV mode's.
            Ok(Reply::json(202, &CancelRequestedResponse::running(id)))
        }),
        _ => Err(Refusal::not_found_path(method, path)),
    };
    outcome.unwrap_or_else(Reply::refused)
}

/// A daemon's [`HostCall`] from its socket: the step of the HTTP route it stands for. The body
/// is encoded again and served by [`handle`], so both ways in share every check and refusal.
pub fn handle_call<S: HostStore>(queue: &mut HostQueue<S>, instance: u64, call: &HostCall, now: Timestamp) -> Reply {
    let id = call.task_id;
    let (method, path, body) = match &call.op {
        HostOp::Claim(claim) => ("POST", format!("/tasks/{id}/claim"), serde_json::to_vec(claim)),
        HostOp::Heartbeat(lease) => ("POST", format!("/tasks/{id}/heartbeat"), serde_json::to_vec(lease)),
        HostOp::Release(lease) => ("POST", format!("/tasks/{id}/release"), serde_json::to_vec(lease)),
        HostOp::Report(update) => ("PUT", format!("/tasks/{id}/status"), serde_json::to_vec(update)),
    };
    handle(queue, instance, method, &path, &body.unwrap_or_default(), now)
}

/// The [`HostPush::Answer`] that carries `reply` back to call number `call`.
pub fn answer(call: u64, reply: Reply) -> String {
    let body = serde_json::from_str(&reply.body).unwrap_or(serde_json::Value::String(reply.body));
    serde_json::to_string(&HostPush::Answer { call, status: reply.status, body }).unwrap_or_default()
}

/// The claimable tasks and the version a long poll compares.
pub fn ready_list<S: HostStore>(queue: &HostQueue<S>, instance: u64) -> ReadyList {
    let tasks = queue.ready();
    ReadyList { success: true, version: version(queue, instance), count: tasks.len(), tasks }
}

/// The ready list's version: changes with this load of the object and with new work.
pub fn version<S: HostStore>(queue: &HostQueue<S>, instance: u64) -> String {
    format!("{instance:x}-{}", queue.version())
}

fn status_reply(task: &Task, message: &str) -> UpdateStatusResponse {
    UpdateStatusResponse { success: true, task_id: task.id, status: task.status, message: message.into() }
}

fn task_id(raw: &str) -> Result<Uuid, Refusal> {
    Uuid::parse_str(raw).map_err(|e| Refusal::bad_request(format!("task id {raw:?} is not a UUID: {e}")))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(Refusal::bad_body)
}
