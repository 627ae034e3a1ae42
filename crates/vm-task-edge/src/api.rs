//! The API worker: clients submit, read, list and cancel tasks; daemons report on them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;
use vm_task_types::{
    validate::{self, parse_task_id},
    wire::{
        CancelRequestedResponse, CreateTaskResponse, HealthResponse, HostEntry, ListHostsResponse, ListTasksResponse,
        ListVmsResponse, StatsResponse, TaskDetailResponse, TaskStatusResponse, UpdateStatusRequest,
        UpdateStatusResponse, VmStatusResponse, VmSummary,
    },
    FieldError, Limits, Operation, OperationKind, Task, TaskStatus, TaskSummary, TimelineEvent, Timestamp, VmState,
};

use crate::{
    auth::{self, Caller, Cors, Tokens},
    counting::OpCounters,
    hosts,
    http::{Request, Response},
    intents::{claim_outcome, settle_cancel, CancelIntent, CancelSettlement, ClaimOutcome},
    listing,
    registry::{Fold, VmRecord},
    routes::{ApiRoute, API_ROUTES},
    store::{apply_cancel_settlement, paced, BufferStore, TaskStore},
    AppError, Clock, Ids, KvKey, KvStore, QueueMessage, TaskQueue,
};

/// Settings from the worker's vars and secrets.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// `API_TOKENS`: bearer tokens for clients.
    pub client_tokens: Tokens,
    /// `CONSUMER_TOKENS`: bearer tokens for daemons (status reports).
    pub consumer_tokens: Tokens,
    /// `ALLOWED_ORIGINS`: browser origins allowed on authenticated routes.
    pub cors: Cors,
    /// `DEFAULT_TARGET_SERVER`: where tasks go when neither the request nor the registry says.
    pub default_target_server: Option<String>,
    /// Key that signs list cursors (`CURSOR_SECRET`). Empty: a key generated once and kept in
    /// KV, so that rotating client tokens never invalidates cursors.
    pub cursor_secret: Vec<u8>,
    /// How often `?wait=` re-reads the task (`WAIT_POLL_MS`, see [`ApiConfig::wait_poll_ms`]).
    pub wait_poll_ms: u64,
    /// Served at `/openapi.json`.
    pub openapi: Option<&'static str>,
    /// `HOST_LIVE_SECONDS`: a host seen within this is live; 0 means
    /// [`HOST_LIVE_SECS_DEFAULT`](crate::HOST_LIVE_SECS_DEFAULT).
    pub host_live_secs: u64,
    /// When this isolate started, for `/stats`.
    pub started_at: Timestamp,
    /// `KV_PROPAGATION_SECONDS`, as the consumer worker has it: 0 (one location, the local
    /// stack, and the default here) answers a pending task's cancel at once through the
    /// intents; above 0 (production: [`crate::KV_PROPAGATION_SECS`]) a cancel is answered 202
    /// until it is certain ([`crate::intents`]).
    pub kv_propagation_secs: u64,
    /// `WEBHOOK_URLS` and `WEBHOOK_ALLOW_HTTP_HOSTS`: checks a POST's `callbackUrl`.
    pub webhooks: crate::webhooks::WebhookConfig,
    /// `DISPATCH_MODE = durable`: queue messages carry the task record
    /// ([`QueueMessage::task`]), so the hand-off to the host queue object reads no KV.
    pub records_in_messages: bool,
}

impl ApiConfig {
    /// `WAIT_POLL_MS`: unset is 250; otherwise an integer from 50 to 5,000 (a smaller one
    /// spends KV reads for nothing, a larger one makes `?wait=` answers late).
    pub fn wait_poll_ms(raw: &str) -> Result<u64, String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Ok(250);
        }
        raw.parse::<u64>()
            .ok()
            .filter(|ms| (50..=5_000).contains(ms))
            .ok_or_else(|| format!("WAIT_POLL_MS must be an integer from 50 to 5000, got {raw:?}"))
    }
}

/// The API worker's handlers over its ports.
#[derive(Debug)]
pub struct ApiService<'a, S, B, Q, C, I> {
    pub tasks: TaskStore<S>,
    pub buffer: BufferStore<B>,
    pub queue: Q,
    pub clock: C,
    pub ids: I,
    pub config: &'a ApiConfig,
    pub counters: &'a OpCounters,
}

/// Most VMs per `GET /vms` page: each may need its unsettled tasks read.
const VM_LIST_LIMIT_MAX: usize = 200;
/// KV reads one `GET /vms` spends folding unsettled VMs (the invocation's limit is 1,000).
const VM_LIST_READS_MAX: usize = 400;

/// KV list operations `GET /hosts` may spend (1,000 records each).
const HOST_LIST_PAGES_MAX: usize = 5;

/// A filter parameter as sent. An empty value is not "no filter": its validator refuses it
/// with a 400, as `openapi.json` says (minimum lengths, enums); leave a filter out to match
/// everything (found by schemathesis).
fn filter_param<'r>(request: &'r Request, name: &str) -> Option<&'r str> {
    request.query_param(name)
}

