//! The consumer worker: buffers queued tasks per server, lets each host's daemon list,
//! claim, renew and release them, and sweeps expired leases.
//!
//! The claim is the commit point: it moves the task record from `pending` to `processing`
//! under a lease, in the same write that reports it started. The buffer entry stays until the
//! task is terminal, so a daemon that dies mid-task finds its task again after the lease ends.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;
use vm_task_types::{
    validate::{self, parse_task_id},
    wire::{
        AllBufferedResponse, BufferedTask, ClaimRequest, ClaimResponse, HealthResponse, LeaseRequest, LeaseResponse,
        ReadyTasksResponse, StatsResponse,
    },
    Claim, FieldError, Task, TaskStatus, TaskSummary, Timestamp,
};

use crate::{
    auth::Tokens,
    counting::OpCounters,
    http::{Request, Response},
    keys,
    routes::{match_route, Matched, CONSUMER_ROUTES},
    store::{BufferStore, TaskStore},
    AppError, Clock, Ids, KvStore, QueueMessage,
};

/// Settings from the worker's vars and secrets.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// `CONSUMER_TOKENS`.
    pub consumer_tokens: Tokens,
    /// `MAX_ATTEMPTS`: claims a task may use before it fails.
    pub max_attempts: u32,
    /// `LEASE_SECONDS`: the lease when a claim asks for none. Covers Arrakis's 120 s start.
    pub lease_default_secs: u64,
    pub lease_min_secs: u64,
    pub lease_max_secs: u64,
    /// `BELL_CHECK_MS`: how often a waiting `/tasks/ready` re-reads the doorbells.
    pub bell_check_ms: u64,
    /// Longest `wait` a daemon may ask of `/tasks/ready`.
    pub max_wait_secs: u64,
    /// `MAX_QUEUED_SECONDS`: a task nobody claims within this fails instead of waiting forever.
    pub max_queued_secs: u64,
    /// When this isolate started, for `/stats`.
    pub started_at: Timestamp,
    /// `QUEUE_RETRY_DELAY_SECONDS`: delay before a message that could not be buffered is
    /// delivered again. workers-rs does not expose the delivery count, so the delay is flat;
    /// the queue's `max_retries` bounds the attempts.
    pub retry_delay_secs: u32,
    /// `FAULT_FAIL_BUFFERING_VM`: fault injection for tests; buffering any task of this VM
    /// fails, so its messages exhaust their retries and reach the dead letter queue. Unset in
    /// every shipped config.
    pub fault_fail_buffering_vm: Option<String>,
    /// `REBUFFER_AFTER_SECONDS`: a pending task in no buffer this long after its creation is
    /// taken to have lost its queue message, and is buffered by the sweep.
    pub rebuffer_after_secs: u64,
    /// `RECONCILE_SECONDS`: how far back the sweep looks for such tasks.
    pub reconcile_secs: u64,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            consumer_tokens: Tokens::default(),
            max_attempts: 3,
            lease_default_secs: 180,
            lease_min_secs: 2,
            lease_max_secs: 3600,
            bell_check_ms: 1000,
            max_wait_secs: 30,
            max_queued_secs: 7 * 86_400,
            started_at: Timestamp(0),
            retry_delay_secs: 5,
            fault_fail_buffering_vm: None,
            rebuffer_after_secs: 60,
            reconcile_secs: 3_600,
        }
    }
}

/// What to do with one queue message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Ack,
    Retry { delay_secs: u32 },
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SweepReport {
    pub success: bool,
    pub scanned: usize,
    pub returned_to_ready: usize,
    pub failed: usize,
    pub cleaned: usize,
    /// Pending tasks found in no buffer (their queue message was lost) and buffered again.
    pub rebuffered: usize,
    /// Servers whose doorbell was rung again for entries left unclaimed.
    pub rung: usize,
}

