//! The sweep under production limits (issue #11 items 3 and 5): it finds every non-terminal
//! task with no buffer entry, whatever its age; it never spends more than its budget in a
//! run, keeps a cursor so consecutive runs cover everything, and reads no task record for
//! entries that are simply waiting.

mod common;

use common::*;
use futures::executor::block_on;
use serde_json::{json, Value};
use uuid::Uuid;
use vm_task_edge::{consumer::Delivery, http::Request, KvStore};

fn sweep(edge: &Edge) -> Value {
    let r = edge.consumer_call(Request::new("POST", "/admin/sweep").bearer(CONSUMER));
    assert_eq!(r.status, 200, "{}", body_text(&r));
    r.json_body().unwrap()
}

/// Delivers everything queued in batches of 100, as Cloudflare Queues would.
fn deliver_in_batches(edge: &Edge) {
    let messages = edge.queue.drain();
    for batch in messages.chunks(100) {
        let bodies: Vec<Value> = batch.iter().map(|m| serde_json::to_value(m).unwrap()).collect();
        let decisions = block_on(edge.consumer().buffer_batch(&bodies));
        assert!(decisions.iter().all(|d| *d == Delivery::Ack), "{decisions:?}");
    }
}

/// Removes a task's buffer entry behind the system's back (as a lost write or an operator would).
fn drop_entry(edge: &Edge, server: &str, id: Uuid) {
    block_on(edge.buffer.delete(&format!("ready:{server}:{id}"))).unwrap();
}

#[test]
fn a_processing_task_whose_entry_was_removed_is_buffered_again_and_returned_when_its_lease_ends() {
    let edge = Edge::new().across_locations(60);
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    edge.clock.advance_ms(2_000);
    edge.claim(id, Some(60));
    drop_entry(&edge, "production", id);
    // The lease ends at 60 s; the sweep acts once KV's 60 s propagation has passed too.
    edge.clock.advance_ms(61_000);
    assert_eq!(sweep(&edge)["returnedToReady"], 0, "the lease's end has not propagated everywhere yet");
    edge.clock.advance_ms(60_000);
    let report = sweep(&edge);
    assert_eq!(report["returnedToReady"], 1, "{report}");
    let ready = edge.ready("production");
    assert_eq!(ready.tasks.iter().map(|t| t.task_id).collect::<Vec<_>>(), [id], "a daemon can find it again");
    edge.clock.advance_ms(2_000);
    assert_eq!(edge.claim(id, None).status, 200);
}

#[test]
fn a_processing_task_whose_entry_was_removed_gets_it_back_while_its_lease_holds() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    edge.clock.advance_ms(2_000);
    edge.claim(id, Some(600));
    drop_entry(&edge, "production", id);
    edge.clock.advance_ms(61_000);
    assert_eq!(sweep(&edge)["rebuffered"], 1);
    assert_eq!(edge.ready("production").count, 1);
    assert_eq!(edge.status(id)["status"], "processing", "the sweep does not touch a live claim");
}

#[test]
fn a_pending_task_in_no_buffer_is_buffered_whatever_its_age() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.queue.drain(); // The message never reaches the consumer.
    edge.clock.advance_ms(2 * 3_600_000); // Older than the former RECONCILE_SECONDS window.
    assert_eq!(sweep(&edge)["rebuffered"], 1);
    assert_eq!(edge.ready("production").tasks[0].task_id, id);
}

#[test]
fn the_consumer_refuses_to_drop_the_entry_of_a_task_that_is_not_finished() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    let refuse = edge.consumer_call(Request::new("DELETE", &format!("/tasks/{id}")).bearer(CONSUMER));
    assert_eq!(refuse.status, 409, "{}", body_text(&refuse));
    assert_eq!(refuse.json_body::<Value>().unwrap()["currentStatus"], "pending");
    assert_eq!(edge.ready("production").count, 1, "the entry stays");
    edge.clock.advance_ms(2_000);
    let claim = edge.claimed(id);
    edge.clock.advance_ms(2_000);
    assert_eq!(edge.report(id, claim.claim_id, json!({"status": "completed"})).status, 200);
    let removed = edge.consumer_call(Request::new("DELETE", &format!("/tasks/{id}")).bearer(CONSUMER));
    assert_eq!(removed.status, 200, "{}", body_text(&removed));
}

/// 5,000 tasks over 50 servers, delivered; returns their ids.
fn five_thousand_tasks(edge: &Edge) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..5_000 {
        ids.push(edge.submit(launch(&format!("vm-{i}"), &format!("server-{}", i % 50))));
    }
    deliver_in_batches(edge);
    ids
}

#[test]
fn five_thousand_waiting_entries_cost_the_sweep_no_record_read() {
    let edge = Edge::new();
    five_thousand_tasks(&edge);
    let reads = edge.counters.snapshot().kv_reads;
    let report = sweep(&edge);
    assert_eq!(report["scanned"], 5_000, "{report}");
    assert_eq!(report["cycleComplete"], true);
    assert_eq!(edge.counters.snapshot().kv_reads - reads, 1, "only the sweep's own cursor is read: {report}");
    assert!(report["ops"].as_u64().unwrap() <= 20, "{report}");
}

#[test]
fn five_thousand_unclaimed_tasks_over_50_servers_all_fail_within_bounded_runs() {
    let mut edge = Edge::new();
    edge.consumer_config.max_queued_secs = 600;
    let ids = five_thousand_tasks(&edge);
    edge.clock.advance_ms(601_000);
    let mut runs = 0;
    loop {
        runs += 1;
        let report = sweep(&edge);
        assert!(report["ops"].as_u64().unwrap() <= 900, "{report}");
        assert!(edge.invocation.ops() <= 1_000);
        let left = edge.buffer.keys().iter().filter(|k| k.starts_with("ready:")).count();
        if left == 0 {
            break;
        }
        assert!(runs < 25, "still {left} entries after {runs} runs: {report}");
        edge.clock.advance_ms(60_000);
    }
    // Each failure costs three operations (read, save, remove): 15,000 in runs of 900.
    assert!(runs <= 18, "{runs} runs");
    for id in ids.iter().step_by(97) {
        let status = edge.status(*id);
        assert_eq!(status["status"], "failed", "{status}");
        assert!(status["error"].as_str().unwrap().contains("no daemon serving"), "{status}");
    }
}
