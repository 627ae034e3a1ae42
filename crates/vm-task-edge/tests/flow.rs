//! The task lifecycle through both services, natively: submit, buffer, claim, report, read.

mod common;

use common::*;
use serde_json::{json, Value};
use vm_task_edge::{consumer::Delivery, http::Request};
use vm_task_types::{
    wire::{ClaimResponse, OpCounts},
    Timestamp,
};

#[test]
fn a_launch_goes_from_submission_to_completed_with_a_readable_result() {
    let edge = Edge::new();
    let response =
        edge.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&launch("test-vm-001", "production")));
    assert_eq!(response.status, 202);
    let created: Value = response.json_body().unwrap();
    assert_eq!(created["success"], true);
    assert_eq!(created["status"], "pending");
    assert_eq!(created["message"], "VM launch task queued successfully");
    let id = created["taskId"].as_str().unwrap().parse().unwrap();
    assert_eq!(response.get_header("location"), Some(format!("/vm/tasks/{id}").as_str()));

    assert_eq!(edge.deliver(), vec![Delivery::Ack]);
    let ready = edge.ready("production");
    assert_eq!(ready.count, 1);
    assert_eq!(ready.tasks[0].task_id, id);
    assert_eq!(ready.tasks[0].vm_name, "test-vm-001");

    edge.clock.advance_ms(40);
    let claim = edge.claimed(id);
    assert_eq!(claim.task.status.as_str(), "processing");
    assert_eq!(claim.task.attempts, 1);
    // The report of `processing` the original daemon sent is accepted as a no-op.
    assert_eq!(edge.report(id, claim.claim_id, json!({"status": "processing"})).status, 200);

    edge.clock.advance_ms(500);
    let result = json!({"vmState": "RUNNING", "ip": "10.20.1.2", "portForwards": [{"hostPort": 3000, "guestPort": 5901, "description": "gui"}]});
    let r = edge.report(id, claim.claim_id, json!({"status": "completed", "result": result}));
    assert_eq!(r.status, 200, "{}", body_text(&r));

    let status = edge.status(id);
    assert_eq!(status["status"], "completed");
    assert_eq!(status["result"]["ip"], "10.20.1.2");
    assert!(
        edge.buffer.keys().iter().all(|k| !k.starts_with("ready:")),
        "buffer entry removed: {:?}",
        edge.buffer.keys()
    );

    let timeline = edge.detail(id)["timeline"].clone();
    let events: Vec<&str> = timeline.as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["created", "buffered", "claimed", "completed"]);
    assert_eq!(timeline[3]["from"], "processing");
    assert_eq!(timeline[3]["actor"], "host-a");

    let vm: Value = edge.api_call(Request::new("GET", "/vm/test-vm-001/status").bearer(CLIENT)).json_body().unwrap();
    assert_eq!(vm["state"], "RUNNING");
    assert_eq!(vm["ip"], "10.20.1.2");
    assert_eq!(vm["server"], "production");
    assert_eq!(vm["lastTaskStatus"], "completed");
}

#[test]
fn all_seven_operations_are_accepted_and_later_ones_route_through_the_registry() {
    let edge = Edge::new();
    let first = edge.submit(launch("vm-1", "production"));
    let bodies = [
        json!({"type": "run_command", "payload": {"vmName": "vm-1", "command": "echo Hello from VM", "blocking": true}}),
        json!({"type": "snapshot_vm", "payload": {"vmName": "vm-1"}}),
        op("pause_vm", "vm-1"),
        op("resume_vm", "vm-1"),
        op("stop_vm", "vm-1"),
        op("delete_vm", "vm-1"),
    ];
    let mut previous = first;
    for body in bodies {
        let id = edge.submit(body);
        let task = edge.detail(id);
        assert_eq!(task["targetServer"], "production", "routed by the registry");
        assert_eq!(task["previousTaskId"], json!(previous), "chained to the VM's previous task");
        previous = id;
    }
    let snapshot = &edge.detail(edge.queue.drain()[2].task_id)["payload"]["snapshotId"];
    assert!(snapshot.as_str().unwrap().starts_with("vm-1-"), "generated snapshot id: {snapshot}");
}

/// Runs one buffered task to completion with the given result.
fn run(edge: &Edge, id: uuid::Uuid, result: Value) {
    edge.deliver();
    let claim = edge.claimed(id);
    let r = edge.report(id, claim.claim_id, json!({"status": "completed", "result": result}));
    assert_eq!(r.status, 200, "{}", body_text(&r));
}

#[test]
fn a_submission_reads_only_the_registry_and_the_host_check_and_the_status_route_still_sees_every_result() {
    let edge = Edge::new();
    let launched = edge.submit(launch("vm-1", "production"));
    run(&edge, launched, json!({"ip": "10.20.1.2", "vmState": "RUNNING"}));
    let reads = edge.counters.snapshot().kv_reads;
    let command = edge.submit(json!({"type": "run_command", "payload": {"vmName": "vm-1", "command": "true"}}));
    assert_eq!(edge.counters.snapshot().kv_reads - reads, 2, "the registry and the host check, no fold");
    run(&edge, command, json!({"exitCode": 0}));

    // More lifecycle tasks than the registry remembers unfolded: the oldest are folded to
    // make room, so the launch's address survives a long run of pauses and resumes.
    for i in 0..20 {
        let id = edge.submit(op(if i % 2 == 0 { "pause_vm" } else { "resume_vm" }, "vm-1"));
        run(&edge, id, json!({}));
    }
    let vm: Value = edge.api_call(Request::new("GET", "/vm/vm-1/status").bearer(CLIENT)).json_body().unwrap();
    assert_eq!((vm["state"].as_str(), vm["ip"].as_str()), (Some("RUNNING"), Some("10.20.1.2")), "{vm}");
}

