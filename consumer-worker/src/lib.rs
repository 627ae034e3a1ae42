//! The consumer worker: a thin adapter from workers-rs to
//! [`vm_task_edge::consumer::ConsumerService`] for HTTP, queue batches and the cron trigger.
//!
//! Bindings (names match `wrangler-consumer.toml`): KV `TASK_BUFFER` (per-server buffer and
//! doorbells), KV `TASK_STORAGE` (task records: the claim is recorded there), consumer of
//! `vm-task-queue` and of its dead letter queue `vm-task-dlq`, producer (`VM_WEBHOOK_QUEUE`)
//! and consumer of `vm-webhook-queue` and consumer of its dead letter queue `vm-webhook-dlq`
//! ([`vm_task_edge::webhooks`]), Durable Object class `HostQueueObject` (binding `HOST_QUEUE`).
//!
//! `DISPATCH_MODE = "durable"` hands each queued task to its server's `HostQueueObject` and
//! sends the daemon's routes there ([`host_queue::front`]); `"kv"` (the default) buffers in KV.

mod host_queue_object;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use host_queue::front::{connect_route, ConsumerFront};
pub use host_queue_object::HostQueueObject;

use serde_json::Value;
use vm_task_edge::{
    auth::Tokens,
    consumer::{ConsumerConfig, ConsumerService, Delivery},
    counting::{CountingKv, OpCounters},
    store::{BufferStore, TaskStore},
    webhooks::{Disposition, WebhookConfig, WebhookDelivery, WebhookMessage, WebhookProducer, WebhookSecret},
    Clock,
};
use vm_task_types::Timestamp;
use worker::{
    event, Context, Env, MessageBatch, MessageExt, QueueRetryOptionsBuilder, ScheduleContext, ScheduledEvent,
};
use worker_glue::{
    durable::DurableQueues, number, read_body, request_head, setting, to_worker_response, WorkerClock, WorkerFetch,
    WorkerIds, WorkerKv, WorkerWebhookQueue,
};

const TASK_STORAGE: &str = "TASK_STORAGE";
const TASK_BUFFER: &str = "TASK_BUFFER";
const HOST_QUEUE: &str = "HOST_QUEUE";
const VM_WEBHOOK_QUEUE: &str = "VM_WEBHOOK_QUEUE";
/// The webhook queue and its dead letter queue, as `wrangler-consumer.toml` names them.
const WEBHOOK_QUEUE_NAME: &str = "vm-webhook-queue";
const WEBHOOK_DLQ_NAME: &str = "vm-webhook-dlq";

pub(crate) static COUNTERS: OpCounters = OpCounters::new();
static STARTED_AT: AtomicU64 = AtomicU64::new(0);