/// Longest a cancel waits for a claim in flight to decide.
const CANCEL_WAIT_MS: u64 = 2_000;
/// How often it re-reads the record meanwhile.
const CANCEL_POLL_MS: u64 = 250;

/// Stored under `idem:{sha256(key)}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdempotencyRecord {
    task_id: Uuid,
    body_hash: String,
}

impl<S: KvStore, B: KvStore, Q: TaskQueue, C: Clock, I: Ids> ApiService<'_, S, B, Q, C, I> {
    /// What can be decided from the request's head alone (route, token, `Content-Length`):
    /// the refusal to send without reading the body, or `None` to read it and [`handle`]
    /// the whole request. The workers call this first, so an anonymous or oversized body is
    /// answered 401 or 413 unread.
    ///
    /// [`handle`]: Self::handle
    pub fn refuse_unread(&self, head: &Request) -> Option<Response> {
        if head.method == "OPTIONS" {
            return None;
        }
        let verdict = ApiRoute::parse(&head.method, &head.path).and_then(|route| {
            auth::authorize(route.auth(), head, &self.config.client_tokens, &self.config.consumer_tokens)?;
            head.check_declared_length()
        });
        verdict.err().map(|e| self.with_cors(head, Response::from(e)))
    }

    /// Routes and answers one request. Never panics on input; every error is a JSON body.
    pub async fn handle(&self, request: Request) -> Response {
        if request.method == "OPTIONS" {
            return self.preflight(&request);
        }
        let outcome = async {
            let route = ApiRoute::parse(&request.method, &request.path)?;
            let config = self.config;
            let caller = auth::authorize(route.auth(), &request, &config.client_tokens, &config.consumer_tokens)?;
            self.dispatch(route, &caller, &request).await
        };
        let response = outcome.await.unwrap_or_else(Response::from);
        self.with_cors(&request, response)
    }

    async fn dispatch(&self, route: ApiRoute, caller: &Caller, request: &Request) -> Result<Response, AppError> {
        match route {
            ApiRoute::Health => Ok(self.health()),
            ApiRoute::Index => Ok(index()),
            ApiRoute::OpenApi => match self.config.openapi {
                Some(doc) => Ok(Response {
                    status: 200,
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: doc.as_bytes().to_vec(),
                }),
                None => Err(AppError::NotFound("no OpenAPI document is bundled".into())),
            },
            ApiRoute::Dashboard => Ok(crate::dashboard::response()),
            ApiRoute::Stats => Ok(Response::json(200, &self.stats())),
            ApiRoute::CreateTask => self.create_task(request, caller).await,
            ApiRoute::ListTasks => self.list_tasks(request).await,
            ApiRoute::CancelTask { id } => self.cancel_task(&id).await,
            ApiRoute::GetTask { id } => {
                let mut task = self.get_waiting(&id, request).await?;
                self.merge_cancel_intent(&mut task).await?;
                Ok(Response::json(200, &TaskDetailResponse { success: true, task }))
            }
            ApiRoute::ReportStatus { id } => self.update_status(&id, request, caller).await,
            ApiRoute::GetTaskStatus { id } => {
                // Daemons read a task's predecessor here to keep per-VM order.
                let task = self.get_waiting(&id, request).await?;
                Ok(Response::json(200, &TaskStatusResponse::of(&task)))
            }
            ApiRoute::VmStatus { vm_name } => self.vm_status(&vm_name).await,
            ApiRoute::ListVms => self.list_vms(request).await,
            ApiRoute::ListHosts => self.list_hosts(request).await,
        }
    }

    /// The key that signs list cursors: `CURSOR_SECRET`, else one generated on first use and
    /// kept in KV (two isolates generating at once: the last write wins, and a cursor signed
    /// with the other key is refused once, as a stale cursor is).
    async fn cursor_secret(&self) -> Result<Vec<u8>, AppError> {
        if !self.config.cursor_secret.is_empty() {
            return Ok(self.config.cursor_secret.clone());
        }
        if let Some(secret) = self.tasks.kv.get(crate::keys::CURSOR_SECRET).await? {
            return Ok(secret.into_bytes());
        }
        let generated =
            format!("{}{}", auth::sha256_hex(&self.ids.random_bytes()), auth::sha256_hex(&self.ids.random_bytes()));
        paced(&self.clock, || async { Ok(self.tasks.kv.put(crate::keys::CURSOR_SECRET, &generated, None).await?) })
            .await?;
        Ok(generated.into_bytes())
    }

    /// Saves a task record, waiting out a fast hand-off's 429 ([`paced`]).
    async fn save(&self, task: &Task) -> Result<(), AppError> {
        paced(&self.clock, || self.tasks.save(task)).await
    }

    /// Removes a task's buffer entry, waiting out a 429 ([`paced`]).
    async fn unbuffer(&self, server: &str, id: Uuid) -> Result<(), AppError> {
        paced(&self.clock, || self.buffer.remove(server, id)).await
    }

    fn health(&self) -> Response {
        Response::json(
            200,
            &HealthResponse {
                success: true,
                status: "healthy".into(),
                worker: "vm-api-worker".into(),
                timestamp: self.clock.now(),
            },
        )
    }

    fn stats(&self) -> StatsResponse {
        StatsResponse {
            success: true,
            worker: "vm-api-worker".into(),
            since: self.config.started_at,
            ops: self.counters.snapshot(),
            buffered_by_server: None,
            buffered_total: None,
        }
    }

    async fn create_task(&self, request: &Request, caller: &Caller) -> Result<Response, AppError> {
        let body = request.json_value()?;
        let mut operation = Operation::parse(&body)?;
        let callback_url = self.config.webhooks.callback_url(body.get("callbackUrl"))?;
        let idempotency = match request.get_header("idempotency-key") {
            Some(key) => Some(self.idempotency_lookup(key, &body, caller).await?),
            None => None,
        };
        if let Some(Idempotency::Replay(task)) = idempotency {
            return Ok(created_response(200, &task, Vec::new()));
        }
        let now = self.clock.now();
        let id = self.ids.task_id(now);
        let vm_name = operation.vm_name().to_owned();
        let registry = self.tasks.vm(&vm_name).await?;
        let target_server = self.route(&operation, registry.as_ref())?;
        if let Operation::SnapshotVm(snapshot) = &mut operation {
            // Arrakis snapshot ids are global and single-use: give each task a fresh one.
            snapshot.snapshot_id.get_or_insert_with(|| format!("{vm_name}-{}", &id.simple().to_string()[20..]));
        }
        let mut task = Task {
            id,
            operation,
            status: TaskStatus::Pending,
            target_server,
            previous_task_id: registry.as_ref().map(|r| r.last_task_id),
            created_at: now,
            updated_at: now,
            attempts: 0,
            claim: None,
            result: None,
            error: None,
            callback_url,
            gen: 0,
            timeline: Vec::new(),
        };
        task.record(now, "api", TimelineEvent::Created, None, format!("queued for server {}", task.target_server));
        self.store_and_queue(&mut task, &idempotency).await?;
        // The task is queued and will run: from here on the answer is 202 whatever fails.
        // The registry is a hot key (two POSTs for one VM within a second), so its write waits
        // the window out; should it still fail, the next submission for the VM rewrites it,
        // and per-VM order holds through creation order in the daemon's listing meanwhile.
        // One read beside it, not after it (a KV round trip less on every POST): when a host
        // last reported for the server (a failed read warns of nothing). Not beside saving and
        // queueing: measured, that slowed the KV mode's throughput by a tenth (109–120 → 93–102
        // tasks/s, five runs), this by nothing.
        let (_, seen) = futures::future::join(
            self.note_in_registry(&task, registry),
            hosts::last_seen(&self.buffer.kv, &task.target_server),
        )
        .await;
        let warnings = match seen {
            Ok(seen) => hosts::unserved_warning(seen, &task.target_server, self.clock.now(), self.host_live_secs())
                .into_iter()
                .collect(),
            Err(_) => Vec::new(),
        };
        Ok(created_response(202, &task, warnings))
    }

    /// Saves a new task and queues it: the idempotency record first (once the queue has the
    /// task, a retry with the same key must find it, whatever fails after; a record whose task
    /// was never saved is harmless: the lookup finds no task and takes the key as new), then
    /// the task record, then the message. A task the queue refuses is saved as failed.
    async fn store_and_queue(&self, task: &mut Task, idempotency: &Option<Idempotency>) -> Result<(), AppError> {
        if let Some(Idempotency::New { key_hash, body_hash }) = idempotency {
            let record = IdempotencyRecord { task_id: task.id, body_hash: body_hash.clone() };
            let key = crate::keys::idempotency(key_hash);
            paced(&self.clock, || self.tasks.put_json(&key, &record)).await?;
        }
        self.save(task).await?;
        let message =
            if self.config.records_in_messages { QueueMessage::with_record(task) } else { QueueMessage::of(task) };
        if let Err(e) = self.queue.send(&message).await {
            // The client gets a readable terminal task, never a silently lost one.
            task.record(self.clock.now(), "api", TimelineEvent::QueueFailed, Some(TaskStatus::Failed), e.to_string());
            task.error = Some(format!("could not be queued: {e}"));
            self.save(task).await?;
            let id = task.id;
            return Err(AppError::Unavailable(format!("task {id} could not be queued and was marked failed: {e}")));
        }
        Ok(())
    }

    /// Notes a queued task in its VM's registry entry.
    async fn note_in_registry(&self, task: &Task, registry: Option<VmRecord>) -> Result<(), AppError> {
        let record = match registry {
            Some(mut record) => {
                // Folding reads the unfinished lifecycle tasks; the status route folds on every
                // read anyway, so a POST folds only when the list must make room.
                if record.is_full_for(task.kind()) {
                    self.fold_registry(&mut record).await?;
                }
                record.push_task(task);
                record
            }
            None => VmRecord::new_for(task),
        };
        paced(&self.clock, || self.tasks.save_vm(&record)).await
    }

    /// Which server runs the task: the request's, else the registry's, else the default.
    fn route(&self, operation: &Operation, registry: Option<&VmRecord>) -> Result<String, AppError> {
        if let Some(server) = operation.requested_server() {
            return Ok(server.to_owned());
        }
        if let Some(record) = registry {
            return Ok(record.server.clone());
        }
        self.config.default_target_server.clone().ok_or_else(|| AppError::Unprocessable {
            code: "no_target_server",
            message: format!(
                "payload.targetServer is required: VM {:?} is not in the registry and no DEFAULT_TARGET_SERVER is configured",
                operation.vm_name()
            ),
            field: Some("payload.targetServer".into()),
        })
    }

    /// Finds what an Idempotency-Key created. Keys are scoped per client token, so one client
    /// cannot learn another's task id (or be refused) by reusing its key.
    async fn idempotency_lookup(&self, key: &str, body: &Value, caller: &Caller) -> Result<Idempotency, AppError> {
        if key.is_empty() || key.len() > Limits::IDEMPOTENCY_KEY_MAX || !key.bytes().all(|b| (0x21..0x7f).contains(&b))
        {
            return Err(AppError::BadRequest {
                code: "invalid_idempotency_key",
                message: format!(
                    "Idempotency-Key must be 1 to {} visible ASCII characters",
                    Limits::IDEMPOTENCY_KEY_MAX
                ),
                field: Some("Idempotency-Key".into()),
            });
        }
        let scope = match caller {
            Caller::Client { scope } => scope.as_str(),
            Caller::Anonymous | Caller::Consumer { .. } => "",
        };
        let key_hash = auth::sha256_hex(format!("{scope}\n{key}").as_bytes());
        let body_hash = auth::sha256_hex(canonical_json(body).as_bytes());
        let existing: Option<IdempotencyRecord> = self.tasks.get_json(&crate::keys::idempotency(&key_hash)).await?;
        match existing {
            None => Ok(Idempotency::New { key_hash, body_hash }),
            Some(record) if record.body_hash == body_hash => match self.tasks.load(record.task_id).await? {
                Some(task) => Ok(Idempotency::Replay(Box::new(task))),
                None => Ok(Idempotency::New { key_hash, body_hash }),
            },
            Some(record) => Err(AppError::Unprocessable {
                code: "idempotency_key_reused",
                message: format!("Idempotency-Key was already used for task {} with a different body", record.task_id),
                field: Some("Idempotency-Key".into()),
            }),
        }
    }

    /// `GET /vm/tasks`: newest first, filtered on listing metadata ([`crate::listing`]).
    async fn list_tasks(&self, request: &Request) -> Result<Response, AppError> {
        let limit =
            listing::limit_param(request.query_param("limit"), Limits::LIST_LIMIT_DEFAULT, Limits::LIST_LIMIT_MAX)?;
        let status = match filter_param(request, "status") {
            None => None,
            Some(raw) => Some(TaskStatus::parse(raw).ok_or_else(|| {
                let known: Vec<&str> = TaskStatus::ALL.iter().map(|s| s.as_str()).collect();
                AppError::invalid_field(FieldError::new(
                    "status",
                    format!("must be one of {}, got {raw:?}", known.join(", ")),
                ))
            })?),
        };
        let kind = match filter_param(request, "type") {
            None => None,
            Some(raw) => Some(OperationKind::parse(raw).ok_or_else(|| {
                let known: Vec<&str> = OperationKind::ALL.iter().map(|k| k.as_str()).collect();
                AppError::invalid_field(FieldError::new(
                    "type",
                    format!("must be one of {}, got {raw:?}", known.join(", ")),
                ))
            })?),
        };
        let vm_name = filter_param(request, "vmName");
        if let Some(name) = vm_name {
            validate::check_vm_name("vmName", name)?;
        }
        let server = filter_param(request, "targetServer");
        if let Some(name) = server {
            validate::check_server_name("targetServer", name)?;
        }
        let from = self.position(request).await?;
        let filtered = status.is_some() || kind.is_some() || vm_name.is_some() || server.is_some();
        let keep = |key: &KvKey| {
            let Some(t) = key.metadata.as_ref().and_then(|m| serde_json::from_value::<TaskSummary>(m.clone()).ok())
            else {
                return false;
            };
            status.is_none_or(|s| t.status == s)
                && kind.is_none_or(|k| t.kind == k)
                && vm_name.is_none_or(|v| t.vm_name == v)
                && server.is_none_or(|v| t.target_server == v)
        };
        let scan = listing::scan(&self.tasks.kv, crate::keys::TASK_PREFIX, from, limit, filtered, keep).await?;
        let tasks: Vec<TaskSummary> = scan
            .matched
            .iter()
            .filter_map(|k| k.metadata.clone().and_then(|m| serde_json::from_value(m).ok()))
            .collect();
        let cursor = self.next_cursor(scan.next.as_ref()).await?;
        Ok(Response::json(
            200,
            &ListTasksResponse {
                success: true,
                count: tasks.len(),
                tasks,
                list_complete: cursor.is_none(),
                cursor,
                partial: scan.partial,
                scanned: filtered.then_some(scan.scanned),
            },
        ))
    }

    /// `GET /vms`: the registry by VM name, filtered by `server` and `state`. The listed state
    /// folds in each VM's unsettled lifecycle tasks, as `GET /vm/{vmName}/status` does, within
    /// [`VM_LIST_READS_MAX`] reads per request; VMs past that are answered `settled: false`.
    async fn list_vms(&self, request: &Request) -> Result<Response, AppError> {
        let limit = listing::limit_param(request.query_param("limit"), Limits::LIST_LIMIT_DEFAULT, VM_LIST_LIMIT_MAX)?;
        let server = filter_param(request, "server");
        if let Some(name) = server {
            validate::check_server_name("server", name)?;
        }
        let state = match filter_param(request, "state") {
            None => None,
            Some(raw) => Some(VmState::from_arrakis(&raw.to_ascii_uppercase()).ok_or_else(|| {
                AppError::invalid_field(FieldError::new(
                    "state",
                    format!("must be one of RUNNING, PAUSED, STOPPED, DELETED, got {raw:?}"),
                ))
            })?),
        };
        let from = self.position(request).await?;
        let filtered = server.is_some() || state.is_some();
        // An unsettled VM's state may change when folded, so the state filter is applied to
        // it only after folding (the page may then hold fewer than `limit` VMs).
        let keep =
            |key: &KvKey| match key.metadata.as_ref().and_then(|m| serde_json::from_value::<VmSummary>(m.clone()).ok())
            {
                None => true, // written before entries carried metadata: decided after reading it
                Some(vm) => {
                    server.is_none_or(|s| vm.server == s)
                        && (vm.unsettled > 0 || state.is_none_or(|s| vm.state == Some(s)))
                }
            };
        let scan = listing::scan(&self.tasks.kv, crate::keys::VM_PREFIX, from, limit, filtered, keep).await?;
        let mut reads_left = VM_LIST_READS_MAX;
        let mut vms = Vec::with_capacity(scan.matched.len());
        for key in &scan.matched {
            let listed = key.metadata.as_ref().and_then(|m| serde_json::from_value::<VmSummary>(m.clone()).ok());
            let summary = match listed {
                Some(vm) if vm.unsettled == 0 => vm,
                Some(vm) if reads_left < vm.unsettled + 1 => VmSummary { settled: false, ..vm },
                _ if reads_left == 0 => continue,
                _ => {
                    reads_left -= 1;
                    let Some(mut record) = self.tasks.get_json::<VmRecord>(&key.name).await? else { continue };
                    reads_left = reads_left.saturating_sub(record.pending_lifecycle.len());
                    self.fold_registry(&mut record).await?;
                    VmSummary { settled: true, ..record.summary() }
                }
            };
            let server_ok = server.is_none_or(|s| summary.server == s);
            if server_ok && state.is_none_or(|s| summary.state == Some(s)) {
                vms.push(summary);
            }
        }
        let cursor = self.next_cursor(scan.next.as_ref()).await?;
        Ok(Response::json(
            200,
            &ListVmsResponse {
                success: true,
                count: vms.len(),
                vms,
                list_complete: cursor.is_none(),
                cursor,
                partial: scan.partial,
                scanned: filtered.then_some(scan.scanned),
            },
        ))
    }

    /// `GET /hosts?server=`: the host registry with liveness ([`crate::hosts`]).
    async fn list_hosts(&self, request: &Request) -> Result<Response, AppError> {
        let server = hosts::server_filter(request)?;
        let records = hosts::list(&self.buffer.kv, server, HOST_LIST_PAGES_MAX).await?;
        let now = self.clock.now();
        let live_secs = self.host_live_secs();
        let hosts: Vec<HostEntry> = records
            .into_iter()
            .map(|record| HostEntry {
                live: hosts::is_live(record.last_seen, now, live_secs),
                last_seen_secs_ago: now.millis_since(record.last_seen) / 1000,
                record,
            })
            .collect();
        Ok(Response::json(
            200,
            &ListHostsResponse { success: true, count: hosts.len(), hosts, live_within_secs: live_secs },
        ))
    }

    fn host_live_secs(&self) -> u64 {
        match self.config.host_live_secs {
            0 => crate::HOST_LIVE_SECS_DEFAULT,
            secs => secs,
        }
    }

    /// The listing position in the request's signed `cursor`.
    async fn position(&self, request: &Request) -> Result<listing::Position, AppError> {
        Ok(match request.query_param("cursor") {
            None | Some("") => listing::Position::default(),
            Some(signed) => listing::Position::decode(&auth::verify_cursor(&self.cursor_secret().await?, signed)?),
        })
    }

    /// The signed cursor for the next page, if any.
    async fn next_cursor(&self, next: Option<&listing::Position>) -> Result<Option<String>, AppError> {
        Ok(match next {
            Some(at) => Some(auth::sign_cursor(&self.cursor_secret().await?, &at.encode())),
            None => None,
        })
    }

    /// Loads a task, waiting up to `?wait=N` seconds for it to become terminal.
    async fn get_waiting(&self, raw_id: &str, request: &Request) -> Result<Task, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let wait_secs = match request.query_param("wait") {
            None => 0,
            Some(raw) => raw.parse::<u64>().ok().filter(|n| *n <= Limits::WAIT_MAX_SECS).ok_or_else(|| {
                AppError::invalid_field(FieldError::new(
                    "wait",
                    format!("must be whole seconds from 0 to {}, got {raw:?}", Limits::WAIT_MAX_SECS),
                ))
            })?,
        };
        let deadline = self.clock.now().plus_secs(wait_secs);
        loop {
            let task = self.tasks.require(id).await?;
            let now = self.clock.now();
            if task.status.is_terminal() || now >= deadline {
                return Ok(task);
            }
            self.clock.sleep_ms(self.config.wait_poll_ms.max(10).min(deadline.millis_since(now))).await;
        }
    }

    async fn update_status(&self, raw_id: &str, request: &Request, caller: &Caller) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let named = caller.named_server(request)?;
        let update: UpdateStatusRequest = request.json()?;
        let mut task = self.tasks.require(id).await?;
        caller.check_server(&task.target_server)?;
        crate::auth::on_named_server(&task, named)?;
        if !task.is_claimed_by(update.claim_id) {
            return Err(AppError::Conflict {
                message: format!(
                    "claim {} does not hold task {id}; only the consumer holding its current claim may report on it",
                    update.claim_id
                ),
                current_status: Some(task.status),
                lease_expires_at: task.claim.as_ref().map(|c| c.lease_expires_at),
            });
        }
        if task.status == update.status {
            // A repeated report (the daemon retried after a lost response): nothing to write.
            return Ok(Response::json(200, &status_response(&task, "status unchanged")));
        }
        if update.status == TaskStatus::Pending {
            return Err(AppError::conflict("a task goes back to pending only by release or lease expiry", task.status));
        }
        task.status.check_transition(update.status).map_err(|e| AppError::conflict(e.to_string(), task.status))?;
        let consumer = task.claim.as_ref().map(|c| c.consumer_id.clone()).unwrap_or_default();
        for retry in &update.retries {
            task.timeline.push(vm_task_types::TimelineEntry {
                at: retry.at,
                actor: consumer.clone(),
                event: TimelineEvent::Retry.as_str().into(),
                from: None,
                to: None,
                message: format!("attempt {} failed: {}", retry.attempt, retry.error),
            });
        }
        task.result = update.result.clone().or(task.result.take());
        task.error = update.error.clone().or(task.error.take());
        let message = update.message.clone().or_else(|| update.error.clone()).unwrap_or_default();
        let event = match update.status {
            TaskStatus::Completed => TimelineEvent::Completed,
            TaskStatus::Failed => TimelineEvent::Failed,
            // A long command the client cancelled while it ran: the daemon stopped it in the
            // guest. Only with the client's intent on record (DELETE wrote it).
            TaskStatus::Cancelled => match self.tasks.cancel_intent(id).await? {
                Some(intent) => {
                    task.error = Some(intent.message);
                    TimelineEvent::Cancelled
                }
                None => {
                    return Err(AppError::conflict(
                        "a daemon reports cancelled only for a task its client asked to cancel",
                        task.status,
                    ))
                }
            },
            other @ (TaskStatus::Pending | TaskStatus::Processing) => {
                return Err(AppError::conflict(format!("a daemon cannot report {other}"), task.status))
            }
        };
        task.record(self.clock.now(), &consumer, event, Some(update.status), message);
        self.save(&task).await?;
        if task.status.is_terminal() {
            self.unbuffer(&task.target_server, id).await?;
        }
        Ok(Response::json(200, &status_response(&task, "status updated")))
    }

    /// Cancels a pending task, racing any claim through intents ([`crate::intents`]): 200
    /// only when no claim can take the task any more, 409 when a claim took it, 202
    /// `cancel_requested` when a claim in flight did not decide within [`CANCEL_WAIT_MS`].
    async fn cancel_task(&self, raw_id: &str) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let task = self.tasks.require(id).await?;
        match task.status {
            TaskStatus::Cancelled => {
                return Ok(Response::json(200, &status_response(&task, "task was already cancelled")))
            }
            TaskStatus::Pending => {}
            TaskStatus::Processing if is_long_command(&task) => return self.cancel_running(task).await,
            other => return Err(not_cancellable(id, other)),
        }
        if self.config.kv_propagation_secs > 0 {
            return self.cancel_across_locations(task).await;
        }
        let intent = CancelIntent { at: self.clock.now(), message: "cancelled by client".into() };
        paced(&self.clock, || self.tasks.put_cancel_intent(id, &intent)).await?;
        let Some(claim) = self.tasks.claim_intent(id).await? else {
            // No claim has begun: every later one reads our intent and yields.
            return self.finish_cancel(task, &intent).await;
        };
        let deadline = self.clock.now().plus_millis(CANCEL_WAIT_MS);
        let mut task = task;
        loop {
            match claim_outcome(&task, &claim) {
                ClaimOutcome::Settled => return self.finish_cancel(task, &intent).await,
                ClaimOutcome::Yielded => return Ok(Response::json(200, &status_response(&task, "task cancelled"))),
                ClaimOutcome::Proceeded(status) => {
                    // Our intent must not cancel the task later, against this answer.
                    paced(&self.clock, || self.tasks.drop_cancel_intent(id)).await?;
                    return Err(not_cancellable(id, status));
                }
                ClaimOutcome::InFlight => {}
            }
            let now = self.clock.now();
            if now >= deadline {
                return Ok(Response::json(202, &CancelRequestedResponse::claim_in_flight(id)));
            }
            self.clock.sleep_ms(CANCEL_POLL_MS.min(deadline.millis_since(now))).await;
            task = self.tasks.require(id).await?;
        }
    }

    /// A pending task's cancel where a claim may be served at another location
    /// (`KV_PROPAGATION_SECONDS` > 0): the intent goes on record (once) and the answer is 202
    /// `cancel_requested` until the cancel is certain ([`crate::intents::settle_cancel`]);
    /// a DELETE made after that settles it: 200 cancelled, or 409 with what the task became.
    async fn cancel_across_locations(&self, task: Task) -> Result<Response, AppError> {
        let id = task.id;
        let now = self.clock.now();
        let intent = match self.tasks.cancel_intent(id).await? {
            Some(intent) => intent,
            None => {
                let intent = CancelIntent { at: now, message: "cancelled by client".into() };
                paced(&self.clock, || self.tasks.put_cancel_intent(id, &intent)).await?;
                intent
            }
        };
        let propagation = self.config.kv_propagation_secs;
        match settle_cancel(&task, &intent, now, propagation) {
            CancelSettlement::Wait { until } => {
                Ok(Response::json(202, &CancelRequestedResponse::until(id, until, propagation)))
            }
            settlement @ (CancelSettlement::Cancel | CancelSettlement::FailUnknown) => {
                let task =
                    apply_cancel_settlement(&self.tasks, &self.buffer, &self.clock, task, &intent, settlement).await?;
                match task.status {
                    TaskStatus::Cancelled => Ok(Response::json(200, &status_response(&task, "task cancelled"))),
                    other => Err(AppError::conflict(task.error.clone().unwrap_or_default(), other)),
                }
            }
            CancelSettlement::ClaimWon(status) => Err(not_cancellable(id, status)),
        }
    }

    /// Shows a standing cancel intent on the task's timeline (`cancel_requested`), so the
    /// client's request is visible while a claim it raced has not settled. Only the view: the
    /// record is written by whichever side ends the race.
    async fn merge_cancel_intent(&self, task: &mut Task) -> Result<(), AppError> {
        if task.status.is_terminal() {
            return Ok(());
        }
        if let Some(intent) = self.tasks.cancel_intent(task.id).await? {
            task.timeline.push(vm_task_types::TimelineEntry {
                at: intent.at,
                actor: "client".into(),
                event: TimelineEvent::CancelRequested.as_str().into(),
                from: None,
                to: None,
                message: intent.message,
            });
            task.timeline.sort_by_key(|e| e.at);
        }
        Ok(())
    }

    /// Cancels a long command while it runs: the intent goes on record, and the daemon holding
    /// the claim learns of it from its next heartbeat's answer, stops the command in the guest
    /// and reports the task `cancelled` with the output so far. 202: the outcome follows.
    async fn cancel_running(&self, task: Task) -> Result<Response, AppError> {
        let id = task.id;
        if self.tasks.cancel_intent(id).await?.is_none() {
            let intent = CancelIntent { at: self.clock.now(), message: "cancelled by client while running".into() };
            paced(&self.clock, || self.tasks.put_cancel_intent(id, &intent)).await?;
        }
        Ok(Response::json(202, &CancelRequestedResponse::running(id)))
    }

    /// The cancel won: the record becomes cancelled and the buffer entry goes.
    async fn finish_cancel(&self, mut task: Task, intent: &CancelIntent) -> Result<Response, AppError> {
        task.record(intent.at, "client", TimelineEvent::Cancelled, Some(TaskStatus::Cancelled), &intent.message);
        task.error = Some(intent.message.clone());
        self.save(&task).await?;
        // Best effort: a claim attempt would also find the task cancelled and drop the entry.
        self.unbuffer(&task.target_server, task.id).await?;
        Ok(Response::json(200, &status_response(&task, "task cancelled")))
    }

    async fn vm_status(&self, vm_name: &str) -> Result<Response, AppError> {
        validate::check_vm_name("vmName", vm_name)?;
        let mut record = self
            .tasks
            .vm(vm_name)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("VM {vm_name:?} is not in the registry")))?;
        let last = match self.fold_registry(&mut record).await? {
            Some(last) => Some(last),
            None => self.tasks.load(record.last_task_id).await?,
        };
        let known = record.known.clone();
        Ok(Response::json(
            200,
            &VmStatusResponse {
                success: true,
                vm_name: record.vm_name.clone(),
                server: record.server.clone(),
                state: known.as_ref().map(|k| k.state),
                ip: known.as_ref().and_then(|k| k.ip.clone()),
                port_forwards: known.as_ref().and_then(|k| k.port_forwards.clone()),
                state_task_id: known.as_ref().map(|k| k.task_id),
                last_task_id: record.last_task_id,
                last_task_status: last.as_ref().map(|t| t.status).unwrap_or(TaskStatus::Pending),
                last_task_kind: record.last_task_kind,
                updated_at: last.map(|t| t.updated_at).unwrap_or(record.updated_at),
            },
        ))
    }

    /// Folds finished lifecycle tasks into the record's known state, oldest first. Returns the
    /// VM's last task when folding read it, so the caller need not read it again.
    async fn fold_registry(&self, record: &mut VmRecord) -> Result<Option<Task>, AppError> {
        let mut folded = 0;
        let mut last = None;
        for id in record.pending_lifecycle.clone() {
            let task = self.tasks.load(id).await?;
            let stop = task.as_ref().is_some_and(|task| record.fold(task) == Fold::Stop);
            if id == record.last_task_id {
                last = task;
            }
            if stop {
                break;
            }
            folded += 1;
        }
        record.pending_lifecycle.drain(..folded);
        Ok(last)
    }

    fn preflight(&self, request: &Request) -> Response {
        match self.config.cors.allow_origin(request) {
            Some(origin) => Response::empty(204)
                .with_header("access-control-allow-origin", &origin)
                .with_header("access-control-allow-methods", "GET, POST, PUT, DELETE, OPTIONS")
                .with_header("access-control-allow-headers", "authorization, content-type, idempotency-key")
                .with_header("access-control-max-age", "600")
                .with_header("vary", "origin"),
            None => Response::from(AppError::Unauthorized("origin is not allowed".into())),
        }
    }

    fn with_cors(&self, request: &Request, response: Response) -> Response {
        if request.path == "/health" {
            return response.with_header("access-control-allow-origin", "*");
        }
        match self.config.cors.allow_origin(request) {
            Some(origin) => response.with_header("access-control-allow-origin", &origin).with_header("vary", "origin"),
            None => response,
        }
    }
}

