//! The durable mode end to end in-process: the real API service and both fronts over the
//! in-memory KV with its production limits (1 write/s per key), and a host queue object per
//! server that runs the object's own request handler and carries out its effects the way the
//! Durable Object does (KV records, refused writes waited out).

use std::{cell::RefCell, collections::BTreeMap};

use futures::executor::block_on;
use host_queue::{
    front::{hand_off_directly, ApiFront, ConsumerFront, Handoff, HandoffQueue, HostQueues, Submissions},
    object::{self, Reply},
    EnqueueBatch, EnqueueBatchReply, EnqueueOutcome, HostQueue, MemoryStore, QueueConfig,
};
use serde_json::{json, Value};
use uuid::Uuid;
use vm_task_edge::{
    api::{ApiConfig, ApiService},
    auth::Tokens,
    consumer::{ConsumerConfig, Delivery},
    counting::{CountingQueue, OpCounters},
    http::{Request, Response},
    memory::{Invocation, ManualClock, MemoryKv, MemoryQueue, SeqIds},
    store::{BufferStore, TaskStore},
    Clock, QueueMessage,
};
use vm_task_types::{wire::ClaimResponse, TaskStatus, Timestamp};

const CLIENT: &str = "client-token";
const CONSUMER: &str = "consumer-token";
const START_MS: u64 = 1_800_000_000_000;

/// The objects of every server, in-process, writing task records to `kv` after each step.
struct Objects {
    queues: RefCell<BTreeMap<String, HostQueue<MemoryStore>>>,
    kv: TaskStore<MemoryKv>,
    clock: ManualClock,
    /// Every request, as `server method path`.
    calls: RefCell<Vec<String>>,
    /// A server whose object cannot be reached.
    unreachable: RefCell<Option<String>>,
}

impl Objects {
    /// What the object's alarm and its after-step do: write the records due, note refusals.
    async fn settle(&self, server: &str) {
        let now = self.clock.now();
        let due = self.queues.borrow_mut().get_mut(server).map(|q| q.effects(now).mirror).unwrap_or_default();
        for task in due {
            let written = self.kv.save(&task).await;
            let mut queues = self.queues.borrow_mut();
            let queue = queues.get_mut(server).expect("queue exists");
            match written {
                Ok(()) => queue.mirrored(&task, now),
                Err(e) => {
                    assert!(e.is_rate_limited(), "only KV's write limit refuses here: {e}");
                    queue.mirror_refused(task.id, now);
                }
            }
        }
    }

    fn alarm(&self, server: &str) {
        let now = self.clock.now();
        if let Some(q) = self.queues.borrow_mut().get_mut(server) {
            q.on_alarm(now);
        }
        block_on(self.settle(server));
    }
}

impl HostQueues for Objects {
    async fn call(&self, server: &str, method: &str, path: &str, body: Vec<u8>) -> Result<Reply, String> {
        let now = self.clock.now();
        let path = path.split('?').next().unwrap_or_default().to_owned();
        self.calls.borrow_mut().push(format!("{server} {method} {path}"));
        if self.unreachable.borrow().as_deref() == Some(server) {
            return Err(format!("object {server} unreachable"));
        }
        let reply = {
            let mut queues = self.queues.borrow_mut();
            let queue = queues
                .entry(server.to_owned())
                .or_insert_with(|| HostQueue::load(MemoryStore::new(), QueueConfig::default()));
            object::handle(queue, 7, method, &path, &body, now)
        };
        self.settle(server).await;
        Ok(reply)
    }
}

struct Edge {
    invocation: Invocation,
    tasks: MemoryKv,
    /// `TASK_BUFFER`: the host registry in this mode.
    hosts: MemoryKv,
    queue: MemoryQueue,
    clock: ManualClock,
    objects: Objects,
    api_config: ApiConfig,
    consumer_tokens: Tokens,
    counters: OpCounters,
    ids: SeqIds,
    /// The API worker hands each new task to its object right after queueing it.
    direct_handoff: bool,
}

impl Edge {
    fn new() -> Self {
        let clock = ManualClock::at(START_MS);
        let invocation = Invocation::new(&clock);
        let tasks = MemoryKv::with_production_limits(&invocation);
        Self {
            objects: Objects {
                queues: RefCell::new(BTreeMap::new()),
                kv: TaskStore::new(tasks.clone()),
                clock: clock.clone(),
                calls: RefCell::new(Vec::new()),
                unreachable: RefCell::new(None),
            },
            tasks,
            hosts: MemoryKv::with_production_limits(&invocation),
            invocation,
            queue: MemoryQueue::new(),
            clock,
            api_config: ApiConfig {
                client_tokens: Tokens::parse(CLIENT),
                consumer_tokens: Tokens::parse(CONSUMER),
                cursor_secret: b"secret".to_vec(),
                wait_poll_ms: 250,
                // As the API worker in this mode.
                records_in_messages: true,
                ..ApiConfig::default()
            },
            consumer_tokens: Tokens::parse(CONSUMER),
            counters: OpCounters::new(),
            ids: SeqIds::default(),
            direct_handoff: true,
        }
    }

    /// One API invocation in the durable mode: the front first, else the KV mode's service.
    fn api(&self, request: Request) -> Response {
        self.invocation.begin();
        let store = TaskStore::new(self.tasks.clone());
        let front = ApiFront {
            tasks: &store,
            queues: &self.objects,
            client_tokens: &self.api_config.client_tokens,
            consumer_tokens: &self.api_config.consumer_tokens,
        };
        block_on(async {
            if let Some(response) = front.handle(&request).await {
                return response;
            }
            let service = ApiService {
                tasks: TaskStore::new(self.tasks.clone()),
                buffer: BufferStore::new(self.hosts.clone()),
                // As the API worker: queued, then handed straight to the object after answering.
                queue: HandoffQueue::new(CountingQueue::new(self.queue.clone(), &self.counters), self.direct_handoff),
                clock: self.clock.clone(),
                ids: self.ids.clone(),
                config: &self.api_config,
                counters: &self.counters,
            };
            let response = service.handle(request).await;
            hand_off_directly(&self.objects, service.queue.take_handoffs()).await;
            response
        })
    }

