//! The consumer worker: buffers queued tasks per server ([`queue`]), lets each host's daemon
//! poll for them ([`polling`]), claim, renew and release them ([`leases`], deciding each claim
//! in the pure [`claim`]), and sweeps expired leases and lost tasks ([`sweep`]).
//!
//! The claim is the commit point: it moves the task record from `pending` to `processing`
//! under a lease, in the same write that reports it started. The buffer entry stays until the
//! task is terminal, so a daemon that dies mid-task finds its task again after the lease ends.

mod claim;
mod leases;
mod polling;
mod queue;
mod sweep;

use serde_json::Value;
use uuid::Uuid;
use vm_task_types::{validate, wire::HealthResponse, FieldError, Task, Timestamp};

pub use queue::Delivery;
pub use sweep::SweepReport;

use crate::{
    auth::{self, Caller, Tokens},
    counting::OpCounters,
    http::{Request, Response},
    routes::{ConsumerRoute, CONSUMER_ROUTES},
    store::{paced, BufferStore, TaskStore, KEY_WINDOW_WAIT_MS},
    AppError, Clock, Ids, KvStore,
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
    /// The shortest lease granted, whatever a claim asks. A claim elsewhere and the sweep read
    /// the record through caches up to 60 s stale, so a lease renewed in time can look expired
    /// there for up to 60 s plus one heartbeat interval (a third of the lease, as the daemon
    /// renews): 60 + L/3 < L needs L > 90 s. 120 s leaves a margin.
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
    /// fails, so its messages exhaust their retries and reach the dead letter queue. In the
    /// durable mode the API worker reads it too and skips its direct hand-off of such a task,
    /// so the queue stays its only way in. Unset in every shipped config.
    pub fault_fail_buffering_vm: Option<String>,
    /// `REBUFFER_AFTER_SECONDS`: a task in no buffer this long after its creation is taken to
    /// have lost its queue message (or its entry), and is buffered by the sweep; an entry
    /// unclaimed this long gets its doorbell rung again.
    pub rebuffer_after_secs: u64,
    /// `KV_PROPAGATION_SECONDS`: how long a KV write may take to be seen at another location
    /// ([`crate::KV_PROPAGATION_SECS`] in production). The sweep waits this long past a
    /// lease's end before it acts on it. The local stack, one strongly consistent location,
    /// sets 0.
    pub kv_propagation_secs: u64,
    /// `WEBHOOK_URLS` and `WEBHOOK_ALLOW_HTTP_HOSTS`: where the terminal events of the tasks
    /// this worker finishes (sweep, dead letters, host queue objects) go besides `callbackUrl`.
    pub webhooks: crate::webhooks::WebhookConfig,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            consumer_tokens: Tokens::default(),
            max_attempts: 3,
            lease_default_secs: 180,
            lease_min_secs: 120,
            lease_max_secs: 3600,
            bell_check_ms: 1000,
            max_wait_secs: 30,
            max_queued_secs: 7 * 86_400,
            started_at: Timestamp(0),
            retry_delay_secs: 5,
            fault_fail_buffering_vm: None,
            rebuffer_after_secs: 60,
            kv_propagation_secs: crate::KV_PROPAGATION_SECS,
            webhooks: crate::webhooks::WebhookConfig::default(),
        }
    }
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

/// The actor name of this worker on task timelines.
const WORKER: &str = "consumer-worker";

impl<S: KvStore, B: KvStore, C: Clock, I: Ids> ConsumerService<'_, S, B, C, I> {
    /// As [`crate::api::ApiService::refuse_unread`]: the refusal decided from the head alone.
    pub fn refuse_unread(&self, head: &Request) -> Option<Response> {
        let verdict = ConsumerRoute::parse(&head.method, &head.path).and_then(|route| {
            auth::authorize(route.auth(), head, &Tokens::default(), &self.config.consumer_tokens)?;
            head.check_declared_length()
        });
        verdict.err().map(Response::from)
    }

    pub async fn handle(&self, request: Request) -> Response {
        let outcome = async {
            let route = ConsumerRoute::parse(&request.method, &request.path)?;
            let caller = auth::authorize(route.auth(), &request, &Tokens::default(), &self.config.consumer_tokens)?;
            self.dispatch(route, &caller, &request).await
        };
        outcome.await.unwrap_or_else(Response::from)
    }

    async fn dispatch(&self, route: ConsumerRoute, caller: &Caller, request: &Request) -> Result<Response, AppError> {
        match route {
            ConsumerRoute::Health => Ok(Response::json(
                200,
                &HealthResponse {
                    success: true,
                    status: "healthy".into(),
                    worker: "vm-consumer-worker".into(),
                    timestamp: self.clock.now(),
                },
            )),
            ConsumerRoute::Index => Ok(index()),
            ConsumerRoute::Stats => {
                caller.check_unbound("/stats")?;
                self.stats().await
            }
            ConsumerRoute::Ready => self.ready(request, caller).await,
            ConsumerRoute::All => {
                caller.check_unbound("/tasks/all")?;
                self.all(request).await
            }
            ConsumerRoute::DeleteEntry { id } => self.delete(&id, request, caller).await,
            ConsumerRoute::Claim { id } => self.claim(&id, request, caller).await,
            ConsumerRoute::Heartbeat { id } => self.heartbeat(&id, request, caller).await,
            ConsumerRoute::Release { id } => self.release(&id, request, caller).await,
            ConsumerRoute::Sweep => {
                caller.check_unbound("the sweep")?;
                Ok(Response::json(200, &self.sweep().await?))
            }
        }
    }

    /// Rewrites `server`'s doorbell, so its waiting daemon lists again. Call it at most once
    /// per server per invocation: the bell is a hot key (one write per second).
    ///
    /// A 429 means someone rang within the last second, possibly before our entries were
    /// written, so it is not yet safe to skip: wait the window out and ring again. A second
    /// 429 means someone rang after that wait began, hence after our entries were written:
    /// the daemon lists them on that ring, and skipping ours is safe.
    async fn ring(&self, server: &str) -> Result<(), AppError> {
        let token = self.ids.random_uuid().simple().to_string();
        match self.buffer.ring(server, &token).await {
            Err(AppError::RateLimited(_)) => {
                self.clock.sleep_ms(KEY_WINDOW_WAIT_MS).await;
                match self.buffer.ring(server, &token).await {
                    Err(AppError::RateLimited(_)) => Ok(()),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Saves a task record, waiting out a fast hand-off's 429 ([`paced`]).
    async fn save(&self, task: &Task) -> Result<(), AppError> {
        paced(&self.clock, || self.tasks.save(task)).await
    }

    /// Removes a task's buffer entry, waiting out a 429 ([`paced`]).
    async fn unbuffer(&self, server: &str, id: Uuid) -> Result<(), AppError> {
        paced(&self.clock, || self.buffer.remove(server, id)).await
    }
}

pub(crate) fn parse_bounded(request: &Request, name: &str, default: u64, min: u64, max: u64) -> Result<u64, AppError> {
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

/// Decodes queue message bodies; unreadable ones are `None`.
fn decode_messages(bodies: &[Value]) -> Vec<Option<crate::QueueMessage>> {
    bodies.iter().map(|b| serde_json::from_value(b.clone()).ok()).collect()
}
