//! Webhooks through the real handlers: the report, the cancel and the dead letter queue each
//! queue exactly one event for a task that carries a `callbackUrl`, and only once terminal.

mod common;

use common::*;
use futures::executor::block_on;
use serde_json::json;
use vm_task_edge::http::Request;
use vm_task_types::TaskStatus;

const HOOK: &str = "https://hooks.example.com/vm";

fn with_callback(mut body: serde_json::Value) -> serde_json::Value {
    body["callbackUrl"] = json!(HOOK);
    body
}

#[test]
fn a_reported_task_queues_exactly_one_event_after_its_terminal_write() {
    let edge = Edge::new();
    let id = edge.submit(with_callback(launch("vm-1", "host-a")));
    assert_eq!(edge.detail(id)["callbackUrl"], HOOK, "kept on the record");
    edge.deliver();
    let claim = edge.claimed(id);
    assert!(edge.webhooks.drain().is_empty(), "nothing before the task is terminal");
    let r = edge.report(id, claim.claim_id, json!({"status": "completed", "result": {"vmState": "RUNNING"}}));
    assert_eq!(r.status, 200, "{}", body_text(&r));
    let sent = edge.webhooks.drain();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let (message, delay) = &sent[0];
    assert_eq!((message.url.as_str(), *delay, message.attempt), (HOOK, 0, 1));
    let event: serde_json::Value = serde_json::from_str(&message.body).unwrap();
    assert_eq!(event, edge.status(id), "the event is the task's status body");
    // A repeated report is a no-op: no second event.
    edge.clock.advance_ms(1_000);
    edge.report(id, claim.claim_id, json!({"status": "completed", "result": {"vmState": "RUNNING"}}));
    assert!(edge.webhooks.drain().is_empty());
}

#[test]
fn a_cancelled_task_queues_its_event() {
    let edge = Edge::new();
    let id = edge.submit(with_callback(op("stop_vm", "vm-1")).tap_server());
    let r = edge.api_call(Request::new("DELETE", &format!("/vm/tasks/{id}")).bearer(CLIENT));
    assert_eq!(r.status, 200, "{}", body_text(&r));
    let sent = edge.webhooks.drain();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].0.body.contains(r#""status":"cancelled""#));
}

#[test]
fn a_dead_lettered_task_queues_its_event() {
    let edge = Edge::new();
    let id = edge.submit(with_callback(launch("vm-1", "host-a")));
    let bodies: Vec<serde_json::Value> = edge.queue.drain().iter().map(|m| serde_json::to_value(m).unwrap()).collect();
    block_on(edge.consumer().dead_letter_batch(&bodies));
    assert_eq!(edge.status(id)["status"], json!(TaskStatus::Failed));
    let sent = edge.webhooks.drain();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].0.body.contains(r#""status":"failed""#));
}

#[test]
fn a_task_without_callback_and_no_webhook_urls_queues_nothing() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "host-a"));
    edge.deliver();
    let claim = edge.claimed(id);
    edge.report(id, claim.claim_id, json!({"status": "failed", "error": "boom"}));
    assert!(edge.webhooks.drain().is_empty());
}

trait TapServer {
    fn tap_server(self) -> Self;
}

impl TapServer for serde_json::Value {
    /// Gives an op body a target server (the test edge has no default).
    fn tap_server(mut self) -> Self {
        self["payload"]["targetServer"] = json!("host-a");
        self
    }
}

/// What webhooks add per task, as BENCHMARKS.md prices it: the terminal write's producer reads
/// and writes nothing (it has the record in hand) and sends one message; each attempt reads
/// the record once and writes it once (its timeline entry).
#[test]
fn the_producer_costs_one_message_and_each_attempt_one_read_and_one_write() {
    use vm_task_edge::{
        memory::ScriptedFetch,
        webhooks::{Disposition, FetchOutcome, WebhookDelivery, WebhookSecret},
    };
    let edge = Edge::new();
    let id = edge.submit(with_callback(launch("vm-1", "host-a")));
    edge.deliver();
    let claim = edge.claimed(id);
    edge.clock.advance_ms(1_000);
    let before = edge.counters.snapshot();
    let r = edge.report(id, claim.claim_id, json!({"status": "completed"}));
    assert_eq!(r.status, 200);
    let report = edge.counters.snapshot();
    let sent = edge.webhooks.drain();
    assert_eq!(sent.len(), 1);

    // The same report without a callback, for the difference.
    let plain = edge.submit(launch("vm-2", "host-a"));
    edge.deliver();
    let plain_claim = edge.claimed(plain);
    edge.clock.advance_ms(1_000);
    let plain_before = edge.counters.snapshot();
    edge.report(plain, plain_claim.claim_id, json!({"status": "completed"}));
    let plain_after = edge.counters.snapshot();
    assert_eq!(report.kv_reads - before.kv_reads, plain_after.kv_reads - plain_before.kv_reads);
    assert_eq!(report.kv_writes - before.kv_writes, plain_after.kv_writes - plain_before.kv_writes);

    let tasks = edge.task_store();
    let fetch = ScriptedFetch::answering([FetchOutcome::Status(503)]);
    let delivery = WebhookDelivery {
        tasks: &tasks,
        queue: edge.webhooks.clone(),
        fetch,
        clock: edge.clock.clone(),
        secret: Some(WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()),
    };
    edge.clock.advance_ms(1_000);
    let before = edge.counters.snapshot();
    assert_eq!(block_on(delivery.deliver(&sent[0].0)), Disposition::Ack);
    let after = edge.counters.snapshot();
    assert_eq!((after.kv_reads - before.kv_reads, after.kv_writes - before.kv_writes), (1, 1));
    assert_eq!(edge.webhooks.drain().len(), 1, "the 503 queued one next attempt");
}

/// The queue refuses the event: the report still succeeds, and the note lands on the record as
/// the key's second write, about a second after the first, on a KV that refuses a second write
/// within a second as production does (the note's write is paced).
#[test]
fn a_refused_event_is_noted_under_the_one_write_per_second_limit() {
    let edge = Edge::new();
    let id = edge.submit(with_callback(launch("vm-1", "host-a")));
    edge.deliver();
    let claim = edge.claimed(id);
    edge.clock.advance_ms(1_000);
    edge.webhooks.fail_sends(true);
    let r = edge.report(id, claim.claim_id, json!({"status": "completed"}));
    assert_eq!(r.status, 200, "{}", body_text(&r));
    let task = edge.detail(id);
    assert_eq!(task["status"], "completed");
    let notes: Vec<&str> = task["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "webhook")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("not queued after 3 tries"), "{notes:?}");
}