    /// The consumer worker's front at this moment, reading task records from `store` (this
    /// edge's KV, or a location it has not reached).
    fn front<'a>(&'a self, store: &'a TaskStore<MemoryKv>) -> ConsumerFront<'a, MemoryKv, Objects> {
        ConsumerFront {
            tasks: store,
            queues: &self.objects,
            consumer_tokens: &self.consumer_tokens,
            max_wait_secs: 30,
            host_registry: &self.hosts,
            now: self.clock.now(),
        }
    }

    fn consumer(&self, request: Request) -> Response {
        self.invocation.begin();
        let store = TaskStore::new(self.tasks.clone());
        let front = self.front(&store);
        block_on(front.handle(&request)).expect("a durable-mode consumer route")
    }

    fn submit(&self, vm: &str) -> Uuid {
        let body = json!({"type": "stop_vm", "payload": {"vmName": vm, "targetServer": "production"}});
        let r = self.api(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&body));
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        r.json_body::<Value>().unwrap()["taskId"].as_str().unwrap().parse().unwrap()
    }

    /// The queue consumer's hand-off of everything queued, as one batch.
    fn deliver(&self) {
        let messages = self.queue.drain();
        let answers = self.hand_off_batch(&messages);
        assert!(answers.iter().all(|a| *a == Handoff::Done), "{answers:?}");
    }

    /// One queue batch through the consumer front, as the worker hands it over.
    fn hand_off_batch(&self, messages: &[QueueMessage]) -> Vec<Handoff> {
        self.invocation.begin();
        let store = TaskStore::new(self.tasks.clone());
        let front = self.front(&store);
        block_on(front.hand_off_batch(messages))
    }

    /// One queue batch through the deployed handler ([`ConsumerFront::deliver_batch`]).
    fn deliver_batch(&self, bodies: &[Value], config: &ConsumerConfig) -> Vec<Delivery> {
        self.invocation.begin();
        let store = TaskStore::new(self.tasks.clone());
        let front = ConsumerFront::new(&store, &self.objects, &self.hosts, config, self.clock.now());
        block_on(front.deliver_batch(bodies, config)).deliveries
    }

    fn submit_to(&self, vm: &str, server: &str) -> Uuid {
        let body = json!({"type": "stop_vm", "payload": {"vmName": vm, "targetServer": server}});
        let r = self.api(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&body));
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        r.json_body::<Value>().unwrap()["taskId"].as_str().unwrap().parse().unwrap()
    }

    /// The object requests made so far that hand tasks over.
    fn enqueue_calls(&self) -> Vec<String> {
        self.objects.calls.borrow().iter().filter(|c| c.contains("/enqueue")).cloned().collect()
    }

    fn claim(&self, id: Uuid, claim: u128) -> Response {
        let body = json!({"consumerId": "host-a", "claimId": Uuid::from_u128(claim), "leaseSeconds": 30});
        self.consumer(
            Request::new("POST", &format!("/tasks/{id}/claim?server=production")).bearer(CONSUMER).json_body(&body),
        )
    }

    fn cancel(&self, id: Uuid) -> Response {
        self.api(Request::new("DELETE", &format!("/vm/tasks/{id}")).bearer(CLIENT))
    }

    /// The task's record in KV, as a list or a reader of KV sees it.
    fn kv_status(&self, id: Uuid) -> TaskStatus {
        block_on(TaskStore::new(self.tasks.clone()).load(id)).unwrap().expect("a record in KV").status
    }

    /// The task as `GET /vm/tasks/{id}` answers it.
    fn read_status(&self, id: Uuid) -> TaskStatus {
        let r = self.api(Request::new("GET", &format!("/vm/tasks/{id}")).bearer(CLIENT));
        serde_json::from_value(r.json_body::<Value>().unwrap()["task"]["status"].clone()).unwrap()
    }

    fn live_status(&self, id: Uuid) -> TaskStatus {
        self.objects.queues.borrow()["production"].task(id).unwrap().status
    }
}

#[test]
fn a_task_runs_through_the_object_and_its_record_reaches_kv_within_the_write_limit() {
    let edge = Edge::new();
    let id = edge.submit("vm-1");
    edge.clock.advance_ms(20);
    edge.deliver();
    let ready = edge.consumer(Request::new("GET", "/tasks/ready?server=production").bearer(CONSUMER));
    assert_eq!(ready.get_header("x-dispatch-mode"), Some("durable"));
    let ready: Value = ready.json_body().unwrap();
    assert_eq!(ready["tasks"][0]["taskId"], json!(id));
    edge.clock.advance_ms(10);
    let claim = edge.claim(id, 1);
    assert_eq!(claim.status, 200, "{}", String::from_utf8_lossy(&claim.body));
    let claim: ClaimResponse = claim.json_body().unwrap();
    // The claim came 30 ms after the POST's write: KV would refuse, so the object waits the
    // window out; a read of the task asks the object meanwhile, which is never stale.
    assert_eq!(edge.kv_status(id), TaskStatus::Pending);
    assert_eq!(edge.read_status(id), TaskStatus::Processing);
    edge.clock.advance_ms(10);
    let report = json!({"status": "completed", "claimId": claim.claim_id});
    let r = edge.api(Request::new("PUT", &format!("/vm/tasks/{id}/status")).bearer(CONSUMER).json_body(&report));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // `?wait` reads the object: completed at once, never stale.
    let waited = edge.api(Request::new("GET", &format!("/vm/tasks/{id}/status?wait=5")).bearer(CLIENT));
    assert_eq!(waited.json_body::<Value>().unwrap()["status"], "completed");
    assert_eq!((edge.kv_status(id), edge.read_status(id)), (TaskStatus::Pending, TaskStatus::Completed));
    edge.clock.advance_ms(1_100);
    edge.objects.alarm("production");
    assert_eq!(edge.kv_status(id), TaskStatus::Completed, "the alarm wrote the final record, once");
}

