//! The `durable` dispatch mode's side of both workers: which requests go to a server's queue
//! object, and what the worker answers from the object's reply. A worker in this mode asks
//! [`ConsumerFront::handle`] or [`ApiFront::handle`] first; `None` means the request is the
//! same in both modes and goes to the KV mode's service (health, stats, POST, lists, reads
//! without `?wait`, anything about a task already finished).
//!
//! Consumer worker: the long poll `GET /tasks/ready` waits on the objects of the daemon's
//! servers instead of doorbells (and writes the host report it may carry, like the KV mode); claim, heartbeat and release go to the task's object (the
//! server from `?server=`, else from the task record). API worker: `DELETE` and the daemon's
//! status report go to the task's object (the report straight there when it names the
//! server); `GET` of a live task reads it from the object, which is never stale, and `?wait=`
//! waits there.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering::Relaxed},
};

use serde_json::Value;
use vm_task_edge::{
    auth::Tokens,
    consumer::{ConsumerConfig, Delivery},
    http::Request,
    http::Response,
    record_host_report,
    store::TaskStore,
    KvStore, QueueMessage, StoreError, TaskQueue,
};
use vm_task_types::{
    validate::{check_server_name, parse_task_id},
    wire::{BufferedTask, ErrorBody, ReadyTasksResponse, TaskDetailResponse, TaskStatusResponse},
    FieldError, Limits, Task, TaskStatus, TaskSummary, Timestamp,
};

use crate::{object::Reply, protocol::CancelRequest, EnqueueBatch, EnqueueBatchReply, EnqueueOutcome, ReadyList};

/// How long a queue message's own copy of the task record ([`QueueMessage::task`]) is handed
/// over as it is: half the object's `retain_secs` (600 s), so a cancel made before the
/// hand-off is still held by the object when the message arrives (test
/// `a_late_message_hands_over_the_record_in_kv_not_its_own_copy`).
pub const RECORD_IN_MESSAGE_MAX_AGE_SECS: u64 = 300;

/// The response header that tells a daemon which dispatch mode the worker runs.
pub const MODE_HEADER: &str = "x-dispatch-mode";

/// Requests to a server's queue object (a Durable Object stub in the workers, the queue
/// itself in tests).
#[allow(async_fn_in_trait)] // single-threaded wasm: no Send bound wanted.
pub trait HostQueues {
    /// `path` may carry a query. `Err`: the object could not be reached.
    async fn call(&self, server: &str, method: &str, path: &str, body: Vec<u8>) -> Result<Reply, String>;
}

/// `GET /hosts/{server}/connect` on the consumer worker: a daemon's WebSocket to its server's
/// object. `Ok(Some(server))` when the request is one, already authorized; the worker then
/// passes the upgrade to the object as it is.
pub fn connect_route(request: &Request, consumer_tokens: &Tokens) -> Result<Option<String>, Response> {
    let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    let ["hosts", server, "connect"] = segments.as_slice() else { return Ok(None) };
    consumer_tokens.admit(request, "consumer", None)?;
    if request.method != "GET" {
        return Err(error(405, "method_not_allowed", format!("{} is not allowed here; use GET", request.method), None));
    }
    check_server_name("server", server).map_err(invalid)?;
    consumer_tokens.admit(request, "consumer", Some(server))?;
    if !request.get_header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        return Err(error(426, "upgrade_required", "this route takes a WebSocket upgrade".into(), None));
    }
    Ok(Some((*server).to_owned()))
}

/// What the consumer worker does with a queue message in this mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    /// The object has the task (or it was finished already): ack.
    Done,
    /// Deliver again later: the object was unreachable, or KV failed.
    Retry(String),
    /// The task's record has not reached this location yet (KV's propagation and cached
    /// absences): deliver again once it must have, [`Handoff::not_visible_delay_secs`] later.
    NotVisible(String),
}

impl Handoff {
    /// The redelivery delay for [`Handoff::NotVisible`]: half of KV's propagation window (at
    /// least `retry_delay_secs`), so the queue's retries (3 in `wrangler-consumer.toml`) span
    /// more than the window and the last delivery reads the record wherever it lands. With the
    /// flat 5 s delay the production model dead-lettered tasks whose record was cached absent at
    /// the consumer's location for 60 s (the dead letter handler then failed a cancelled task).
    pub fn not_visible_delay_secs(kv_propagation_secs: u64, retry_delay_secs: u32) -> u32 {
        retry_delay_secs.max(kv_propagation_secs.div_ceil(2) as u32)
    }
}