/// The worker's settings, and the problem with `CONSUMER_TOKENS` if it has one: HTTP requests
/// are then refused naming it (no token is accepted), while queue batches and the sweep,
/// which need no token, go on.
pub(crate) fn config(env: &Env) -> (ConsumerConfig, Option<String>) {
    let now = WorkerClock.now().as_millis();
    let _ = STARTED_AT.compare_exchange(0, now, Relaxed, Relaxed);
    let defaults = ConsumerConfig::default();
    let (consumer_tokens, problem) = match Tokens::parse_bound(&setting(env, "CONSUMER_TOKENS")) {
        Ok(tokens) => (tokens, None),
        Err(problem) => (Tokens::default(), Some(problem)),
    };
    let (webhooks, problem) =
        match WebhookConfig::parse(&setting(env, "WEBHOOK_URLS"), &setting(env, "WEBHOOK_ALLOW_HTTP_HOSTS")) {
            Ok(webhooks) => (webhooks, problem),
            Err(bad) => (WebhookConfig::default(), problem.or(Some(bad))),
        };
    let config = ConsumerConfig {
        consumer_tokens,
        max_attempts: number(env, "MAX_ATTEMPTS", defaults.max_attempts as u64) as u32,
        lease_default_secs: number(env, "LEASE_SECONDS", defaults.lease_default_secs),
        lease_min_secs: number(env, "MIN_LEASE_SECONDS", defaults.lease_min_secs),
        lease_max_secs: number(env, "MAX_LEASE_SECONDS", defaults.lease_max_secs),
        bell_check_ms: number(env, "BELL_CHECK_MS", defaults.bell_check_ms),
        max_wait_secs: number(env, "MAX_WAIT_SECONDS", defaults.max_wait_secs),
        max_queued_secs: number(env, "MAX_QUEUED_SECONDS", defaults.max_queued_secs),
        started_at: Timestamp(STARTED_AT.load(Relaxed)),
        retry_delay_secs: number(env, "QUEUE_RETRY_DELAY_SECONDS", defaults.retry_delay_secs as u64) as u32,
        fault_fail_buffering_vm: Some(setting(env, "FAULT_FAIL_BUFFERING_VM")).filter(|v| !v.is_empty()),
        rebuffer_after_secs: number(env, "REBUFFER_AFTER_SECONDS", defaults.rebuffer_after_secs),
        kv_propagation_secs: number(env, "KV_PROPAGATION_SECONDS", defaults.kv_propagation_secs),
        webhooks,
    };
    (config, problem)
}

type Service<'a> =
    ConsumerService<'a, CountingKv<'static, WorkerKv>, CountingKv<'static, WorkerKv>, WorkerClock, WorkerIds>;

/// `TASK_STORAGE` whose terminal writes (sweep, dead letters, host queue objects) queue the
/// task's webhooks.
pub(crate) fn task_store(
    env: &Env,
    webhooks: &WebhookConfig,
) -> worker::Result<TaskStore<CountingKv<'static, WorkerKv>>> {
    Ok(TaskStore::with_webhooks(
        CountingKv::new(WorkerKv(env.kv(TASK_STORAGE)?), &COUNTERS),
        Box::new(WebhookProducer {
            queue: WorkerWebhookQueue(env.queue(VM_WEBHOOK_QUEUE)?),
            clock: WorkerClock,
            config: webhooks.clone(),
        }),
    ))
}

fn service<'a>(env: &Env, config: &'a ConsumerConfig) -> worker::Result<Service<'a>> {
    Ok(ConsumerService {
        tasks: task_store(env, &config.webhooks)?,
        buffer: BufferStore::new(CountingKv::new(WorkerKv(env.kv(TASK_BUFFER)?), &COUNTERS)),
        clock: WorkerClock,
        ids: WorkerIds,
        config,
        counters: &COUNTERS,
    })
}

/// `DISPATCH_MODE`: `durable` sends each server's tasks through its `HostQueueObject`.
fn durable_mode(env: &Env) -> bool {
    setting(env, "DISPATCH_MODE").trim() == "durable"
}

#[event(fetch)]
async fn fetch(req: worker::Request, env: Env, _ctx: Context) -> worker::Result<worker::Response> {
    let mut request = request_head(&req)?;
    let (config, problem) = config(&env);
    if let Some(problem) = problem {
        return to_worker_response(vm_task_edge::http::Response::misconfigured(&problem));
    }
    let service = service(&env, &config)?;
    if durable_mode(&env) {
        match connect_route(&request, &config.consumer_tokens) {
            Ok(Some(server)) => return DurableQueues(env.durable_object(HOST_QUEUE)?).connect(&server, req).await,
            Ok(None) => {}
            Err(refused) => return to_worker_response(refused),
        }
    }
    // Route, token and Content-Length first: a refused body is never read.
    if let Some(refusal) = service.refuse_unread(&request) {
        return to_worker_response(refusal);
    }
    read_body(req, &mut request).await;
    let (method, path) = (request.method.clone(), request.path.clone());
    let durable = if durable_mode(&env) {
        let queues = DurableQueues(env.durable_object(HOST_QUEUE)?);
        let host_registry = CountingKv::new(WorkerKv(env.kv(TASK_BUFFER)?), &COUNTERS);
        let front = ConsumerFront::new(&service.tasks, &queues, &host_registry, &config, WorkerClock.now());
        front.handle(&request).await
    } else {
        None
    };
    let response = match durable {
        Some(response) => response,
        None => service.handle(request).await,
    };
    if response.status >= 500 {
        worker::console_error!("{method} {path} -> {}: {}", response.status, String::from_utf8_lossy(&response.body));
    }
    to_worker_response(response)
}