#[test]
fn two_hundred_cancel_and_claim_pairs_have_one_winner_each() {
    let edge = Edge::new();
    let mut violations = Vec::new();
    for n in 0..200u128 {
        let id = edge.submit(&format!("vm-{n}"));
        edge.clock.advance_ms(5);
        edge.deliver();
        // Half the pairs cancel first. Each answer is final: 200 to a cancel means no claim.
        let (cancel, claim) = if n % 2 == 0 {
            let cancel = edge.cancel(id);
            (cancel, edge.claim(id, n + 1))
        } else {
            let claim = edge.claim(id, n + 1);
            (edge.cancel(id), claim)
        };
        let live = edge.live_status(id);
        let fine = match (cancel.status, claim.status) {
            (200, 409) => live == TaskStatus::Cancelled,
            (409, 200) => live == TaskStatus::Processing,
            _ => false,
        };
        if !fine {
            violations.push((n, cancel.status, claim.status, live));
        }
    }
    assert!(violations.is_empty(), "{violations:?}");
}

#[test]
fn a_task_cancelled_while_queued_is_never_offered() {
    let edge = Edge::new();
    let id = edge.submit("vm-1");
    let cancel = edge.cancel(id);
    assert_eq!(cancel.status, 200, "{}", String::from_utf8_lossy(&cancel.body));
    edge.clock.advance_ms(1_100);
    edge.deliver();
    let ready: Value =
        edge.consumer(Request::new("GET", "/tasks/ready?server=production").bearer(CONSUMER)).json_body().unwrap();
    assert_eq!(ready["count"], 0);
    assert_eq!(edge.claim(id, 1).status, 409);
}

#[test]
fn the_long_poll_needs_a_server_and_a_token() {
    let edge = Edge::new();
    assert_eq!(edge.consumer(Request::new("GET", "/tasks/ready").bearer(CONSUMER)).status, 400);
    assert_eq!(edge.consumer(Request::new("GET", "/tasks/ready?server=production")).status, 401);
    assert_eq!(edge.consumer(Request::new("GET", "/tasks/ready?server=a:b").bearer(CONSUMER)).status, 400);
    let bad_wait = edge.consumer(Request::new("GET", "/tasks/ready?server=production&wait=99").bearer(CONSUMER));
    assert_eq!(bad_wait.status, 400);
}

#[test]
fn a_stale_claims_report_is_refused_through_the_api() {
    let edge = Edge::new();
    let id = edge.submit("vm-1");
    edge.deliver();
    let first: ClaimResponse = edge.claim(id, 1).json_body().unwrap();
    edge.clock.advance_ms(30_000);
    edge.objects.alarm("production");
    let second: ClaimResponse = edge.claim(id, 2).json_body().unwrap();
    assert_ne!(first.claim_id, second.claim_id);
    let late = json!({"status": "completed", "claimId": first.claim_id});
    let r = edge.api(Request::new("PUT", &format!("/vm/tasks/{id}/status")).bearer(CONSUMER).json_body(&late));
    assert_eq!(r.status, 409);
    assert_eq!(edge.live_status(id), TaskStatus::Processing);
}

#[test]
fn the_websocket_route_takes_a_consumer_token_a_valid_server_and_an_upgrade() {
    use host_queue::front::connect_route;
    let tokens = Tokens::parse(CONSUMER);
    let upgrade = |r: Request| r.header("upgrade", "websocket");
    let ok = upgrade(Request::new("GET", "/hosts/production/connect").bearer(CONSUMER));
    assert_eq!(connect_route(&ok, &tokens).unwrap(), Some("production".to_owned()));
    assert_eq!(connect_route(&Request::new("GET", "/tasks/ready"), &tokens).unwrap(), None);
    let status = |r: Request| connect_route(&r, &tokens).unwrap_err().status;
    assert_eq!(status(upgrade(Request::new("GET", "/hosts/production/connect"))), 401);
    assert_eq!(status(upgrade(Request::new("POST", "/hosts/production/connect").bearer(CONSUMER))), 405);
    assert_eq!(status(upgrade(Request::new("GET", "/hosts/a%20b/connect").bearer(CONSUMER))), 400);
    assert_eq!(status(Request::new("GET", "/hosts/production/connect").bearer(CONSUMER)), 426);
}

#[test]
fn the_cron_hands_a_task_whose_queue_message_was_lost_to_its_object() {
    // The queue alone brings the tasks here, as when the API's direct hand-off failed.
    let edge = Edge { direct_handoff: false, ..Edge::new() };
    let lost = edge.submit("vm-1");
    let delivered = edge.submit("vm-2");
    let messages = edge.queue.drain();
    let store = TaskStore::new(edge.tasks.clone());
    let front = edge.front(&store);
    let kept = messages.iter().find(|m| m.task_id == delivered).unwrap();
    assert_eq!(block_on(front.hand_off(kept)), Handoff::Done);
    let reconcile = |at_ms: u64| block_on(front.reconcile(Timestamp(START_MS + at_ms), 60, 3_600, 900)).unwrap();
    assert_eq!(reconcile(59_000), 0, "too young: its message may still come");
    assert_eq!(reconcile(61_000), 1, "only the lost one is new to its object");
    assert_eq!(edge.live_status(lost), TaskStatus::Pending);
    assert_eq!(reconcile(120_000), 0, "a second run changes nothing");
}