/// The consumer worker's handlers over its ports.
#[derive(Debug)]
pub struct ConsumerService<'a, S, B, C, I> {
    pub tasks: TaskStore<S>,
    pub buffer: BufferStore<B>,
    pub clock: C,
    pub ids: I,
    pub config: &'a ConsumerConfig,
    pub counters: &'a OpCounters,
}

const WORKER: &str = "consumer-worker";
/// First doorbell check interval of a `hot` long poll.
const HOT_BELL_CHECK_MS: u64 = 100;
/// Listing pages the sweep and stats read per run; beyond this they pick up next time.
const MAX_SCAN_PAGES: usize = 20;

impl<S: KvStore, B: KvStore, C: Clock, I: Ids> ConsumerService<'_, S, B, C, I> {
    pub async fn handle(&self, request: Request) -> Response {
        match match_route(CONSUMER_ROUTES, &request.method, &request.path) {
            Ok(route) => self.dispatch(&route, &request).await.unwrap_or_else(Response::from),
            Err(e) => e.into(),
        }
    }

    async fn dispatch(&self, route: &Matched, request: &Request) -> Result<Response, AppError> {
        if route.pattern == "/health" {
            let body = HealthResponse {
                success: true,
                status: "healthy".into(),
                worker: "vm-consumer-worker".into(),
                timestamp: self.clock.now(),
            };
            return Ok(Response::json(200, &body));
        }
        if route.pattern == "/" {
            return Ok(index());
        }
        self.config.consumer_tokens.check(request, "consumer")?;
        match (request.method.as_str(), route.pattern) {
            (_, "/stats") => self.stats().await,
            (_, "/tasks/ready") => self.ready(request).await,
            (_, "/tasks/all") => self.all(request).await,
            ("DELETE", "/tasks/{id}") => self.delete(route.param(0), request).await,
            (_, "/tasks/{id}/claim") => self.claim(route.param(0), request).await,
            (_, "/tasks/{id}/heartbeat") => self.heartbeat(route.param(0), request).await,
            (_, "/tasks/{id}/release") => self.release(route.param(0), request).await,
            (_, "/admin/sweep") => Ok(Response::json(200, &self.sweep().await?)),
            (_, other) => Err(AppError::NotFound(format!("no handler for {other}"))),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Queue

    /// Buffers one queue batch. Each message is acked once its buffer entry and its server's
    /// doorbell are written; otherwise it is retried, together with every later message for
    /// the same VM so the buffer never holds a VM's later task without its earlier one.
    pub async fn buffer_batch(&self, bodies: &[Value]) -> Vec<Delivery> {
        let now = self.clock.now();
        let retry = Delivery::Retry { delay_secs: self.config.retry_delay_secs };
        // Unreadable messages stay unreadable: retrying would only dead-letter them. Acked.
        let messages: Vec<Option<QueueMessage>> =
            bodies.iter().map(|b| serde_json::from_value::<QueueMessage>(b.clone()).ok()).collect();
        // The KV writes of a batch go out together: one round trip of latency, not ten.
        let outcomes = join_all(messages.iter().map(|m| async move {
            match m {
                Some(message) => Some(self.buffer_one(message, now).await),
                None => None,
            }
        }))
        .await;
        let mut decisions = vec![Delivery::Ack; bodies.len()];
        let mut blocked_vms = BTreeSet::new();
        let mut by_server: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, (message, outcome)) in messages.iter().zip(outcomes).enumerate() {
            let (Some(message), Some(outcome)) = (message, outcome) else { continue };
            if blocked_vms.contains(&message.vm_name) {
                // An earlier task of this VM failed: redeliver this one too (its entry, if
                // written, is rewritten harmlessly), so neither is acked ahead of the other.
                decisions[i] = retry;
                continue;
            }
            match outcome {
                Ok(()) => by_server.entry(message.target_server.clone()).or_default().push(i),
                Err(_) => {
                    decisions[i] = retry;
                    blocked_vms.insert(message.vm_name.clone());
                }
            }
        }
        let rings = join_all(by_server.keys().map(|server| self.ring(server))).await;
        for ((_, indices), rung) in by_server.iter().zip(rings) {
            if rung.is_err() {
                for &i in indices {
                    decisions[i] = retry;
                }
            }
        }
        decisions
    }

    /// Writes the buffer entry; its server's doorbell rings after the batch.
    ///
    /// The task record is not read first: a task cancelled while queued is rare, and its
    /// entry is harmless, since a claim checks the record, refuses the task with 409 and drops
    /// the entry. Reading every record to catch that case cost each task a KV read.
    async fn buffer_one(&self, message: &QueueMessage, now: Timestamp) -> Result<(), AppError> {
        if self.config.fault_fail_buffering_vm.as_deref() == Some(message.vm_name.as_str()) {
            return Err(AppError::Unavailable(format!("injected buffering fault for VM {}", message.vm_name)));
        }
        let entry = BufferedTask {
            task_id: message.task_id,
            kind: message.kind,
            vm_name: message.vm_name.clone(),
            target_server: message.target_server.clone(),
            previous_task_id: message.previous_task_id,
            created_at: message.created_at,
            buffered_at: now,
        };
        self.buffer.put(&entry).await?;
        Ok(())
    }

    /// Handles messages that exhausted their deliveries: each task becomes `failed` with the
    /// reason, so nothing the API accepted is ever silently lost.
    pub async fn dead_letter_batch(&self, bodies: &[Value]) -> Vec<Delivery> {
        let mut decisions = Vec::with_capacity(bodies.len());
        for body in bodies {
            let Ok(message) = serde_json::from_value::<QueueMessage>(body.clone()) else {
                decisions.push(Delivery::Ack);
                continue;
            };
            let outcome = async {
                let Some(mut task) = self.tasks.load(message.task_id).await? else { return Ok::<(), AppError>(()) };
                if task.status == TaskStatus::Pending {
                    let reason =
                        "could not be buffered for a host: the queue gave up after its retries (dead-lettered)";
                    task.error = Some(reason.into());
                    task.record(self.clock.now(), WORKER, "dead_lettered", Some(TaskStatus::Failed), reason);
                    self.tasks.save(&task).await?;
                }
                Ok(())
            }
            .await;
            decisions.push(match outcome {
                Ok(()) => Delivery::Ack,
                Err(_) => Delivery::Retry { delay_secs: 30 },
            });
        }
        decisions
    }

    // -----------------------------------------------------------------------------------------
    // HTTP

    async fn ready(&self, request: &Request) -> Result<Response, AppError> {
        let servers = parse_servers(request.query_param("server"))?;
        let limit = parse_bounded(request, "limit", 100, 1, 1000)? as usize;
        let wait_ms = parse_bounded(request, "wait", 0, 0, self.config.max_wait_secs)? * 1000;
        let since = request.query_param("since").filter(|s| !s.is_empty());
        if servers.is_empty() && (wait_ms > 0 || since.is_some()) {
            return Err(AppError::invalid_field(FieldError::new("server", "is required with `wait` or `since`")));
        }
        // `hot=1`: the daemon just saw work, and more often follows at once. Check the bell at
        // 100, 200, 400... ms up to the usual interval, so back-to-back tasks are picked up in
        // about 0.1 s for a handful of extra reads, while an idle poll costs no more.
        let hot = match request.query_param("hot") {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                return Err(AppError::invalid_field(FieldError::new("hot", format!("must be 0 or 1, got {other:?}"))))
            }
        };
        let mut interval =
            if hot { HOT_BELL_CHECK_MS.min(self.config.bell_check_ms) } else { self.config.bell_check_ms };
        let deadline = self.clock.now().plus_millis(wait_ms);
        loop {
            let bell = self.bells(&servers).await?;
            let changed = since != Some(bell.as_str());
            let now = self.clock.now();
            if changed || now >= deadline {
                let (tasks, list_complete) =
                    if changed { self.list_ready(&servers, limit).await? } else { (Vec::new(), true) };
                return Ok(Response::json(
                    200,
                    &ReadyTasksResponse { success: true, count: tasks.len(), tasks, bell, list_complete },
                ));
            }
            self.clock.sleep_ms(interval.max(10).min(deadline.millis_since(now))).await;
            interval = (interval * 2).min(self.config.bell_check_ms);
        }
    }

    async fn bells(&self, servers: &[String]) -> Result<String, AppError> {
        let mut parts = Vec::with_capacity(servers.len());
        for server in servers {
            parts.push(self.buffer.bell(server).await?);
        }
        Ok(parts.join("."))
    }

    /// Buffered tasks of `servers` (all servers when empty), oldest first.
    async fn list_ready(&self, servers: &[String], limit: usize) -> Result<(Vec<BufferedTask>, bool), AppError> {
        let prefixes: Vec<String> = if servers.is_empty() {
            vec![keys::READY_PREFIX.to_owned()]
        } else {
            servers.iter().map(|s| keys::ready_prefix(s)).collect()
        };
        let mut all = Vec::new();
        let mut complete = true;
        for prefix in prefixes {
            let (tasks, page) = self.buffer.list(&prefix, limit, None).await?;
            complete &= page.list_complete;
            all.extend(tasks);
        }
        all.sort_by_key(|t| t.task_id);
        if all.len() > limit {
            all.truncate(limit);
            complete = false;
        }
        Ok((all, complete))
    }

    async fn all(&self, request: &Request) -> Result<Response, AppError> {
        let limit = parse_bounded(request, "limit", 1000, 1, 1000)? as usize;
        let (tasks, complete) = self.list_ready(&[], limit).await?;
        Ok(Response::json(
            200,
            &AllBufferedResponse { success: true, count: tasks.len(), tasks, list_complete: complete },
        ))
    }

    async fn delete(&self, raw_id: &str, request: &Request) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let server = match request.query_param("server") {
            Some(server) => {
                validate::check_server_name("server", server)?;
                server.to_owned()
            }
            None => self.tasks.require(id).await?.target_server,
        };
        self.buffer.remove(&server, id).await?;
        Ok(Response::json(
            200,
            &serde_json::json!({"success": true, "taskId": id, "message": "removed from the buffer"}),
        ))
    }

    async fn claim(&self, raw_id: &str, request: &Request) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let body: ClaimRequest = request.json()?;
        check_consumer_id(&body.consumer_id)?;
        let lease = self.lease_secs(body.lease_seconds);
        let mut task = self.tasks.require(id).await?;
        let now = self.clock.now();
        match task.status {
            status if status.is_terminal() => {
                self.buffer.remove(&task.target_server, id).await?;
                return Err(AppError::conflict(format!("task {id} is {status}; it will not run"), status));
            }
            TaskStatus::Processing => {
                if let (Some(proposed), Some(held)) = (body.claim_id, task.claim.clone()) {
                    if held.claim_id == proposed {
                        // The same claim again: its first response was lost. Nothing to write.
                        return Ok(Response::json(
                            200,
                            &ClaimResponse {
                                success: true,
                                claim_id: held.claim_id,
                                lease_expires_at: held.lease_expires_at,
                                task,
                            },
                        ));
                    }
                }
                let expires = task.claim.as_ref().map(|c| c.lease_expires_at).unwrap_or(now);
                if now < expires {
                    return Err(AppError::Conflict {
                        message: format!("task {id} is claimed until {expires}"),
                        current_status: Some(task.status),
                        lease_expires_at: Some(expires),
                    });
                }
                self.expire_lease(&mut task, now);
            }
            _ => {}
        }
        if task.attempts >= self.config.max_attempts {
            self.give_up(&mut task, now).await?;
            return Err(AppError::conflict(task.error.clone().unwrap_or_default(), TaskStatus::Failed));
        }
        if task.event_at("buffered").is_none() {
            // The daemon read the entry's buffering time in its listing; only a client that
            // does not send it costs a read of the entry. Clamped: it is a timeline note, and
            // the edge's clocks may differ by a few ms between locations.
            let buffered_at = match body.buffered_at {
                Some(at) => Some(at.max(task.created_at).min(now)),
                None => self.buffer.get(&task.target_server, id).await?.map(|entry| entry.buffered_at),
            };
            if let Some(at) = buffered_at {
                task.record(at, WORKER, "buffered", None, format!("buffered for server {}", task.target_server));
            }
        }
        task.attempts += 1;
        let claim = Claim {
            claim_id: body.claim_id.unwrap_or_else(|| self.ids.random_uuid()),
            consumer_id: body.consumer_id.clone(),
            claimed_at: now,
            lease_expires_at: now.plus_secs(lease),
        };
        task.claim = Some(claim.clone());
        let note = format!(
            "attempt {} of {}, lease until {}",
            task.attempts, self.config.max_attempts, claim.lease_expires_at
        );
        task.record(now, &body.consumer_id, "claimed", Some(TaskStatus::Processing), note);
        self.tasks.save(&task).await?;
        Ok(Response::json(
            200,
            &ClaimResponse { success: true, claim_id: claim.claim_id, lease_expires_at: claim.lease_expires_at, task },
        ))
    }

    async fn heartbeat(&self, raw_id: &str, request: &Request) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let body: LeaseRequest = request.json()?;
        let mut task = self.held(id, body.claim_id).await?;
        let expires = self.clock.now().plus_secs(self.lease_secs(body.lease_seconds));
        if let Some(claim) = task.claim.as_mut() {
            claim.lease_expires_at = expires;
        }
        task.updated_at = self.clock.now();
        task.gen += 1;
        self.tasks.save(&task).await?;
        Ok(Response::json(
            200,
            &LeaseResponse { success: true, task_id: id, status: task.status, lease_expires_at: Some(expires) },
        ))
    }

    async fn release(&self, raw_id: &str, request: &Request) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let body: LeaseRequest = request.json()?;
        let mut task = self.held(id, body.claim_id).await?;
        let actor = task.claim.as_ref().map(|c| c.consumer_id.clone()).unwrap_or_default();
        task.claim = None;
        // A released claim never started work, so it does not count as an attempt.
        task.attempts = task.attempts.saturating_sub(1);
        let reason = body.reason.clone().unwrap_or_else(|| "released by its consumer".into());
        task.record(self.clock.now(), &actor, "released", Some(TaskStatus::Pending), reason);
        self.tasks.save(&task).await?;
        self.ring(&task.target_server).await?;
        Ok(Response::json(
            200,
            &LeaseResponse { success: true, task_id: id, status: task.status, lease_expires_at: None },
        ))
    }

    /// The task, if `claim_id` holds it and it is still processing; 409 otherwise.
    async fn held(&self, id: Uuid, claim_id: Uuid) -> Result<Task, AppError> {
        let task = self.tasks.require(id).await?;
        if task.status != TaskStatus::Processing || !task.is_claimed_by(claim_id) {
            return Err(AppError::Conflict {
                message: format!("claim {claim_id} does not hold task {id} (it is {})", task.status),
                current_status: Some(task.status),
                lease_expires_at: task.claim.as_ref().map(|c| c.lease_expires_at),
            });
        }
        Ok(task)
    }

    async fn stats(&self) -> Result<Response, AppError> {
        let mut by_server: BTreeMap<String, usize> = BTreeMap::new();
        let mut cursor = None;
        for _ in 0..MAX_SCAN_PAGES {
            let page = self.buffer.kv.list(keys::READY_PREFIX, 1000, cursor.as_deref()).await?;
            for key in &page.keys {
                if let Some(server) = keys::server_of_ready(&key.name) {
                    *by_server.entry(server.to_owned()).or_default() += 1;
                }
            }
            if page.list_complete {
                break;
            }
            cursor = page.cursor;
        }
        let total = by_server.values().sum();
        Ok(Response::json(
            200,
            &StatsResponse {
                success: true,
                worker: "vm-consumer-worker".into(),
                since: self.config.started_at,
                ops: self.counters.snapshot(),
                buffered_by_server: Some(by_server),
                buffered_total: Some(total),
            },
        ))
    }

    // -----------------------------------------------------------------------------------------
    // Leases

    /// Returns expired claims to ready (or fails them after the last attempt), drops buffer
    /// entries of finished tasks, and fails tasks no daemon picked up in `max_queued_secs`.
    /// Runs from the cron trigger and from `POST /admin/sweep`.
    pub async fn sweep(&self) -> Result<SweepReport, AppError> {
        let mut report = SweepReport { success: true, ..SweepReport::default() };
        let mut stale_servers = BTreeSet::new();
        let mut cursor = None;
        for _ in 0..MAX_SCAN_PAGES {
            let (entries, page) = self.buffer.list(keys::READY_PREFIX, 1000, cursor.as_deref()).await?;
            for entry in entries {
                report.scanned += 1;
                self.sweep_one(&entry, &mut report, &mut stale_servers).await?;
            }
            if page.list_complete {
                break;
            }
            cursor = page.cursor;
        }
        self.rebuffer_lost(&mut report).await?;
        // Unclaimed entries that have waited a while: ring again, in case the ring that went
        // with them was lost (a worker killed between the two writes) or has not reached the
        // daemon's location yet. One write per such server per sweep.
        for server in stale_servers {
            self.ring(&server).await?;
            report.rung += 1;
        }
        Ok(report)
    }

    /// Buffers pending tasks whose queue message never arrived. Cloudflare Queues deliver at
    /// least once, but a message can still be lost to an operator purging the queue or, on the
    /// local stack, to a `wrangler dev` restart. Reads the newest task summaries (metadata
    /// only) back to `reconcile_secs`, and for each pending task older than
    /// `rebuffer_after_secs` with no buffer entry, writes one.
    async fn rebuffer_lost(&self, report: &mut SweepReport) -> Result<(), AppError> {
        let now = self.clock.now();
        let mut cursor = None;
        for _ in 0..MAX_SCAN_PAGES {
            let page = self.tasks.list(1000, cursor.as_deref()).await?;
            for key in &page.keys {
                let Some(summary) = key.metadata.clone().and_then(|m| serde_json::from_value::<TaskSummary>(m).ok())
                else {
                    continue;
                };
                let age_ms = now.millis_since(summary.created_at);
                if age_ms > self.config.reconcile_secs * 1000 {
                    return Ok(()); // Newest first: everything after is older still.
                }
                if summary.status != TaskStatus::Pending || age_ms < self.config.rebuffer_after_secs * 1000 {
                    continue;
                }
                if self.buffer.get(&summary.target_server, summary.id).await?.is_some() {
                    continue;
                }
                let Some(task) = self.tasks.load(summary.id).await? else { continue };
                if task.status != TaskStatus::Pending || task.claim.is_some() {
                    continue;
                }
                let message = QueueMessage::of(&task);
                self.buffer_one(&message, now).await?;
                self.ring(&task.target_server).await?;
                report.rebuffered += 1;
            }
            if page.list_complete {
                break;
            }
            cursor = page.cursor;
        }
        Ok(())
    }

    async fn sweep_one(
        &self,
        entry: &BufferedTask,
        report: &mut SweepReport,
        stale_servers: &mut BTreeSet<String>,
    ) -> Result<(), AppError> {
        let now = self.clock.now();
        let queued_too_long = now.millis_since(entry.created_at) > self.config.max_queued_secs * 1000;
        let Some(mut task) = self.tasks.load(entry.task_id).await? else {
            if queued_too_long {
                self.buffer.remove(&entry.target_server, entry.task_id).await?;
                report.cleaned += 1;
            }
            return Ok(());
        };
        match task.status {
            status if status.is_terminal() => {
                self.buffer.remove(&entry.target_server, entry.task_id).await?;
                report.cleaned += 1;
            }
            TaskStatus::Processing if task.claim.as_ref().is_none_or(|c| c.lease_expires_at <= now) => {
                self.expire_lease(&mut task, now);
                if task.attempts >= self.config.max_attempts {
                    self.give_up(&mut task, now).await?;
                    report.failed += 1;
                } else {
                    self.tasks.save(&task).await?;
                    self.ring(&task.target_server).await?;
                    report.returned_to_ready += 1;
                }
            }
            TaskStatus::Pending if queued_too_long => {
                let reason = format!(
                    "no daemon serving {:?} claimed the task within {} s; is a local consumer running for that server?",
                    task.target_server, self.config.max_queued_secs
                );
                task.error = Some(reason.clone());
                task.record(now, "sweeper", "expired", Some(TaskStatus::Failed), reason);
                self.tasks.save(&task).await?;
                self.buffer.remove(&task.target_server, task.id).await?;
                report.failed += 1;
            }
            TaskStatus::Pending if now.millis_since(entry.buffered_at) > self.config.rebuffer_after_secs * 1000 => {
                stale_servers.insert(task.target_server.clone());
            }
            _ => {}
        }
        Ok(())
    }

    /// Moves a processing task whose lease ended back to pending (in memory).
    fn expire_lease(&self, task: &mut Task, now: Timestamp) {
        let holder = task.claim.take().map(|c| c.consumer_id).unwrap_or_default();
        let note = format!(
            "lease of {holder} expired without a report (attempt {} of {})",
            task.attempts, self.config.max_attempts
        );
        task.record(now, "sweeper", "lease_expired", Some(TaskStatus::Pending), note);
    }

    /// Fails a task that used all its attempts, and drops its buffer entry.
    async fn give_up(&self, task: &mut Task, now: Timestamp) -> Result<(), AppError> {
        let reason =
            format!("gave up after {} attempts: every lease expired without a report from the daemon", task.attempts);
        task.error = Some(reason.clone());
        task.claim = None;
        task.record(now, "sweeper", "attempts_exhausted", Some(TaskStatus::Failed), reason);
        self.tasks.save(task).await?;
        self.buffer.remove(&task.target_server, task.id).await
    }

    async fn ring(&self, server: &str) -> Result<(), AppError> {
        self.buffer.ring(server, &self.ids.random_uuid().simple().to_string()).await
    }

    fn lease_secs(&self, requested: Option<u64>) -> u64 {
        requested
            .unwrap_or(self.config.lease_default_secs)
            .clamp(self.config.lease_min_secs, self.config.lease_max_secs)
    }
}