/// The API worker's task queue in both modes: sends the message and, in this mode, keeps the
/// task for a direct hand-off to its server's object ([`hand_off_directly`]) once the worker
/// has answered, so a new task reaches its host without waiting for queue delivery (on the
/// local stack that wait was most of a lone task's time). The queue still carries every task:
/// a direct hand-off that fails is left to it, and the object takes the queue's copy as a
/// duplicate, so nothing about delivery rests on the direct call. Kept only once the queue has
/// the message: a task the queue refused is failed by the API, and no object may hold it.
#[derive(Debug)]
pub struct HandoffQueue<Q> {
    pub queue: Q,
    /// `None` in the KV mode.
    handoffs: Option<RefCell<Vec<Task>>>,
}

impl<Q> HandoffQueue<Q> {
    /// `direct`: this mode (hand tasks to their objects), else the KV mode's plain queue.
    pub fn new(queue: Q, direct: bool) -> Self {
        Self { queue, handoffs: direct.then(RefCell::default) }
    }

    /// The tasks queued so far, for [`hand_off_directly`].
    pub fn take_handoffs(&self) -> Vec<Task> {
        self.handoffs.as_ref().map(|h| std::mem::take(&mut *h.borrow_mut())).unwrap_or_default()
    }
}

impl<Q: TaskQueue> TaskQueue for HandoffQueue<Q> {
    async fn send(&self, message: &QueueMessage) -> Result<(), StoreError> {
        self.queue.send(message).await?;
        if let (Some(handoffs), Some(task)) = (&self.handoffs, &message.task) {
            handoffs.borrow_mut().push((**task).clone());
        }
        Ok(())
    }
}

/// The submissions a worker instance is handling now, to decide whether a new task is handed
/// to its object directly: only when no other submission was in progress as it began or as it
/// ended. A task submitted alongside others is left to the queue, whose consumer hands each
/// object a batch in one request and one storage commit, where the direct hand-off cost both
/// per task. That trades a task's wait for its host (on the local stack about 40 ms more when
/// the queue is idle, queued→buffered p50 45 ms → 1 s under the bench's load) for throughput
/// (object requests per task 1.11 → 0.13, and 1.4–1.6× → 1.5–2.2× the KV mode's). Handing off
/// directly unless 4 or more others were in progress measured slower (1.46–1.77×), as did
/// coalescing concurrent hand-offs (1.46–1.73×), BENCHMARKS.md. A lone task, the case the
/// direct hand-off is for, still reaches its host without waiting for queue delivery.
#[derive(Debug, Default)]
pub struct Submissions(AtomicU32);

/// One submission in progress; counted until dropped.
#[derive(Debug)]
pub struct Submission<'a> {
    submissions: &'a Submissions,
    alone_at_start: bool,
}

impl Submissions {
    pub const fn new() -> Self {
        Self(AtomicU32::new(0))
    }

    pub fn begin(&self) -> Submission<'_> {
        let before = self.0.fetch_add(1, Relaxed);
        Submission { submissions: self, alone_at_start: before == 0 }
    }
}

impl Submission<'_> {
    /// No other submission was in progress when this one began, nor is one now.
    pub fn alone(&self) -> bool {
        self.alone_at_start && self.submissions.0.load(Relaxed) == 1
    }
}

impl Drop for Submission<'_> {
    fn drop(&mut self) {
        self.submissions.0.fetch_sub(1, Relaxed);
    }
}

/// Hands tasks a request queued ([`HandoffQueue::take_handoffs`]) to their objects, after the
/// worker answered (off the client's path). A refusal or an unreachable object is left to the
/// queue's delivery.
pub async fn hand_off_directly<H: HostQueues>(objects: &H, tasks: Vec<Task>) {
    for task in tasks {
        let body = serde_json::to_vec(&task).unwrap_or_default();
        let _ = objects.call(&task.target_server, "POST", "/enqueue", body).await;
    }
}

/// The consumer worker's routes in this mode.
#[derive(Debug)]
pub struct ConsumerFront<'a, S, Q> {
    pub tasks: &'a TaskStore<S>,
    pub queues: &'a Q,
    pub consumer_tokens: &'a Tokens,
    pub max_wait_secs: u64,
    /// Where host reports go (`TASK_BUFFER`, as in the KV mode): a poll's report is written
    /// here by the worker, never through an object.
    pub host_registry: &'a S,
    /// The request's time (a report's `lastSeen`).
    pub now: Timestamp,
}