#[test]
fn a_consumer_token_bound_to_servers_acts_for_those_only() {
    let mut edge = Edge::new();
    edge.consumer_tokens = Tokens::parse_bound("bound-token:staging").unwrap();
    let r = edge.consumer(Request::new("GET", "/tasks/ready?server=production").bearer("bound-token"));
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let r = edge.consumer(Request::new("GET", "/tasks/ready?server=staging").bearer("bound-token"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = edge.submit("vm-1");
    edge.deliver();
    let body = json!({"consumerId": "host-a", "leaseSeconds": 30});
    let r = edge.consumer(Request::new("POST", &format!("/tasks/{id}/claim")).bearer("bound-token").json_body(&body));
    assert_eq!(r.status, 403, "the task's server comes from its record: {}", String::from_utf8_lossy(&r.body));
    assert_eq!(edge.live_status(id), TaskStatus::Pending);
}

#[test]
fn bad_claim_bodies_are_refused_like_the_kv_modes() {
    let edge = Edge::new();
    let id = edge.submit("vm-1");
    edge.deliver();
    let claim = |body: Value| {
        edge.consumer(
            Request::new("POST", &format!("/tasks/{id}/claim?server=production")).bearer(CONSUMER).json_body(&body),
        )
    };
    let bad_id = claim(json!({"consumerId": "host a/b"}));
    assert_eq!(bad_id.status, 400);
    assert_eq!(bad_id.json_body::<Value>().unwrap()["field"], "consumerId");
    let missing = claim(json!({"leaseSeconds": 30}));
    let body: Value = missing.json_body().unwrap();
    assert_eq!((missing.status, body["code"].as_str()), (400, Some("invalid_body")));
    assert!(body["error"].as_str().unwrap().contains("missing field `consumerId`"), "{body}");
    assert_eq!(edge.live_status(id), TaskStatus::Pending, "no refused claim took the task");
}

impl Edge {
    fn submit_body(&self, body: Value) -> Uuid {
        let r = self.api(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&body));
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        r.json_body::<Value>().unwrap()["taskId"].as_str().unwrap().parse().unwrap()
    }

    fn heartbeat(&self, id: Uuid, claim_id: Uuid) -> Value {
        let body = json!({"claimId": claim_id, "leaseSeconds": 30});
        let r = self.consumer(
            Request::new("POST", &format!("/tasks/{id}/heartbeat?server=production")).bearer(CONSUMER).json_body(&body),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json_body().unwrap()
    }

    fn report(&self, id: Uuid, body: Value) -> Response {
        self.api(Request::new("PUT", &format!("/vm/tasks/{id}/status")).bearer(CONSUMER).json_body(&body))
    }
}

fn command(vm: &str, timeout: u64) -> Value {
    json!({"type": "run_command", "payload": {
        "vmName": vm, "command": "sleep 600", "timeoutSeconds": timeout, "targetServer": "production"
    }})
}

/// Was a 409 before: the object refused any cancel of a processing task, so a running long
/// command could not be stopped in the durable mode.
#[test]
fn a_running_long_command_is_cancelled_through_the_heartbeat_and_the_daemons_report() {
    let edge = Edge::new();
    let id = edge.submit_body(command("vm-1", 600));
    edge.deliver();
    let claim: ClaimResponse = edge.claim(id, 1).json_body().unwrap();
    assert_eq!(edge.heartbeat(id, claim.claim_id).get("cancelRequested"), None, "no cancel asked yet");

    let asked = edge.cancel(id);
    let body: Value = asked.json_body().unwrap();
    assert_eq!((asked.status, body["status"].as_str()), (202, Some("cancel_requested")), "{body}");
    assert_eq!(edge.live_status(id), TaskStatus::Processing, "the daemon decides when the guest stopped");
    assert_eq!(edge.cancel(id).status, 202, "asking again changes nothing");
    assert_eq!(edge.heartbeat(id, claim.claim_id)["cancelRequested"], true);

    let stopped = json!({"status": "cancelled", "claimId": claim.claim_id,
        "result": {"output": "started\n", "exitCode": 143}, "message": "stopped in the guest"});
    let r = edge.report(id, stopped);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    edge.clock.advance_ms(1_100);
    edge.objects.alarm("production");
    let task: Value = edge.api(Request::new("GET", &format!("/vm/tasks/{id}")).bearer(CLIENT)).json_body().unwrap();
    let task = &task["task"];
    assert_eq!(task["status"], "cancelled", "{task}");
    assert_eq!(task["result"]["output"], "started\n", "what ran so far is kept");
    assert_eq!(task["error"], "cancelled by client while running");
    let events: Vec<&str> = task["timeline"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events[events.len() - 2..], ["cancel_requested", "cancelled"], "{events:?}");
}

#[test]
fn short_commands_stay_uncancellable_once_running_and_no_daemon_reports_cancelled_unasked() {
    let edge = Edge::new();
    let short = edge.submit_body(command("vm-1", 30));
    let long = edge.submit_body(command("vm-2", 600));
    edge.deliver();
    let short_claim: ClaimResponse = edge.claim(short, 1).json_body().unwrap();
    let long_claim: ClaimResponse = edge.claim(long, 2).json_body().unwrap();
    let refused = edge.cancel(short);
    assert_eq!(refused.status, 409);
    assert!(String::from_utf8_lossy(&refused.body).contains("timeoutSeconds over 30"));
    assert_eq!(edge.heartbeat(short, short_claim.claim_id).get("cancelRequested"), None);
    let r = edge.report(long, json!({"status": "cancelled", "claimId": long_claim.claim_id}));
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(edge.live_status(long), TaskStatus::Processing);
}

/// The daemon died after the cancel was asked: the lease ends and the task ends cancelled,
/// not run again.
#[test]
fn a_cancelled_long_commands_lease_ending_cancels_it() {
    let edge = Edge::new();
    let id = edge.submit_body(command("vm-1", 600));
    edge.deliver();
    edge.claim(id, 1);
    assert_eq!(edge.cancel(id).status, 202);
    edge.clock.advance_ms(31_000);
    edge.objects.alarm("production");
    assert_eq!(edge.live_status(id), TaskStatus::Cancelled);
    assert_eq!(edge.kv_status(id), TaskStatus::Cancelled);
    // The rule behind it: a message still carrying its copy is younger than the object keeps
    // what it finished.
    assert!(host_queue::front::RECORD_IN_MESSAGE_MAX_AGE_SECS * 2 <= QueueConfig::default().retain_secs);
}

/// Was empty before: the durable mode's poll dropped the report, so `GET /hosts` showed no
/// live host and every POST warned that its server was unserved.
#[test]
fn a_polls_host_report_reaches_the_registry_without_waking_an_object() {
    let edge = Edge::new();
    let report = "consumerId=host-a&hostName=box-1&version=1.2.3&concurrency=4&inFlight=1&arrakis=up";
    let r = edge.consumer(Request::new("GET", &format!("/tasks/ready?server=production&{report}")).bearer(CONSUMER));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let hosts: Value = edge.api(Request::new("GET", "/hosts?server=production").bearer(CLIENT)).json_body().unwrap();
    let host = &hosts["hosts"][0];
    assert_eq!(
        (host["hostName"].as_str(), host["live"].as_bool(), host["inFlight"].as_u64()),
        (Some("box-1"), Some(true), Some(1)),
        "{hosts}"
    );
    let body = json!({"type": "stop_vm", "payload": {"vmName": "vm-1", "targetServer": "production"}});
    let posted: Value =
        edge.api(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&body)).json_body().unwrap();
    assert!(posted.get("warnings").is_none_or(|w| w.as_array().unwrap().is_empty()), "{posted}");

    // Malformed report fields are a 400 naming the field, as in the KV mode.
    let bad = edge.consumer(
        Request::new("GET", "/tasks/ready?server=production&consumerId=a&hostName=b&arrakis=sideways").bearer(CONSUMER),
    );
    assert_eq!((bad.status, bad.json_body::<Value>().unwrap()["field"].as_str()), (400, Some("arrakis")));
}

/// A report naming its task's server goes straight to that object: one KV operation fewer
/// than without (the record read that found the server). A bad or unbound name is refused as in
/// the KV mode, and a task on another server is the KV mode's 404.
#[test]
fn a_report_naming_its_server_skips_the_record_read() {
    let mut edge = Edge::new();
    edge.api_config.consumer_tokens = Tokens::parse_bound(&format!("{CONSUMER}:production|staging")).unwrap();
    let (named, unnamed) = (edge.submit("vm-1"), edge.submit("vm-2"));
    edge.deliver();
    let claims: Vec<ClaimResponse> =
        [(named, 1), (unnamed, 2)].into_iter().map(|(id, claim)| edge.claim(id, claim).json_body().unwrap()).collect();
    // Every record write due is done, so each report's invocation counts only its own.
    edge.clock.advance_ms(1_100);
    edge.objects.alarm("production");
    let mut ops = Vec::new();
    for ((id, query), granted) in [(named, "?server=production"), (unnamed, "")].into_iter().zip(claims) {
        edge.clock.advance_ms(1_100);
        let body = json!({"status": "completed", "claimId": granted.claim_id});
        let path = format!("/vm/tasks/{id}/status{query}");
        let r = edge.api(Request::new("PUT", &path).bearer(CONSUMER).json_body(&body));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        ops.push(edge.invocation.ops());
        assert_eq!(edge.live_status(id), TaskStatus::Completed);
    }
    assert_eq!(ops[0] + 1, ops[1], "KV operations with and without ?server=: {ops:?}");

    let id = edge.submit("vm-3");
    edge.deliver();
    let granted: ClaimResponse = edge.claim(id, 3).json_body().unwrap();
    let body = json!({"status": "completed", "claimId": granted.claim_id});
    let report = |query: &str| {
        let path = format!("/vm/tasks/{id}/status{query}");
        edge.api(Request::new("PUT", &path).bearer(CONSUMER).json_body(&body)).status
    };
    assert_eq!(report("?server=a%20b"), 400);
    assert_eq!(report("?server=elsewhere"), 403);
    assert_eq!(report("?server=staging"), 404);
    assert_eq!(edge.live_status(id), TaskStatus::Processing);
}

/// Production model (durable mode): a message delivered twice had one copy handed to the
/// object and the other exhaust its retries; the dead letter handler failed the task in KV
/// while the object ran it (then mirrored over that `failed`), or failed it in KV while a
/// concurrent copy handed it over. Dead letters now go to the object: a task it holds is
/// spared; one it does not hold is held as failed, so a later copy finds it finished.
#[test]
fn a_dead_letter_goes_to_the_object_which_spares_a_task_it_holds_and_fails_one_it_does_not() {
    // The queue alone brings the tasks here, as when the API's direct hand-off failed.
    let edge = Edge { direct_handoff: false, ..Edge::new() };
    let held = edge.submit("vm-1");
    let never_handed = edge.submit("vm-2");
    let messages = edge.queue.drain();
    let store = TaskStore::new(edge.tasks.clone());
    let front = edge.front(&store);
    let of = |id: Uuid| messages.iter().find(|m| m.task_id == id).unwrap();
    assert_eq!(block_on(front.hand_off(of(held))), Handoff::Done);
    let bodies: Vec<Value> = [held, never_handed].map(|id| serde_json::to_value(of(id)).unwrap()).to_vec();
    let decisions = block_on(front.dead_letter_batch(&bodies));
    assert_eq!(decisions, [vm_task_edge::consumer::Delivery::Ack; 2]);
    assert_eq!(edge.live_status(held), TaskStatus::Pending, "its object runs it");
    assert_eq!(block_on(store.load(held)).unwrap().unwrap().status, TaskStatus::Pending, "not failed in KV");
    assert_eq!(edge.live_status(never_handed), TaskStatus::Failed);
    edge.clock.advance_ms(1_100);
    block_on(front.hand_off(of(never_handed)));
    assert_eq!(edge.live_status(never_handed), TaskStatus::Failed, "a late copy finds it finished");
    let record = block_on(store.load(never_handed)).unwrap().unwrap();
    assert_eq!(record.status, TaskStatus::Failed, "mirrored to KV");
    assert!(record.error.unwrap().contains("dead-lettered"));
}

/// The API's message carries the record: a location KV has not reached yet hands the task
/// over at once (no read, no wait on propagation). A message without it (a record too large
/// to carry) is delivered again after half of KV's propagation window there, so the queue's
/// retries outlast the window.
#[test]
fn a_message_carrying_its_record_is_handed_over_where_kv_has_not_propagated_it() {
    let edge = Edge::new();
    let store = TaskStore::new(MemoryKv::new()); // a location the record has not reached
    let front = edge.front(&store);
    let id = edge.submit("vm-1");
    let message = edge.queue.drain().remove(0);
    assert_eq!(message.task.as_ref().map(|t| t.id), Some(id), "the API put the record in the message");
    // As text: workers-rs would hand a JSON object's maps to the queue as empty `Map`s.
    let wire = serde_json::to_value(&message).unwrap();
    assert!(wire["task"].is_string(), "{wire}");
    assert_eq!(serde_json::from_value::<QueueMessage>(wire).unwrap(), message);
    let garbled = json!({"taskId": id, "type": "stop_vm", "vmName": "vm-1", "targetServer": "production",
        "createdAt": message.created_at, "task": "{not json"});
    assert_eq!(serde_json::from_value::<QueueMessage>(garbled).unwrap().task, None, "read from KV instead");
    assert_eq!(block_on(front.hand_off(&message)), Handoff::Done);
    assert_eq!(edge.live_status(id), TaskStatus::Pending, "the object holds it");

    edge.submit("vm-2");
    let without_record = QueueMessage { task: None, ..edge.queue.drain().remove(0) };
    assert!(matches!(block_on(front.hand_off(&without_record)), Handoff::NotVisible(_)));
    assert_eq!(Handoff::not_visible_delay_secs(60, 5), 30, "4 deliveries span 90 s > 60 s");
    assert_eq!(Handoff::not_visible_delay_secs(0, 5), 5, "one location: the flat delay");
}

/// A record near the 64 KiB body limit stays out of the message (Queues bill per 64 KB), and
/// the hand-off reads it from KV instead.
#[test]
fn a_large_record_stays_out_of_the_message_and_is_read_from_kv() {
    let edge = Edge::new();
    // The largest upload the API takes: 48 KiB of content.
    let content = "x".repeat(vm_task_types::Limits::UPLOAD_MAX_BYTES);
    let files = json!([{"path": "big.bin", "content": content}]);
    let body =
        json!({"type": "upload_files", "payload": {"vmName": "vm-big", "files": files, "targetServer": "production"}});
    let r = edge.api(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&body));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let message = edge.queue.drain().remove(0);
    assert!(message.task.is_none());
    assert!(serde_json::to_vec(&message).unwrap().len() < 1024, "the message stays small");
    edge.clock.advance_ms(1_100);
    assert_eq!(edge.hand_off_batch(std::slice::from_ref(&message)), [Handoff::Done]);
    assert_eq!(edge.live_status(message.task_id), TaskStatus::Pending);
}