fn parse_servers(raw: Option<&str>) -> Result<Vec<String>, AppError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else { return Ok(Vec::new()) };
    let servers: Vec<String> = raw.split(',').map(|s| s.trim().to_owned()).collect();
    if servers.len() > 32 {
        return Err(AppError::invalid_field(FieldError::new("server", "at most 32 servers per request")));
    }
    for s in &servers {
        validate::check_server_name("server", s)?;
    }
    Ok(servers)
}

fn parse_bounded(request: &Request, name: &str, default: u64, min: u64, max: u64) -> Result<u64, AppError> {
    match request.query_param(name) {
        None => Ok(default),
        Some(raw) => raw.parse::<u64>().ok().filter(|n| (min..=max).contains(n)).ok_or_else(|| {
            AppError::invalid_field(FieldError::new(
                name,
                format!("must be an integer from {min} to {max}, got {raw:?}"),
            ))
        }),
    }
}

fn check_consumer_id(id: &str) -> Result<(), AppError> {
    validate::check_segment("consumerId", id, 128).map_err(AppError::invalid_field)
}

fn index() -> Response {
    Response::json(
        200,
        &serde_json::json!({
            "success": true,
            "name": "vm-consumer-worker",
            "description": "Buffers queued VM tasks per host for the local consumer daemons",
            "endpoints": CONSUMER_ROUTES.iter().map(|(m, p)| format!("{m} {p}")).collect::<Vec<_>>(),
        }),
    )
}