impl<'a, S, Q> ConsumerFront<'a, S, Q> {
    /// The front for one invocation, its settings from the consumer worker's `config`.
    pub fn new(
        tasks: &'a TaskStore<S>,
        queues: &'a Q,
        host_registry: &'a S,
        config: &'a ConsumerConfig,
        now: Timestamp,
    ) -> Self {
        Self {
            tasks,
            queues,
            consumer_tokens: &config.consumer_tokens,
            max_wait_secs: config.max_wait_secs,
            host_registry,
            now,
        }
    }
}

/// What a queue batch's hand-off decided: one delivery per message, in order, and why any
/// message is delivered again (for the worker's log).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchDeliveries {
    pub deliveries: Vec<Delivery>,
    pub warnings: Vec<String>,
}

impl<S: KvStore, Q: HostQueues> ConsumerFront<'_, S, Q> {
    /// The queue handler of this mode, for the deployed worker and the production model alike:
    /// reads the batch's messages, hands them over ([`Self::hand_off_batch`]) and turns each
    /// outcome into an ack or a delayed retry. An unreadable message, and one of
    /// `config.fault_fail_buffering_vm` (fault injection for tests, as in the KV mode), is
    /// retried: the dead letter queue marks what it can.
    pub async fn deliver_batch(&self, bodies: &[Value], config: &ConsumerConfig) -> BatchDeliveries {
        let retry = Delivery::Retry { delay_secs: config.retry_delay_secs };
        let mut deliveries = vec![retry; bodies.len()];
        let mut warnings = Vec::new();
        let mut handed = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.iter().enumerate() {
            let Ok(message) = serde_json::from_value::<QueueMessage>(body.clone()) else { continue };
            if config.fault_fail_buffering_vm.as_deref() == Some(message.vm_name.as_str()) {
                continue;
            }
            handed.push((i, message));
        }
        let messages: Vec<_> = handed.iter().map(|(_, m)| m.clone()).collect();
        let handoffs = self.hand_off_batch(&messages).await;
        for ((i, message), handoff) in handed.iter().zip(handoffs) {
            deliveries[*i] = match handoff {
                Handoff::Done => Delivery::Ack,
                Handoff::Retry(why) => {
                    warnings.push(format!("task {} not handed to its host queue: {why}", message.task_id));
                    retry
                }
                Handoff::NotVisible(why) => {
                    warnings.push(format!("task {} not handed to its host queue: {why}", message.task_id));
                    let delay_secs =
                        Handoff::not_visible_delay_secs(config.kv_propagation_secs, config.retry_delay_secs);
                    Delivery::Retry { delay_secs }
                }
            };
        }
        BatchDeliveries { deliveries, warnings }
    }

    pub async fn handle(&self, request: &Request) -> Option<Response> {
        let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
        let handled = matches!(
            (request.method.as_str(), segments.as_slice()),
            ("GET", ["tasks", "ready"]) | ("POST", ["tasks", _, "claim" | "heartbeat" | "release"])
        );
        if !handled {
            return None;
        }
        if let Err(refused) = self.consumer_tokens.admit(request, "consumer", None) {
            return Some(refused);
        }
        let response = match segments.as_slice() {
            ["tasks", "ready"] => self.ready(request).await,
            [_, id, op] => self.forward_lease(request, id, op).await,
            _ => unreachable!("matched above"),
        };
        Some(with_mode(response.unwrap_or_else(|e| e)))
    }

    /// The dead letter queue in this mode: each task goes to its object, which fails it unless
    /// it holds it already (another copy of the message reached it: Queues deliver at least
    /// once, sometimes twice) and keeps it, so a copy arriving later finds it finished. A task
    /// whose record is not readable here yet is acked: the cron's reconcile hands it over once
    /// it is. The production model found the KV mode's handler (which fails the record in KV)
    /// racing a concurrent copy's hand-off: the object ran the task and mirrored over `failed`.
    pub async fn dead_letter_batch(&self, bodies: &[Value]) -> Vec<Delivery> {
        let mut decisions = Vec::with_capacity(bodies.len());
        for body in bodies {
            let Ok(message) = serde_json::from_value::<QueueMessage>(body.clone()) else {
                decisions.push(Delivery::Ack);
                continue;
            };
            let task = match self.tasks.load(message.task_id).await {
                Ok(Some(task)) if !task.status.is_terminal() => task,
                Ok(_) => {
                    decisions.push(Delivery::Ack);
                    continue;
                }
                Err(_) => {
                    decisions.push(Delivery::Retry { delay_secs: 5 });
                    continue;
                }
            };
            let path = format!("/tasks/{}/dead-letter", task.id);
            let body = serde_json::to_vec(&task).unwrap_or_default();
            decisions.push(match self.queues.call(&task.target_server, "POST", &path, body).await {
                Ok(reply) if reply.status == 200 => Delivery::Ack,
                _ => Delivery::Retry { delay_secs: 5 },
            });
        }
        decisions
    }

    /// The record to hand over: the one the message carries while it is younger than
    /// [`RECORD_IN_MESSAGE_MAX_AGE_SECS`], else the one in KV. Why the age: the record in the
    /// message is as the POST made it, and only the object can have changed it since (a
    /// cancel before the hand-off leaves a finished entry there, which it keeps
    /// `retain_secs`); an older message could outlive that entry, and KV has the cancel.
    async fn record_of(&self, message: &QueueMessage) -> Result<Option<Task>, String> {
        match &message.task {
            Some(task)
                if task.id == message.task_id
                    && self.now.millis_since(message.created_at) < RECORD_IN_MESSAGE_MAX_AGE_SECS * 1000 =>
            {
                Ok(Some((**task).clone()))
            }
            _ => self.tasks.load(message.task_id).await.map_err(|e| e.to_string()),
        }
    }

    /// Hands a queued task to its server's object, with the record the API stored.
    pub async fn hand_off(&self, message: &QueueMessage) -> Handoff {
        let task = match self.record_of(message).await {
            Ok(Some(task)) => task,
            Ok(None) => return Handoff::NotVisible(format!("task {} has no record here yet", message.task_id)),
            Err(e) => return Handoff::Retry(e.to_string()),
        };
        if task.status.is_terminal() {
            return Handoff::Done;
        }
        let body = serde_json::to_vec(&task).unwrap_or_default();
        match self.queues.call(&task.target_server, "POST", "/enqueue", body).await {
            Ok(reply) if reply.status == 200 => Handoff::Done,
            Ok(reply) => Handoff::Retry(format!("host queue answered {}: {}", reply.status, reply.body)),
            Err(e) => Handoff::Retry(e),
        }
    }

    /// Hands a queue batch's tasks to their servers' objects: every record taken from its
    /// message or, failing that, read from KV concurrently,
    /// then one `POST /enqueue-batch` per server (the batch's tasks for it, in order) instead of
    /// one request per message: under load the objects' requests, all on the worker's one
    /// thread, were where the hand-off's time went. One answer per message, in order, as
    /// [`Self::hand_off`] would give it; an object that fails its request gets its messages
    /// retried, each harmlessly (enqueueing a held task is a no-op).
    pub async fn hand_off_batch(&self, messages: &[QueueMessage]) -> Vec<Handoff> {
        let records = futures::future::join_all(messages.iter().map(|m| self.record_of(m))).await;
        let mut answers: Vec<Option<Handoff>> = vec![None; messages.len()];
        let mut by_server: BTreeMap<String, Vec<(usize, Task)>> = BTreeMap::new();
        for (i, (message, record)) in messages.iter().zip(records).enumerate() {
            answers[i] = match record {
                Ok(Some(task)) if task.status.is_terminal() => Some(Handoff::Done),
                Ok(Some(task)) => {
                    by_server.entry(task.target_server.clone()).or_default().push((i, task));
                    None
                }
                Ok(None) => Some(Handoff::NotVisible(format!("task {} has no record here yet", message.task_id))),
                Err(e) => Some(Handoff::Retry(e.to_string())),
            };
        }
        let calls = by_server.into_iter().map(|(server, held)| async move {
            let (indices, tasks): (Vec<usize>, Vec<Task>) = held.into_iter().unzip();
            let count = tasks.len();
            let body = serde_json::to_vec(&EnqueueBatch { tasks }).unwrap_or_default();
            let answer = match self.queues.call(&server, "POST", "/enqueue-batch", body).await {
                Ok(reply) if reply.status == 200 => match serde_json::from_str::<EnqueueBatchReply>(&reply.body) {
                    Ok(batch) if batch.outcomes.len() == count => Handoff::Done,
                    Ok(batch) => Handoff::Retry(format!(
                        "host queue {server} answered {} outcomes for {count} tasks",
                        batch.outcomes.len()
                    )),
                    Err(e) => Handoff::Retry(format!("host queue {server} answered {e}")),
                },
                Ok(reply) => Handoff::Retry(format!("host queue answered {}: {}", reply.status, reply.body)),
                Err(e) => Handoff::Retry(e),
            };
            (indices, answer)
        });
        for (indices, answer) in futures::future::join_all(calls).await {
            for i in indices {
                answers[i] = Some(answer.clone());
            }
        }
        answers.into_iter().map(|a| a.expect("every message answered")).collect()
    }

    /// The cron in this mode. A queue message can be lost (a purged queue; on the local stack a
    /// `wrangler dev` restart drops messages in flight), so every task still pending
    /// `rebuffer_after_secs` after its creation, created within `look_back_secs` (the
    /// never-claimed limit: older ones have failed), is handed to its object again: a no-op when the object holds it. At most `budget` KV operations.
    /// Returns how many tasks the objects took that they did not have.
    pub async fn reconcile(
        &self,
        now: Timestamp,
        rebuffer_after_secs: u64,
        look_back_secs: u64,
        budget: u64,
    ) -> Result<usize, String> {
        let (mut ops, mut cursor, mut recovered) = (0, None::<String>, 0);
        let newest = now.as_millis().saturating_sub(rebuffer_after_secs * 1000);
        let oldest = now.as_millis().saturating_sub(look_back_secs * 1000);
        loop {
            if ops + 2 > budget {
                return Ok(recovered);
            }
            let page = self.tasks.list(1000, cursor.as_deref()).await.map_err(|e| e.to_string())?;
            ops += 1;
            for key in &page.keys {
                let Some(summary) = key.metadata.clone().and_then(|m| serde_json::from_value::<TaskSummary>(m).ok())
                else {
                    continue;
                };
                // Newest first: past the look-back, nothing older can matter.
                if summary.created_at.as_millis() < oldest {
                    return Ok(recovered);
                }
                if summary.status != TaskStatus::Pending || summary.created_at.as_millis() > newest {
                    continue;
                }
                if ops + 1 > budget {
                    return Ok(recovered);
                }
                ops += 1;
                let Ok(Some(task)) = self.tasks.load(summary.id).await else { continue };
                if task.status != TaskStatus::Pending {
                    continue;
                }
                let body = serde_json::to_vec(&task).unwrap_or_default();
                let reply = self.queues.call(&task.target_server, "POST", "/enqueue", body).await?;
                if reply.status == 200 && serde_json::from_str(&reply.body).ok() == Some(EnqueueOutcome::Queued) {
                    recovered += 1;
                }
            }
            match page.cursor {
                Some(next) if !page.list_complete => cursor = Some(next),
                _ => return Ok(recovered),
            }
        }
    }

    /// The long poll: waits on every listed server's object at once and answers when the
    /// first has new work (or at the deadline), listing all of them.
    async fn ready(&self, request: &Request) -> Result<Response, Response> {
        let servers: Vec<String> = query(request, "server")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if servers.len() > Limits::SERVERS_PER_POLL_MAX {
            let message = format!("at most {} servers per request", Limits::SERVERS_PER_POLL_MAX);
            return Err(invalid(FieldError::new("server", message)));
        }
        for server in &servers {
            check_server_name("server", server).map_err(invalid)?;
            self.consumer_tokens.admit(request, "consumer", Some(server))?;
        }
        // Every listing is complete here (a host's live tasks); the limit is checked alike.
        if let Some(raw) = query(request, "limit") {
            if !raw.parse::<u64>().is_ok_and(|n| (1..=1000).contains(&n)) {
                return Err(invalid(FieldError::new(
                    "limit",
                    format!("must be an integer from 1 to 1000, got {raw:?}"),
                )));
            }
        }
        if servers.is_empty() {
            let message = "is required with `wait` or `since`, and always in the durable dispatch mode";
            return Err(invalid(FieldError::new("server", message)));
        }
        // The daemon's report about itself, every few minutes, as in the KV mode.
        record_host_report(self.host_registry, request, &servers, self.now).await.map_err(Response::from)?;
        let wait_secs = match query(request, "wait") {
            None => 0,
            Some(raw) => raw.parse::<u64>().ok().filter(|n| *n <= self.max_wait_secs).ok_or_else(|| {
                invalid(FieldError::new(
                    "wait",
                    format!("must be an integer from 0 to {}, got {raw:?}", self.max_wait_secs),
                ))
            })?,
        };
        let since: Vec<&str> = query(request, "since").map(|s| s.split('.').collect()).unwrap_or_default();
        let mut waits = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            let path = match since.get(i) {
                Some(version) if wait_secs > 0 => format!("/ready?since={version}&wait_ms={}", wait_secs * 1000),
                _ => "/ready".to_owned(),
            };
            waits.push(Box::pin(self.list(server, path)));
        }
        // The first object to answer (new work, or its deadline) ends the wait; the others are
        // listed again without waiting.
        let (first, index, _rest) = futures::future::select_all(waits).await;
        let mut lists = Vec::with_capacity(servers.len());
        for (i, server) in servers.iter().enumerate() {
            lists.push(if i == index { first.clone()? } else { self.list(server, "/ready".into()).await? });
        }
        let bell = lists.iter().map(|l| l.version.as_str()).collect::<Vec<_>>().join(".");
        let mut tasks: Vec<BufferedTask> = lists.into_iter().flat_map(|l| l.tasks).collect();
        tasks.sort_by_key(|t| t.task_id);
        Ok(json(200, &ReadyTasksResponse { success: true, count: tasks.len(), tasks, bell, list_complete: true }))
    }

    async fn list(&self, server: &str, path: String) -> Result<ReadyList, Response> {
        let reply = self.queues.call(server, "GET", &path, Vec::new()).await.map_err(unavailable)?;
        serde_json::from_str(&reply.body).map_err(|e| unavailable(format!("host queue {server} answered {e}")))
    }

    async fn forward_lease(&self, request: &Request, raw_id: &str, op: &str) -> Result<Response, Response> {
        let id = parse_task_id("id", raw_id).map_err(invalid)?;
        let server = match query(request, "server") {
            Some(server) => {
                check_server_name("server", server).map_err(invalid)?;
                server.to_owned()
            }
            None => match self.tasks.load(id).await.map_err(|e| unavailable(e.to_string()))? {
                Some(task) => task.target_server,
                None => return Err(not_found(format!("task {id} not found"))),
            },
        };
        self.consumer_tokens.admit(request, "consumer", Some(&server))?;
        let reply = self
            .queues
            .call(&server, "POST", &format!("/tasks/{id}/{op}"), request.body.clone())
            .await
            .map_err(unavailable)?;
        Ok(from_reply(reply))
    }
}