#[event(queue)]
async fn queue(batch: MessageBatch<Value>, env: Env, _ctx: Context) -> worker::Result<()> {
    let (config, _) = config(&env);
    let queue_name = batch.queue();
    if queue_name == WEBHOOK_QUEUE_NAME || queue_name == WEBHOOK_DLQ_NAME {
        return webhook_batch(batch, &env, &config, queue_name == WEBHOOK_DLQ_NAME).await;
    }
    let service = service(&env, &config)?;
    let messages = batch.messages()?;
    let bodies: Vec<Value> = messages.iter().map(|m| m.body().clone()).collect();
    let dead_letter_queue = setting(&env, "DEAD_LETTER_QUEUE");
    let is_dlq = batch.queue() == if dead_letter_queue.is_empty() { "vm-task-dlq" } else { dead_letter_queue.as_str() };
    let decisions = if is_dlq && durable_mode(&env) {
        dead_letter_durable(&env, &service, &config, &bodies).await?
    } else if is_dlq {
        service.dead_letter_batch(&bodies).await
    } else if durable_mode(&env) {
        hand_off_batch(&env, &service, &config, &bodies).await?
    } else {
        service.buffer_batch(&bodies).await
    };
    let (mut acks, mut retries) = (0, 0);
    for (message, decision) in messages.iter().zip(decisions) {
        match decision {
            Delivery::Ack => {
                message.ack();
                acks += 1;
            }
            Delivery::Retry { delay_secs } => {
                message.retry_with_options(&QueueRetryOptionsBuilder::new().with_delay_seconds(delay_secs).build());
                retries += 1;
            }
        }
    }
    COUNTERS.count_acks(acks, retries);
    if retries > 0 {
        worker::console_warn!("queue {}: {acks} buffered, {retries} retried", batch.queue());
    }
    Ok(())
}

/// Webhook deliveries: one attempt per message, the messages of one task in order (each
/// appends to the task's record), different tasks concurrently. Dead letters are recorded.
async fn webhook_batch(
    batch: MessageBatch<Value>,
    env: &Env,
    config: &ConsumerConfig,
    dead: bool,
) -> worker::Result<()> {
    let tasks = task_store(env, &config.webhooks)?;
    let secret = WebhookSecret::parse(&setting(env, "WEBHOOK_SECRET"));
    if let Err(problem) = &secret {
        worker::console_error!("webhooks not sent: {problem}");
    }
    let delivery = WebhookDelivery {
        tasks: &tasks,
        queue: WorkerWebhookQueue(env.queue(VM_WEBHOOK_QUEUE)?),
        fetch: WorkerFetch,
        clock: WorkerClock,
        secret: secret.ok(),
    };
    let messages = batch.messages()?;
    let mut by_task: Vec<(_, Vec<(usize, WebhookMessage)>)> = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        match serde_json::from_value::<WebhookMessage>(message.body().clone()) {
            Ok(webhook) => match by_task.iter_mut().find(|(id, _)| *id == webhook.task_id) {
                Some((_, group)) => group.push((index, webhook)),
                None => by_task.push((webhook.task_id, vec![(index, webhook)])),
            },
            Err(e) => worker::console_error!("unreadable webhook message dropped: {e}"),
        }
    }
    let delivery = &delivery;
    let groups = by_task.into_iter().map(|(_, group)| async move {
        let mut out = Vec::with_capacity(group.len());
        for (index, webhook) in group {
            let disposition = if dead {
                delivery.dead_lettered(&webhook).await;
                Disposition::Ack
            } else {
                delivery.deliver(&webhook).await
            };
            out.push((index, disposition));
        }
        out
    });
    let mut dispositions = vec![Disposition::Ack; messages.len()];
    for (index, disposition) in futures::future::join_all(groups).await.into_iter().flatten() {
        dispositions[index] = disposition;
    }
    for (message, disposition) in messages.iter().zip(dispositions) {
        match disposition {
            Disposition::Ack => message.ack(),
            Disposition::Retry { delay_secs } => {
                message.retry_with_options(&QueueRetryOptionsBuilder::new().with_delay_seconds(delay_secs).build())
            }
        }
    }
    Ok(())
}

