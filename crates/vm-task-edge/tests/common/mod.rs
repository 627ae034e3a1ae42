//! A whole edge (both services over shared in-memory KV, queue and clock) for native tests.

#![allow(dead_code)]

use futures::executor::block_on;
use serde_json::{json, Value};
use uuid::Uuid;
use vm_task_edge::{
    api::{ApiConfig, ApiService},
    auth::{Cors, Tokens},
    consumer::{ConsumerConfig, ConsumerService, Delivery},
    counting::{CountingKv, CountingQueue, OpCounters},
    http::{Request, Response},
    memory::{Invocation, ManualClock, MemoryKv, MemoryQueue, MemoryWebhookQueue, SeqIds},
    store::{BufferStore, TaskStore},
    webhooks::{WebhookConfig, WebhookProducer},
};
use vm_task_types::wire::{ClaimResponse, ReadyTasksResponse};

pub const CLIENT: &str = "client-token";
pub const CONSUMER: &str = "consumer-token";
pub const START_MS: u64 = 1_800_000_000_000;

/// Both services over shared in-memory ports with Workers KV's production limits on: one write
/// per second per key (by `clock`) and 1,000 operations per invocation; each `api()` or
/// `consumer()` is one invocation.
pub struct Edge {
    pub invocation: Invocation,
    pub tasks: MemoryKv,
    pub buffer: MemoryKv,
    pub queue: MemoryQueue,
    /// The webhook queue every terminal write of a task with targets sends to.
    pub webhooks: MemoryWebhookQueue,
    pub clock: ManualClock,
    pub ids: SeqIds,
    pub api_config: ApiConfig,
    pub consumer_config: ConsumerConfig,
    pub counters: OpCounters,
}

pub type Api<'a> = ApiService<
    'a,
    CountingKv<'a, MemoryKv>,
    CountingKv<'a, MemoryKv>,
    CountingQueue<'a, MemoryQueue>,
    ManualClock,
    SeqIds,
>;
pub type Consumer<'a> = ConsumerService<'a, CountingKv<'a, MemoryKv>, CountingKv<'a, MemoryKv>, ManualClock, SeqIds>;

impl Edge {
    pub fn new() -> Self {
        let clock = ManualClock::at(START_MS);
        let invocation = Invocation::new(&clock);
        Self {
            tasks: MemoryKv::with_production_limits(&invocation),
            buffer: MemoryKv::with_production_limits(&invocation),
            invocation,
            queue: MemoryQueue::new(),
            webhooks: MemoryWebhookQueue::new(),
            clock,
            ids: SeqIds::default(),
            api_config: ApiConfig {
                client_tokens: Tokens::parse(CLIENT),
                consumer_tokens: Tokens::parse(CONSUMER),
                cors: Cors::parse("https://console.example.com"),
                default_target_server: None,
                cursor_secret: b"test-secret".to_vec(),
                wait_poll_ms: 250,
                openapi: None,
                host_live_secs: 0,
                started_at: vm_task_types::Timestamp(START_MS),
                // One location (the in-memory KV is strongly consistent), as on the local
                // stack; tests of the cross-location rules set both workers' window.
                kv_propagation_secs: 0,
                webhooks: WebhookConfig::default(),
                records_in_messages: false,
            },
            consumer_config: ConsumerConfig {
                consumer_tokens: Tokens::parse(CONSUMER),
                max_attempts: 3,
                lease_default_secs: 180,
                lease_min_secs: 2,
                kv_propagation_secs: 0,
                ..ConsumerConfig::default()
            },
            counters: OpCounters::new(),
        }
    }

    /// Both workers with `KV_PROPAGATION_SECONDS` = `secs`, as deployed across locations
    /// (production: 60). The in-memory KV stays strongly consistent: these tests check what the
    /// handlers decide and when, the model (`crates/edge-model`) checks them against stale reads.
    pub fn across_locations(mut self, secs: u64) -> Self {
        self.api_config.kv_propagation_secs = secs;
        self.consumer_config.kv_propagation_secs = secs;
        self
    }