/// The API worker's routes in this mode.
#[derive(Debug)]
pub struct ApiFront<'a, S, Q> {
    pub tasks: &'a TaskStore<S>,
    pub queues: &'a Q,
    pub client_tokens: &'a Tokens,
    pub consumer_tokens: &'a Tokens,
}

impl<S: KvStore, Q: HostQueues> ApiFront<'_, S, Q> {
    pub async fn handle(&self, request: &Request) -> Option<Response> {
        let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
        let id = match (request.method.as_str(), segments.as_slice()) {
            ("DELETE", ["vm", "tasks", id]) => {
                if let Err(refused) = self.client_tokens.admit(request, "client", None) {
                    return Some(refused);
                }
                let (id, task) = self.live_task(id).await?;
                return Some(self.cancel(id, task).await);
            }
            ("PUT", ["vm", "tasks", id, "status"]) => {
                if let Err(refused) = self.consumer_tokens.admit(request, "consumer", None) {
                    return Some(refused);
                }
                if let Some(server) = query(request, "server") {
                    return self.report_to(server, id, request).await;
                }
                let (id, task) = self.live_task(id).await?;
                if let Err(refused) = self.consumer_tokens.admit(request, "consumer", Some(&task.target_server)) {
                    return Some(refused);
                }
                let path = format!("/tasks/{id}/status");
                return match self.queues.call(&task.target_server, "PUT", &path, request.body.clone()).await {
                    // A task the object does not hold (queued before the mode was switched):
                    // the KV mode's handler reports on it.
                    Ok(reply) if reply.status == 404 => None,
                    Ok(reply) => Some(from_reply(reply)),
                    Err(e) => Some(unavailable(e)),
                };
            }
            ("GET", ["vm", "tasks", id] | ["vm", "tasks", id, "status"]) => *id,
            _ => return None,
        };
        // A live task is read from its object, which is never stale (its KV record may lag by
        // up to KV's write window, [`crate::MIRROR_WINDOW_MS`]); `?wait=N` waits on it there.
        // A bad `wait` is the KV mode's to refuse, and finished tasks are read from KV.
        let wait_secs = match query(request, "wait") {
            None => 0,
            Some(raw) => raw.parse::<u64>().ok().filter(|n| *n <= Limits::WAIT_MAX_SECS)?,
        };
        let admitted = self
            .consumer_tokens
            .admit(request, "consumer", None)
            .or_else(|_| self.client_tokens.admit(request, "client", None));
        if let Err(refused) = admitted {
            return Some(refused);
        }
        let (id, task) = self.live_task(id).await?;
        let path = format!("/tasks/{id}?wait_ms={}", wait_secs * 1000);
        let live = match self.queues.call(&task.target_server, "GET", &path, Vec::new()).await {
            Ok(reply) if reply.status == 200 => {
                serde_json::from_str::<TaskDetailResponse>(&reply.body).map(|d| d.task).unwrap_or(task)
            }
            // Not in the object (still queued): the record as it stands.
            Ok(_) if wait_secs == 0 => task,
            Ok(_) => self.tasks.load(id).await.ok().flatten().unwrap_or(task),
            Err(e) => return Some(unavailable(e)),
        };
        Some(if segments.last() == Some(&"status") {
            json(200, &TaskStatusResponse::of(&live))
        } else {
            json(200, &TaskDetailResponse { success: true, task: live })
        })
    }

    /// A daemon's report naming the task's server (`?server=`): straight to that object, no
    /// record read. `None` (a bad task id, or a task the object does not hold: unknown, on
    /// another server, purged after finishing, or queued before the mode was switched) leaves
    /// it to the KV mode's handler, which answers those alike in both modes.
    async fn report_to(&self, server: &str, raw_id: &str, request: &Request) -> Option<Response> {
        if let Err(e) = check_server_name("server", server) {
            return Some(invalid(e));
        }
        if let Err(refused) = self.consumer_tokens.admit(request, "consumer", Some(server)) {
            return Some(refused);
        }
        let id = parse_task_id("id", raw_id).ok()?;
        match self.queues.call(server, "PUT", &format!("/tasks/{id}/status"), request.body.clone()).await {
            Ok(reply) if reply.status == 404 => None,
            Ok(reply) => Some(from_reply(reply)),
            Err(e) => Some(unavailable(e)),
        }
    }

    /// The task, when its record exists and is not finished; `None` leaves the request to the
    /// KV mode's handlers (which answer unknown ids, bad ids and finished tasks).
    async fn live_task(&self, raw_id: &str) -> Option<(uuid::Uuid, Task)> {
        let id = parse_task_id("id", raw_id).ok()?;
        let task = self.tasks.load(id).await.ok()??;
        (!task.status.is_terminal()).then_some((id, task))
    }

    async fn cancel(&self, id: uuid::Uuid, task: Task) -> Response {
        let server = task.target_server.clone();
        let body = serde_json::to_vec(&CancelRequest { task: Some(task), message: "cancelled by client".into() })
            .unwrap_or_default();
        match self.queues.call(&server, "POST", &format!("/tasks/{id}/cancel"), body).await {
            Ok(reply) => from_reply(reply),
            Err(e) => unavailable(e),
        }
    }
}

fn query<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn with_mode(mut response: Response) -> Response {
    response.headers.push((MODE_HEADER.into(), "durable".into()));
    response
}

fn json(status: u16, body: &impl serde::Serialize) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::to_vec(body).unwrap_or_default(),
    }
}

fn from_reply(reply: Reply) -> Response {
    Response {
        status: reply.status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: reply.body.into_bytes(),
    }
}

fn error(status: u16, code: &str, message: String, field: Option<String>) -> Response {
    json(
        status,
        &ErrorBody {
            success: false,
            error: message,
            code: code.into(),
            field,
            current_status: None,
            lease_expires_at: None,
        },
    )
}

fn invalid(e: FieldError) -> Response {
    let field = Some(e.field.clone());
    error(400, "invalid_field", e.to_string(), field)
}

fn not_found(message: String) -> Response {
    error(404, "not_found", message, None)
}

fn unavailable(message: String) -> Response {
    error(503, "unavailable", format!("host queue unavailable: {message}"), None)
}
