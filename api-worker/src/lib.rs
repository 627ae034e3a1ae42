//! The API worker: a thin adapter from workers-rs to [`vm_task_edge::api::ApiService`].
//!
//! Bindings (names match `wrangler-api.toml`): KV `TASK_STORAGE` (task records, VM registry),
//! KV `TASK_BUFFER` (to drop a finished task's buffer entry), queue producer `VM_TASK_QUEUE`,
//! queue producer `VM_WEBHOOK_QUEUE` (terminal events, [`vm_task_edge::webhooks`]), Durable
//! Object namespace `HOST_QUEUE` (class of the consumer worker).
//!
//! `DISPATCH_MODE = "durable"`: cancels, daemon reports and `?wait` reads of live tasks go to
//! the task's server's host queue object ([`host_queue::front::ApiFront`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use host_queue::front::{hand_off_directly, ApiFront, HandoffQueue, Submissions};
use vm_task_edge::{
    api::{ApiConfig, ApiService},
    auth::{Cors, Tokens},
    counting::{CountingKv, CountingQueue, OpCounters},
    store::{BufferStore, TaskStore},
    webhooks::{WebhookConfig, WebhookProducer},
    Clock,
};
use worker::{event, Context, Env};
use worker_glue::{
    durable::DurableQueues, read_body, request_head, setting, to_worker_response, WorkerClock, WorkerIds, WorkerKv,
    WorkerQueue, WorkerWebhookQueue,
};

const TASK_STORAGE: &str = "TASK_STORAGE";
const TASK_BUFFER: &str = "TASK_BUFFER";
const VM_TASK_QUEUE: &str = "VM_TASK_QUEUE";
const VM_WEBHOOK_QUEUE: &str = "VM_WEBHOOK_QUEUE";
const HOST_QUEUE: &str = "HOST_QUEUE";

/// The OpenAPI document of both workers, served at `/openapi.json`.
const OPENAPI: &str = include_str!("../../openapi.json");

static COUNTERS: OpCounters = OpCounters::new();
/// Submissions (`POST`s) in progress in this instance: a task is handed to its object directly
/// only when its submission was alone ([`Submissions`]).
static SUBMISSIONS: Submissions = Submissions::new();
static STARTED_AT: AtomicU64 = AtomicU64::new(0);

/// The worker's settings, or the problem with one of them.
fn config(env: &Env) -> Result<ApiConfig, String> {
    let _ = STARTED_AT.compare_exchange(0, WorkerClock.now().as_millis(), Relaxed, Relaxed);
    Ok(ApiConfig {
        client_tokens: Tokens::parse(&setting(env, "API_TOKENS")),
        consumer_tokens: Tokens::parse_bound(&setting(env, "CONSUMER_TOKENS"))?,
        cors: Cors::parse(&setting(env, "ALLOWED_ORIGINS")),
        default_target_server: Some(setting(env, "DEFAULT_TARGET_SERVER")).filter(|s| !s.trim().is_empty()),
        // Empty: the edge generates a key and keeps it in KV (never derived from the tokens,
        // so rotating them keeps cursors valid).
        cursor_secret: setting(env, "CURSOR_SECRET").into_bytes(),
        wait_poll_ms: ApiConfig::wait_poll_ms(&setting(env, "WAIT_POLL_MS"))?,
        openapi: Some(OPENAPI),
        // Unset or unparsable: the edge's default (HOST_LIVE_SECS_DEFAULT).
        host_live_secs: setting(env, "HOST_LIVE_SECONDS").trim().parse().unwrap_or(0),
        started_at: vm_task_types::Timestamp(STARTED_AT.load(Relaxed)),
        records_in_messages: setting(env, "DISPATCH_MODE").trim() == "durable",
        // As the consumer worker reads it: unset is production's window.
        kv_propagation_secs: setting(env, "KV_PROPAGATION_SECONDS")
            .trim()
            .parse()
            .unwrap_or(vm_task_edge::KV_PROPAGATION_SECS),
        webhooks: WebhookConfig::parse(&setting(env, "WEBHOOK_URLS"), &setting(env, "WEBHOOK_ALLOW_HTTP_HOSTS"))?,
    })
}

#[event(fetch)]
async fn fetch(req: worker::Request, env: Env, ctx: Context) -> worker::Result<worker::Response> {
    let mut request = request_head(&req)?;
    let submission = (request.method == "POST").then(|| SUBMISSIONS.begin());
    let config = match config(&env) {
        Ok(config) => config,
        Err(problem) => return to_worker_response(vm_task_edge::http::Response::misconfigured(&problem)),
    };
    // The durable mode's objects: the front's, and the queue's direct hand-off of new tasks.
    let durable = setting(&env, "DISPATCH_MODE").trim() == "durable";
    let objects = if durable { Some(DurableQueues(env.durable_object(HOST_QUEUE)?)) } else { None };
    let service = ApiService {
        // Cancels and reports make tasks terminal here: those writes queue the task's webhooks.
        tasks: TaskStore::with_webhooks(
            CountingKv::new(WorkerKv(env.kv(TASK_STORAGE)?), &COUNTERS),
            Box::new(WebhookProducer {
                queue: WorkerWebhookQueue(env.queue(VM_WEBHOOK_QUEUE)?),
                clock: WorkerClock,
                config: config.webhooks.clone(),
            }),
        ),
        buffer: BufferStore::new(CountingKv::new(WorkerKv(env.kv(TASK_BUFFER)?), &COUNTERS)),
        queue: HandoffQueue::new(CountingQueue::new(WorkerQueue(env.queue(VM_TASK_QUEUE)?), &COUNTERS), durable),
        clock: WorkerClock,
        ids: WorkerIds,
        config: &config,
        counters: &COUNTERS,
    };
    // Route, token and Content-Length first: a refused body is never read.
    if let Some(refusal) = service.refuse_unread(&request) {
        return to_worker_response(refusal);
    }
    read_body(req, &mut request).await;
    let (method, path) = (request.method.clone(), request.path.clone());
    let fronted = if let Some(queues) = &objects {
        let front = ApiFront {
            tasks: &service.tasks,
            queues,
            client_tokens: &config.client_tokens,
            consumer_tokens: &config.consumer_tokens,
        };
        front.handle(&request).await
    } else {
        None
    };
    let response = match fronted {
        Some(response) => response,
        None => service.handle(request).await,
    };
    // A new task goes to its object once the client has its answer (the queue has it too),
    // unless other submissions are in progress: then the queue's batches carry it.
    let mut handoffs = service.queue.take_handoffs();
    if !submission.is_some_and(|s| s.alone()) {
        handoffs.clear();
    }
    // Fault injection for tests, as in the consumer: a task of this VM cannot be buffered.
    let fault_vm = setting(&env, "FAULT_FAIL_BUFFERING_VM");
    handoffs.retain(|task| fault_vm.trim().is_empty() || task.vm_name() != fault_vm.trim());
    if let (Some(objects), false) = (objects, handoffs.is_empty()) {
        ctx.wait_until(async move { hand_off_directly(&objects, handoffs).await });
    }
    if response.status >= 500 {
        worker::console_error!("{method} {path} -> {}: {}", response.status, String::from_utf8_lossy(&response.body));
    }
    to_worker_response(response)
}