/// The durable mode's queue handler: the batch's tasks to their servers' objects, one request
/// per object ([`ConsumerFront::hand_off_batch`]).
async fn hand_off_batch(
    env: &Env,
    service: &Service<'_>,
    config: &ConsumerConfig,
    bodies: &[Value],
) -> worker::Result<Vec<Delivery>> {
    let queues = DurableQueues(env.durable_object(HOST_QUEUE)?);
    let host_registry = CountingKv::new(WorkerKv(env.kv(TASK_BUFFER)?), &COUNTERS);
    let front = ConsumerFront::new(&service.tasks, &queues, &host_registry, config, WorkerClock.now());
    let handed = front.deliver_batch(bodies, config).await;
    for warning in &handed.warnings {
        worker::console_warn!("{warning}");
    }
    Ok(handed.deliveries)
}

/// The durable mode's dead letters: each to its object, which fails it unless it holds it.
async fn dead_letter_durable(
    env: &Env,
    service: &Service<'_>,
    config: &ConsumerConfig,
    bodies: &[Value],
) -> worker::Result<Vec<Delivery>> {
    let queues = DurableQueues(env.durable_object(HOST_QUEUE)?);
    let host_registry = CountingKv::new(WorkerKv(env.kv(TASK_BUFFER)?), &COUNTERS);
    let front = ConsumerFront::new(&service.tasks, &queues, &host_registry, config, WorkerClock.now());
    Ok(front.dead_letter_batch(bodies).await)
}

async fn reconcile(env: &Env, config: &ConsumerConfig) -> worker::Result<()> {
    let service = service(env, config)?;
    let queues = DurableQueues(env.durable_object(HOST_QUEUE)?);
    let host_registry = CountingKv::new(WorkerKv(env.kv(TASK_BUFFER)?), &COUNTERS);
    let front = ConsumerFront::new(&service.tasks, &queues, &host_registry, config, WorkerClock.now());
    let recovered = front
        .reconcile(WorkerClock.now(), config.rebuffer_after_secs, config.max_queued_secs + 86_400, 900)
        .await
        .map_err(worker::Error::RustError)?;
    if recovered > 0 {
        worker::console_log!("durable reconcile: {recovered} task(s) handed to their host queue again");
    }
    Ok(())
}

#[event(scheduled)]
async fn scheduled(_event: ScheduledEvent, env: Env, _ctx: ScheduleContext) {
    let (config, _) = config(&env);
    if durable_mode(&env) {
        // Leases end by each object's alarm and the KV buffer is not used: the cron only hands
        // tasks whose queue message was lost to their objects again.
        if let Err(e) = reconcile(&env, &config).await {
            worker::console_error!("durable reconcile failed: {e}");
        }
        return;
    }
    match service(&env, &config) {
        Ok(service) => match service.sweep().await {
            Ok(report) if report.returned_to_ready + report.failed + report.cleaned + report.rebuffered > 0 => {
                worker::console_log!("sweep: {report:?}")
            }
            Ok(_) => {}
            Err(e) => worker::console_error!("sweep failed: {e}"),
        },
        Err(e) => worker::console_error!("sweep could not start: {e}"),
    }
}
