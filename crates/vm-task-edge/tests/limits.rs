//! Workers KV's production limits, natively (issue #11 item 4): one write per second per key
//! and 1,000 operations per invocation, enforced by the in-memory KV of every native test.
//! Once a task is queued its POST answers 2xx; an Idempotency-Key retry never creates a second
//! task; hot keys (a VM's registry entry, a server's doorbell) and fast hand-offs of a task
//! record wait out the one-second window instead of failing.

mod common;

use common::*;
use futures::executor::block_on;
use serde_json::{json, Value};
use uuid::Uuid;
use vm_task_edge::{
    consumer::Delivery,
    http::Request,
    memory::{Invocation, ManualClock, MemoryKv},
    KvStore,
};

fn post(edge: &Edge, body: &Value, key: Option<&str>) -> vm_task_edge::http::Response {
    let mut request = Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    edge.api_call(request)
}

fn task_id(r: &vm_task_edge::http::Response) -> Uuid {
    r.json_body::<Value>().unwrap()["taskId"].as_str().unwrap().parse().unwrap()
}

#[test]
fn the_in_memory_kv_refuses_a_second_write_within_a_second_and_the_thousand_and_first_operation() {
    let clock = ManualClock::at(START_MS);
    let invocation = Invocation::new(&clock);
    let kv = MemoryKv::with_production_limits(&invocation);
    block_on(kv.put("k", "1", None)).unwrap();
    clock.advance_ms(999);
    let refused = block_on(kv.put("k", "2", None)).unwrap_err();
    assert!(refused.rate_limited && refused.message.contains("429"), "{refused:?}");
    assert!(block_on(kv.delete("k")).unwrap_err().rate_limited, "a delete is a write too");
    clock.advance_ms(1);
    block_on(kv.put("k", "3", None)).unwrap();
    invocation.begin();
    for _ in 0..1_000 {
        block_on(kv.get("k")).unwrap();
    }
    let over = block_on(kv.get("k")).unwrap_err();
    assert!(!over.rate_limited && over.message.contains("Too many API requests"), "{over:?}");
    invocation.begin();
    assert_eq!(block_on(kv.get("k")).unwrap().as_deref(), Some("3"), "a new invocation starts again");
}

#[test]
fn two_posts_for_one_vm_within_a_second_both_answer_202_and_the_registry_keeps_the_second() {
    let edge = Edge::new();
    let first = post(&edge, &op("stop_vm", "vm-1").tap_server("production"), None);
    assert_eq!(first.status, 202, "{}", body_text(&first));
    edge.clock.advance_ms(100);
    let second = post(&edge, &op("stop_vm", "vm-1").tap_server("production"), None);
    assert_eq!(second.status, 202, "a queued task is never answered 5xx: {}", body_text(&second));
    assert_eq!(edge.queue.drain().len(), 2);
    let vm: Value = edge.api_call(Request::new("GET", "/vm/vm-1/status").bearer(CLIENT)).json_body().unwrap();
    assert_eq!(vm["lastTaskId"], json!(task_id(&second)), "{vm}");
    assert_eq!(edge.detail(task_id(&second))["previousTaskId"], json!(task_id(&first)));
}

#[test]
fn a_registry_write_that_fails_after_the_queue_send_still_answers_202() {
    let edge = Edge::new();
    edge.tasks.fail_writes_to(Some("vm:"));
    let r = post(&edge, &launch("vm-1", "production"), None);
    assert_eq!(r.status, 202, "the task is queued and will run: {}", body_text(&r));
    assert_eq!(edge.queue.drain().len(), 1);
    assert_eq!(edge.status(task_id(&r))["status"], "pending");
}

#[test]
fn an_idempotency_key_retry_after_a_failed_post_never_creates_a_second_task() {
    let edge = Edge::new();
    edge.tasks.fail_writes_to(Some("idem:"));
    let first = post(&edge, &launch("vm-1", "production"), Some("order-7"));
    edge.tasks.fail_writes_to(None);
    edge.clock.advance_ms(2_000);
    let retry = post(&edge, &launch("vm-1", "production"), Some("order-7"));
    assert!(retry.status == 200 || retry.status == 202, "{}", body_text(&retry));
    let queued = edge.queue.drain();
    assert_eq!(queued.len(), 1, "one task queued across the POST and its retry: {queued:?}");
    assert_eq!(queued[0].task_id, task_id(&retry));
    if first.status < 300 {
        assert_eq!(task_id(&first), task_id(&retry));
    }
}

#[test]
fn a_fast_task_is_claimed_50_ms_and_reported_300_ms_after_its_post() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    edge.clock.advance_ms(50);
    let claim = edge.claimed(id);
    edge.clock.advance_ms(300);
    let report = edge.report(id, claim.claim_id, json!({"status": "completed"}));
    assert_eq!(report.status, 200, "{}", body_text(&report));
    assert_eq!(edge.status(id)["status"], "completed");
    assert!(edge.ready("production").tasks.is_empty(), "its buffer entry is gone");
}

#[test]
fn two_batches_for_one_server_within_a_second_are_both_acked_and_listed() {
    let edge = Edge::new();
    let a = edge.submit(launch("vm-a", "production"));
    assert_eq!(edge.deliver(), [Delivery::Ack]);
    edge.clock.advance_ms(200);
    let b = edge.submit(launch("vm-b", "production"));
    assert_eq!(edge.deliver(), [Delivery::Ack], "a busy doorbell does not send the batch back");
    let listed: Vec<Uuid> = edge.ready("production").tasks.iter().map(|t| t.task_id).collect();
    assert_eq!(listed, [a, b]);
}

#[test]
fn a_long_poll_on_32_servers_stays_within_1000_operations() {
    let edge = Edge::new();
    let servers: Vec<String> = (0..32).map(|i| format!("server-{i}")).collect();
    let list = servers.join(",");
    let first = edge.consumer_call(Request::new("GET", &format!("/tasks/ready?server={list}")).bearer(CONSUMER));
    let bell = first.json_body::<Value>().unwrap()["bell"].as_str().unwrap().to_owned();
    let r = edge.consumer_call(
        Request::new("GET", &format!("/tasks/ready?server={list}&wait=30&hot=1&since={bell}")).bearer(CONSUMER),
    );
    assert_eq!(r.status, 200, "{}", body_text(&r));
    assert!(edge.invocation.ops() <= 1_000, "{} operations", edge.invocation.ops());
}

/// `targetServer` on an `op(...)` body.
trait TapServer {
    fn tap_server(self, server: &str) -> Value;
}

impl TapServer for Value {
    fn tap_server(mut self, server: &str) -> Value {
        self["payload"]["targetServer"] = json!(server);
        self
    }
}

#[test]
fn a_dead_lettered_message_whose_task_is_buffered_does_not_fail_it() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    let messages = edge.queue.drain();
    let bodies: Vec<Value> = messages.iter().map(|m| serde_json::to_value(m).unwrap()).collect();
    // The entry was written, but the batch was retried until the queue gave up (its doorbell
    // write kept failing): the message reaches the dead letter queue anyway.
    assert_eq!(block_on(edge.consumer().buffer_batch(&bodies)), [Delivery::Ack]);
    edge.clock.advance_ms(2_000);
    assert_eq!(block_on(edge.consumer().dead_letter_batch(&bodies)), [Delivery::Ack]);
    assert_eq!(edge.status(id)["status"], "pending", "a buffered task is left to its daemon");
    edge.clock.advance_ms(2_000);
    assert_eq!(edge.claim(id, None).status, 200);
}