/// A message older than `RECORD_IN_MESSAGE_MAX_AGE_SECS` hands over the record in KV, not its
/// own copy: a task cancelled before its message arrived, whose finished entry the object has
/// since purged (after `retain_secs`), must not come back as pending from the copy.
#[test]
fn a_late_message_hands_over_the_record_in_kv_not_its_own_copy() {
    let edge = Edge::new();
    let id = edge.submit("vm-1");
    assert_eq!(edge.cancel(id).status, 200);
    let message = edge.queue.drain().remove(0);
    assert_eq!(message.task.as_ref().map(|t| t.status), Some(TaskStatus::Pending), "the copy is as created");
    // The first alarm writes the cancelled record KV refused within the POST's second; the
    // next purges the entry.
    edge.clock.advance_ms((QueueConfig::default().retain_secs + 60) * 1000);
    edge.objects.alarm("production");
    edge.clock.advance_ms(1_100);
    edge.objects.alarm("production");
    assert!(edge.objects.queues.borrow()["production"].task(id).is_none(), "the finished entry was purged");

    assert_eq!(edge.hand_off_batch(&[message]), [Handoff::Done]);
    assert!(edge.objects.queues.borrow()["production"].task(id).is_none(), "not queued again");
    assert_eq!(edge.kv_status(id), TaskStatus::Cancelled);
}