enum Idempotency {
    New { key_hash: String, body_hash: String },
    Replay(Box<Task>),
}

/// A `run_command` that outlives one Arrakis call: the only kind a client can cancel while
/// it runs, because the daemon watches it and can stop it.
pub(crate) fn is_long_command(task: &Task) -> bool {
    matches!(&task.operation, Operation::RunCommand(cmd) if cmd.is_long())
}

fn not_cancellable(id: Uuid, status: TaskStatus) -> AppError {
    AppError::conflict(
        format!(
            "task {id} is {status}; only a pending task can be cancelled, or a running command with \
             timeoutSeconds over 30"
        ),
        status,
    )
}

fn created_response(status: u16, task: &Task, warnings: Vec<String>) -> Response {
    let body = CreateTaskResponse {
        success: true,
        task_id: task.id,
        status: task.status,
        message: format!("{} task queued successfully", task.kind().describe()),
        kind: task.kind(),
        vm_name: task.vm_name().to_owned(),
        target_server: task.target_server.clone(),
        created_at: task.created_at,
        warnings,
    };
    Response::json(status, &body).with_header("location", &format!("/vm/tasks/{}", task.id))
}

fn status_response(task: &Task, message: &str) -> UpdateStatusResponse {
    UpdateStatusResponse { success: true, task_id: task.id, status: task.status, message: message.to_owned() }
}

fn index() -> Response {
    Response::json(
        200,
        &serde_json::json!({
            "success": true,
            "name": "vm-api-worker",
            "description": "VM task queue: submit VM operations, follow them to completion",
            "endpoints": API_ROUTES.iter().map(|(m, p)| format!("{m} {p}")).collect::<Vec<_>>(),
            "operations": vm_task_types::OperationKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
        }),
    )
}

/// JSON with object keys sorted at every level, so equal bodies hash equal.
fn canonical_json(value: &Value) -> String {
    fn sort(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), sort(v))).collect())
            }
            Value::Array(items) => Value::Array(items.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(value).to_string()
}