    /// `TASK_STORAGE` as the workers build it: terminal writes queue the task's webhooks.
    pub fn task_store(&self) -> TaskStore<CountingKv<'_, MemoryKv>> {
        let producer = WebhookProducer {
            queue: self.webhooks.clone(),
            clock: self.clock.clone(),
            config: self.api_config.webhooks.clone(),
        };
        TaskStore::with_webhooks(CountingKv::new(self.tasks.clone(), &self.counters), Box::new(producer))
    }

    /// The API worker for one invocation.
    pub fn api(&self) -> Api<'_> {
        self.invocation.begin();
        ApiService {
            tasks: self.task_store(),
            buffer: BufferStore::new(CountingKv::new(self.buffer.clone(), &self.counters)),
            queue: CountingQueue::new(self.queue.clone(), &self.counters),
            clock: self.clock.clone(),
            ids: self.ids.clone(),
            config: &self.api_config,
            counters: &self.counters,
        }
    }

    /// The consumer worker for one invocation.
    pub fn consumer(&self) -> Consumer<'_> {
        self.invocation.begin();
        ConsumerService {
            tasks: self.task_store(),
            buffer: BufferStore::new(CountingKv::new(self.buffer.clone(), &self.counters)),
            clock: self.clock.clone(),
            ids: self.ids.clone(),
            config: &self.consumer_config,
            counters: &self.counters,
        }
    }

    pub fn api_call(&self, request: Request) -> Response {
        block_on(self.api().handle(request))
    }

    pub fn consumer_call(&self, request: Request) -> Response {
        block_on(self.consumer().handle(request))
    }

    /// Submits a task as a client; panics unless accepted.
    pub fn submit(&self, body: Value) -> Uuid {
        let response = self.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&body));
        assert_eq!(response.status, 202, "{}", String::from_utf8_lossy(&response.body));
        let v: Value = response.json_body().unwrap();
        v["taskId"].as_str().unwrap().parse().unwrap()
    }

    /// Delivers everything queued so far to the consumer worker, as one batch.
    pub fn deliver(&self) -> Vec<Delivery> {
        let bodies: Vec<Value> = self.queue.drain().iter().map(|m| serde_json::to_value(m).unwrap()).collect();
        block_on(self.consumer().buffer_batch(&bodies))
    }

    pub fn ready(&self, server: &str) -> ReadyTasksResponse {
        let r = self.consumer_call(Request::new("GET", &format!("/tasks/ready?server={server}")).bearer(CONSUMER));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json_body().unwrap()
    }

    pub fn claim(&self, id: Uuid, lease_seconds: Option<u64>) -> Response {
        self.consumer_call(
            Request::new("POST", &format!("/tasks/{id}/claim"))
                .bearer(CONSUMER)
                .json_body(&json!({"consumerId": "host-a", "leaseSeconds": lease_seconds})),
        )
    }

    pub fn claimed(&self, id: Uuid) -> ClaimResponse {
        let r = self.claim(id, None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json_body().unwrap()
    }

    pub fn report(&self, id: Uuid, claim_id: Uuid, body: Value) -> Response {
        let mut body = body;
        body["claimId"] = json!(claim_id);
        self.api_call(Request::new("PUT", &format!("/vm/tasks/{id}/status")).bearer(CONSUMER).json_body(&body))
    }

    pub fn status(&self, id: Uuid) -> Value {
        let r = self.api_call(Request::new("GET", &format!("/vm/tasks/{id}/status")).bearer(CLIENT));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json_body().unwrap()
    }

    pub fn detail(&self, id: Uuid) -> Value {
        let r = self.api_call(Request::new("GET", &format!("/vm/tasks/{id}")).bearer(CLIENT));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json_body::<Value>().unwrap()["task"].clone()
    }
}

pub fn launch(vm: &str, server: &str) -> Value {
    json!({"type": "launch_vm", "payload": {"vmName": vm, "vmConfig": {"memory": "2G"}, "targetServer": server}})
}

pub fn op(kind: &str, vm: &str) -> Value {
    json!({"type": kind, "payload": {"vmName": vm}})
}

pub fn body_text(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Yields to the executor `n` times, then runs `future`.
pub async fn after_yields<F: std::future::Future>(n: usize, future: F) -> F::Output {
    for _ in 0..n {
        let mut yielded = false;
        futures::future::poll_fn(|cx| {
            if yielded {
                std::task::Poll::Ready(())
            } else {
                yielded = true;
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        })
        .await;
    }
    future.await
}