/// A queue batch reaches each server's object in one request, whatever its size, and every
/// message gets its own answer: new tasks on two servers, one whose record is not readable
/// here yet, one the object already holds (a redelivered message) and one cancelled before
/// its message arrived.
#[test]
fn a_batch_goes_to_each_object_in_one_request_and_each_message_gets_its_own_answer() {
    // The queue alone brings the tasks here, as when the API's direct hand-off failed.
    let edge = Edge { direct_handoff: false, ..Edge::new() };
    let held = edge.submit("vm-0");
    let redelivered = edge.queue.drain().remove(0);
    assert_eq!(edge.hand_off_batch(std::slice::from_ref(&redelivered)), [Handoff::Done]);
    edge.objects.calls.borrow_mut().clear();
    let cancelled = edge.submit("vm-9");
    assert_eq!(edge.cancel(cancelled).status, 200);
    let cancelled_message = edge.queue.drain().remove(0);
    let new: Vec<Uuid> = (1..=4).map(|n| edge.submit(&format!("vm-{n}"))).collect();
    let elsewhere: Vec<Uuid> = (5..=6).map(|n| edge.submit_to(&format!("vm-{n}"), "staging")).collect();
    let mut messages = edge.queue.drain();
    let unseen = QueueMessage { task_id: Uuid::from_u128(u128::MAX), ..messages[0].clone() };
    messages.insert(2, unseen);
    messages.insert(0, redelivered);
    messages.push(cancelled_message);
    edge.clock.advance_ms(1_100);

    let answers = edge.hand_off_batch(&messages);

    assert_eq!(answers.len(), messages.len());
    for (message, answer) in messages.iter().zip(&answers) {
        if message.task_id == Uuid::from_u128(u128::MAX) {
            assert!(matches!(answer, Handoff::NotVisible(_)), "{answer:?}");
        } else {
            assert_eq!(*answer, Handoff::Done, "task {}", message.task_id);
        }
    }
    assert_eq!(
        edge.enqueue_calls(),
        ["production POST /enqueue-batch", "staging POST /enqueue-batch"],
        "one request per server for the whole batch"
    );
    let listed = |server: &str| -> Vec<Uuid> {
        let r = edge.consumer(Request::new("GET", &format!("/tasks/ready?server={server}")).bearer(CONSUMER));
        r.json_body::<Value>().unwrap()["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["taskId"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let mut production = vec![held];
    production.extend(&new);
    assert_eq!(listed("production"), production, "the cancelled task is not offered");
    assert_eq!(listed("staging"), elsewhere);
}

/// An object that cannot be reached has its messages retried; the other server's are acked.
/// Handing the same batch over again then queues what was missing and nothing twice.
#[test]
fn an_unreachable_object_has_its_messages_retried_and_a_second_hand_off_is_harmless() {
    let edge = Edge::new();
    let on_production = [edge.submit("vm-1"), edge.submit("vm-2")];
    let on_staging = edge.submit_to("vm-3", "staging");
    let messages = edge.queue.drain();
    *edge.objects.unreachable.borrow_mut() = Some("staging".into());

    let answers = edge.hand_off_batch(&messages);
    assert_eq!(answers[..2], [Handoff::Done, Handoff::Done]);
    assert!(matches!(&answers[2], Handoff::Retry(why) if why.contains("unreachable")), "{answers:?}");

    *edge.objects.unreachable.borrow_mut() = None;
    let version_before = edge.objects.queues.borrow()["production"].version();
    assert_eq!(edge.hand_off_batch(&messages), [Handoff::Done, Handoff::Done, Handoff::Done]);
    assert_eq!(edge.objects.queues.borrow()["production"].version(), version_before, "nothing new on production");
    for id in on_production {
        assert_eq!(edge.live_status(id), TaskStatus::Pending);
    }
    assert_eq!(edge.objects.queues.borrow()["staging"].task(on_staging).unwrap().status, TaskStatus::Pending);
}

/// The object's batch route: one outcome per task in the request's order (a task listed twice
/// is a duplicate the second time; a finished record is not queued), and the same batch again
/// changes nothing.
#[test]
fn the_objects_batch_route_answers_each_task_in_order_and_is_idempotent() {
    let edge = Edge::new();
    let ids: Vec<Uuid> = (1..=3).map(|n| edge.submit(&format!("vm-{n}"))).collect();
    let record = |id: Uuid| block_on(TaskStore::new(edge.tasks.clone()).load(id)).unwrap().unwrap();
    let mut finished = record(ids[2]);
    finished.status = TaskStatus::Cancelled;
    let batch = EnqueueBatch { tasks: vec![record(ids[1]), record(ids[0]), record(ids[1]), finished] };
    let body = serde_json::to_vec(&batch).unwrap();
    let mut queue = HostQueue::load(MemoryStore::new(), QueueConfig::default());
    let now = edge.clock.now();

    let reply = object::handle(&mut queue, 7, "POST", "/enqueue-batch", &body, now);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let outcomes = serde_json::from_str::<EnqueueBatchReply>(&reply.body).unwrap().outcomes;
    use EnqueueOutcome::*;
    assert_eq!(outcomes, [Queued, Queued, Duplicate, Finished]);
    let pushed: Vec<Uuid> = queue.effects(now).push.iter().map(|t| t.task_id).collect();
    assert_eq!(pushed, ids[..2], "both new tasks pushed in one pass");
    assert!(queue.task(ids[2]).is_none(), "a finished record is not held");

    let version = queue.version();
    let again = object::handle(&mut queue, 7, "POST", "/enqueue-batch", &body, now);
    let outcomes = serde_json::from_str::<EnqueueBatchReply>(&again.body).unwrap().outcomes;
    assert_eq!(outcomes, [Duplicate, Duplicate, Duplicate, Finished]);
    assert_eq!(queue.version(), version);
    assert!(queue.effects(now).push.is_empty(), "nothing pushed twice");

    let bad = object::handle(&mut queue, 7, "POST", "/enqueue-batch", b"{\"tasks\": 3}", now);
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[test]
fn the_queue_handler_acks_what_the_objects_took_and_retries_the_rest_with_its_own_delay() {
    // The queue alone brings the tasks here, as when the API's direct hand-off failed.
    let edge = Edge { direct_handoff: false, ..Edge::new() };
    edge.submit("vm-1");
    edge.submit("vm-faulty");
    let mut bodies: Vec<Value> = edge.queue.drain().iter().map(|m| serde_json::to_value(m).unwrap()).collect();
    let mut unseen = bodies[0].clone();
    unseen["taskId"] = json!(Uuid::from_u128(u128::MAX));
    bodies.push(unseen);
    bodies.push(json!({"not": "a task message"}));
    edge.clock.advance_ms(1_100);
    let config = ConsumerConfig {
        retry_delay_secs: 5,
        kv_propagation_secs: 60,
        fault_fail_buffering_vm: Some("vm-faulty".into()),
        ..ConsumerConfig::default()
    };

    let deliveries = edge.deliver_batch(&bodies, &config);

    let not_visible = Handoff::not_visible_delay_secs(60, 5);
    assert!(not_visible > 5, "a record not visible yet waits for propagation: {not_visible} s");
    assert_eq!(
        deliveries,
        [
            Delivery::Ack,
            Delivery::Retry { delay_secs: 5 },
            Delivery::Retry { delay_secs: not_visible },
            Delivery::Retry { delay_secs: 5 },
        ],
        "handed over; fault-injected VM; record not visible here yet; unreadable"
    );
    assert_eq!(edge.enqueue_calls(), ["production POST /enqueue-batch"]);
}

/// A daemon's operation over its socket ([`object::handle_call`]) is the HTTP route's step:
/// two objects holding the same task, one asked over HTTP and one over the socket, give the
/// same status and body for a claim, a repeated claim, a stale heartbeat, a report, and a
/// report of a task the object does not hold; the answer frame carries the call's number.
#[test]
fn a_call_over_the_socket_gets_the_same_answer_as_the_http_route() {
    use vm_task_types::wire::{ClaimRequest, HostCall, HostOp, HostPush, LeaseRequest, UpdateStatusRequest};
    let edge = Edge::new();
    let id = edge.submit("vm-1");
    let record = block_on(TaskStore::new(edge.tasks.clone()).load(id)).unwrap().unwrap();
    let now = edge.clock.now();
    let mut over_http = HostQueue::load(MemoryStore::new(), QueueConfig::default());
    let mut over_socket = HostQueue::load(MemoryStore::new(), QueueConfig::default());
    over_http.enqueue(record.clone(), now);
    over_socket.enqueue(record, now);

    let claim_id = Uuid::from_u128(42);
    let claim = ClaimRequest {
        consumer_id: "host-a".into(),
        claim_id: Some(claim_id),
        lease_seconds: Some(300),
        buffered_at: None,
    };
    let stale = LeaseRequest { claim_id: Uuid::from_u128(7), lease_seconds: Some(300), reason: None };
    let mut report: UpdateStatusRequest =
        serde_json::from_value(json!({"status": "completed", "claimId": claim_id})).unwrap();
    report.message = Some("done".into());
    let unknown = Uuid::from_u128(u128::MAX);
    let steps: Vec<(&str, String, Uuid, HostOp)> = vec![
        ("POST", format!("/tasks/{id}/claim"), id, HostOp::Claim(claim.clone())),
        ("POST", format!("/tasks/{id}/claim"), id, HostOp::Claim(claim)),
        ("POST", format!("/tasks/{id}/heartbeat"), id, HostOp::Heartbeat(stale)),
        ("PUT", format!("/tasks/{id}/status"), id, HostOp::Report(Box::new(report.clone()))),
        ("PUT", format!("/tasks/{unknown}/status"), unknown, HostOp::Report(Box::new(report))),
    ];
    let mut statuses = Vec::new();
    for (n, (method, path, task_id, op)) in steps.into_iter().enumerate() {
        let body = match &op {
            HostOp::Claim(b) => serde_json::to_vec(b),
            HostOp::Heartbeat(b) | HostOp::Release(b) => serde_json::to_vec(b),
            HostOp::Report(b) => serde_json::to_vec(b),
        }
        .unwrap();
        let http = object::handle(&mut over_http, 7, method, &path, &body, now);
        let call = HostCall { call: n as u64 + 1, task_id, op };
        let socket = object::handle_call(&mut over_socket, 7, &call, now);
        assert_eq!(socket, http, "{method} {path}");
        let frame: HostPush = serde_json::from_str(&object::answer(call.call, socket)).unwrap();
        let expected_body: Value = serde_json::from_str(&http.body).unwrap();
        assert_eq!(frame, HostPush::Answer { call: call.call, status: http.status, body: expected_body });
        statuses.push(http.status);
    }
    assert_eq!(statuses, [200, 200, 409, 200, 404], "claim, its retry, a stale heartbeat, a report, an unknown task");
    assert_eq!(over_socket.task(id).unwrap().status, TaskStatus::Completed);
}

/// The API hands a new task to its object right after queueing it: the object holds it and has
/// it ready for the daemon before any queue delivery, and the queue's copy, delivered later,
/// changes nothing. A POST whose queue send fails reaches no object (the task is failed, and
/// must not run); an object unreachable at the POST leaves the task to the queue.
#[test]
fn a_new_task_reaches_its_object_at_the_post_and_the_queue_copy_changes_nothing() {
    let edge = Edge::new();
    let id = edge.submit("vm-1");
    assert_eq!(edge.enqueue_calls(), ["production POST /enqueue"], "handed over by the POST itself");
    assert_eq!(edge.live_status(id), TaskStatus::Pending);
    let ready = edge.consumer(Request::new("GET", "/tasks/ready?server=production").bearer(CONSUMER));
    assert_eq!(ready.json_body::<Value>().unwrap()["tasks"][0]["taskId"], json!(id));
    let version = edge.objects.queues.borrow()["production"].version();
    edge.clock.advance_ms(1_100);
    edge.deliver();
    assert_eq!(edge.objects.queues.borrow()["production"].version(), version, "the queue's copy is a duplicate");

    edge.queue.fail_sends(true);
    let body = json!({"type": "stop_vm", "payload": {"vmName": "vm-2", "targetServer": "production"}});
    let r = edge.api(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&body));
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    edge.queue.fail_sends(false);
    assert_eq!(edge.objects.queues.borrow()["production"].live_count(), 1, "only vm-1's task is held");

    *edge.objects.unreachable.borrow_mut() = Some("production".into());
    edge.clock.advance_ms(1_100);
    let late = edge.submit("vm-3");
    *edge.objects.unreachable.borrow_mut() = None;
    assert!(edge.objects.queues.borrow()["production"].task(late).is_none());
    edge.clock.advance_ms(1_100);
    edge.deliver();
    assert_eq!(edge.live_status(late), TaskStatus::Pending, "the queue brought it");
}

#[test]
fn a_submission_is_handed_off_directly_only_when_no_other_was_in_progress_as_it_began_or_ended() {
    let submissions = Submissions::new();
    let lone = submissions.begin();
    assert!(lone.alone());
    let overlapping = submissions.begin();
    assert!(!lone.alone() && !overlapping.alone(), "both left to the queue's batches");
    drop(overlapping);
    assert!(lone.alone(), "the other ended first");
    let began_during = submissions.begin();
    drop(lone);
    assert!(!began_during.alone(), "another was in progress as it began");
    drop(began_during);
    assert!(submissions.begin().alone(), "every submission ended is uncounted");
}