#[test]
fn the_vm_status_route_reads_the_registry_and_each_unfolded_task_once() {
    let edge = Edge::new();
    let launched = edge.submit(launch("vm-1", "production"));
    run(&edge, launched, json!({"ip": "10.20.1.2", "vmState": "RUNNING"}));
    let reads = edge.counters.snapshot().kv_reads;
    let vm: Value = edge.api_call(Request::new("GET", "/vm/vm-1/status").bearer(CLIENT)).json_body().unwrap();
    assert_eq!((vm["ip"].as_str(), vm["lastTaskStatus"].as_str()), (Some("10.20.1.2"), Some("completed")));
    assert_eq!(edge.counters.snapshot().kv_reads - reads, 2, "the registry and the launch, once");
}

#[test]
fn a_vm_nobody_launched_needs_a_target_server() {
    let edge = Edge::new();
    let r = edge.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&op("stop_vm", "ghost")));
    assert_eq!(r.status, 422);
    let body: Value = r.json_body().unwrap();
    assert_eq!(body["field"], "payload.targetServer");
    assert!(body["error"].as_str().unwrap().contains("not in the registry"));
}

#[test]
fn tasks_list_newest_first_from_metadata_with_signed_cursors() {
    let edge = Edge::new();
    let ids: Vec<_> = (0..5)
        .map(|i| {
            edge.clock.advance_ms(10);
            edge.submit(launch(&format!("vm-{i}"), "production"))
        })
        .collect();
    let reads_before = edge.counters.snapshot().kv_reads;
    let page1: Value = edge.api_call(Request::new("GET", "/vm/tasks?limit=3").bearer(CLIENT)).json_body().unwrap();
    assert_eq!(edge.counters.snapshot().kv_reads, reads_before, "listing reads no values");
    let listed: Vec<&str> = page1["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [ids[4].to_string(), ids[3].to_string(), ids[2].to_string()]);
    assert_eq!(page1["listComplete"], false);
    let cursor = page1["cursor"].as_str().unwrap();
    let page2: Value = edge
        .api_call(Request::new("GET", &format!("/vm/tasks?limit=3&cursor={cursor}")).bearer(CLIENT))
        .json_body()
        .unwrap();
    assert_eq!(page2["count"], 2);
    assert_eq!(page2["listComplete"], true);
    assert_eq!(page2["tasks"][1]["id"], json!(ids[0]));

    let forged = edge.api_call(Request::new("GET", "/vm/tasks?cursor=task:000").bearer(CLIENT));
    assert_eq!(forged.status, 400);
    assert_eq!(forged.json_body::<Value>().unwrap()["code"], "invalid_cursor");
}

#[test]
fn a_task_costs_six_kv_reads_when_the_daemon_sends_the_buffering_time() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    let entry = edge.ready("production").tasks.remove(0);
    let reads_before = edge.counters.snapshot().kv_reads;
    edge.clock.advance_ms(40);
    let claim = edge.consumer_call(
        Request::new("POST", &format!("/tasks/{id}/claim"))
            .bearer(CONSUMER)
            .json_body(&json!({"consumerId": "host-a", "bufferedAt": entry.buffered_at})),
    );
    assert_eq!(claim.status, 200, "{}", body_text(&claim));
    assert_eq!(
        edge.counters.snapshot().kv_reads - reads_before,
        2,
        "the claim reads the task record and the cancel intent, not the entry"
    );
    let claim: ClaimResponse = claim.json_body().unwrap();
    assert_eq!(claim.task.event_at("buffered"), Some(entry.buffered_at));
    edge.report(id, claim.claim_id, json!({"status": "completed"}));
    // POST: registry, host check; buffering: none; ready: doorbell; claim: task, cancel
    // intent; report: task.
    assert_eq!(edge.counters.snapshot().kv_reads, 6);
}

#[test]
fn a_buffering_time_outside_the_tasks_life_is_clamped() {
    let edge = Edge::new();
    let early = edge.submit(launch("vm-1", "production"));
    let late = edge.submit(launch("vm-2", "production"));
    edge.deliver();
    // Over a second later, as real hand-offs are: a claim within the second waits the task
    // record's write window out, which would move the claim's clock.
    edge.clock.advance_ms(1_040);
    for (id, sent, expected) in [(early, "1970-01-01T00:00:00.000Z", 0), (late, "2999-01-01T00:00:00.000Z", 1_040)] {
        let r = edge.consumer_call(
            Request::new("POST", &format!("/tasks/{id}/claim"))
                .bearer(CONSUMER)
                .json_body(&json!({"consumerId": "host-a", "bufferedAt": sent})),
        );
        assert_eq!(r.status, 200, "{}", body_text(&r));
        let claim: ClaimResponse = r.json_body().unwrap();
        assert_eq!(claim.task.event_at("buffered"), Some(Timestamp(START_MS + expected)), "{sent}");
    }
}

#[test]
fn a_lone_task_costs_seven_writes_one_delete_and_one_list() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    edge.ready("production");
    // A second apart, as real VM work is: a faster hand-off spends one refused write (429)
    // on the task record before waiting its window out.
    edge.clock.advance_ms(1_000);
    let claim = edge.claimed(id);
    edge.clock.advance_ms(1_000);
    edge.report(id, claim.claim_id, json!({"status": "completed"}));
    let OpCounts { kv_writes, kv_deletes, kv_lists, queue_sends, .. } = edge.counters.snapshot();
    // Writes: task created, registry, buffer entry, doorbell, claim intent, claim, completion.
    assert_eq!((kv_writes, kv_deletes, kv_lists, queue_sends), (7, 1, 1, 1));
}
