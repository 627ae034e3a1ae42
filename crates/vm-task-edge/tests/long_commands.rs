//! Files as operations and long commands at the edge: payload limits with a 400 naming the
//! field, a running long command cancelled through the API (intent, heartbeat answer, the
//! daemon's `cancelled` report), and what stays refused.

mod common;

use common::*;
use serde_json::{json, Value};
use uuid::Uuid;
use vm_task_edge::http::Request;

const SERVER: &str = "production";

fn long_command(vm: &str, timeout: u64) -> Value {
    json!({"type": "run_command", "payload": {
        "vmName": vm, "command": "sleep 600", "timeoutSeconds": timeout, "targetServer": SERVER
    }})
}

fn cancel(edge: &Edge, id: Uuid) -> (u16, Value) {
    let r = edge.api_call(Request::new("DELETE", &format!("/vm/tasks/{id}")).bearer(CLIENT));
    (r.status, r.json_body().unwrap())
}

fn heartbeat(edge: &Edge, id: Uuid, claim_id: Uuid) -> Value {
    let r = edge.consumer_call(
        Request::new("POST", &format!("/tasks/{id}/heartbeat"))
            .bearer(CONSUMER)
            .json_body(&json!({"claimId": claim_id})),
    );
    assert_eq!(r.status, 200, "{}", body_text(&r));
    r.json_body().unwrap()
}

/// Submitted, buffered and claimed by `host-a`.
fn running(edge: &Edge, body: Value) -> (Uuid, Uuid) {
    let id = edge.submit(body);
    edge.deliver();
    let claim = edge.claimed(id);
    (id, claim.claim_id)
}

#[test]
fn a_running_long_command_is_cancelled_through_the_heartbeat_and_the_daemons_report() {
    let edge = Edge::new();
    let (id, claim_id) = running(&edge, long_command("vm-1", 600));
    assert_eq!(heartbeat(&edge, id, claim_id).get("cancelRequested"), None, "no cancel asked yet");

    let (status, body) = cancel(&edge, id);
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "cancel_requested");
    assert_eq!(edge.status(id)["status"], "processing", "the daemon decides when the guest stopped");
    // Asking again changes nothing.
    assert_eq!(cancel(&edge, id).0, 202);

    assert_eq!(heartbeat(&edge, id, claim_id)["cancelRequested"], true);
    let report = edge.report(
        id,
        claim_id,
        json!({"status": "cancelled", "result": {"output": "started\n", "exitCode": 143}, "message": "stopped in the guest"}),
    );
    assert_eq!(report.status, 200, "{}", body_text(&report));
    let task = edge.detail(id);
    assert_eq!(task["status"], "cancelled");
    assert_eq!(task["result"]["output"], "started\n", "what ran so far is kept");
    assert_eq!(task["error"], "cancelled by client while running");
    let last = task["timeline"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["event"].as_str(), last["from"].as_str(), last["to"].as_str()),
        (Some("cancelled"), Some("processing"), Some("cancelled"))
    );
    assert_eq!(edge.ready(SERVER).count, 0, "the buffer entry is gone");
}

#[test]
fn a_daemon_cannot_report_cancelled_without_the_clients_cancel() {
    let edge = Edge::new();
    let (id, claim_id) = running(&edge, long_command("vm-1", 600));
    let report = edge.report(id, claim_id, json!({"status": "cancelled"}));
    assert_eq!(report.status, 409, "{}", body_text(&report));
    assert!(body_text(&report).contains("asked to cancel"), "{}", body_text(&report));
    assert_eq!(edge.status(id)["status"], "processing");
}

#[test]
fn short_and_non_command_tasks_stay_uncancellable_once_running() {
    let edge = Edge::new();
    for body in [
        long_command("vm-1", 30),
        json!({"type": "run_command", "payload": {"vmName": "vm-2", "command": "ls", "targetServer": SERVER}}),
        json!({"type": "stop_vm", "payload": {"vmName": "vm-3", "targetServer": SERVER}}),
    ] {
        let (id, claim_id) = running(&edge, body.clone());
        let (status, reply) = cancel(&edge, id);
        assert_eq!(status, 409, "{body}: {reply}");
        assert!(reply["error"].as_str().unwrap().contains("timeoutSeconds over 30"), "{reply}");
        assert_eq!(heartbeat(&edge, id, claim_id).get("cancelRequested"), None);
    }
}

#[test]
fn file_operations_are_accepted_and_their_limits_answer_400_naming_the_field() {
    let edge = Edge::new();
    let upload = json!({"type": "upload_files", "payload": {"vmName": "vm-1", "targetServer": SERVER,
        "files": [{"path": "a.txt", "content": "line one\nline \"two\"\n"}, {"path": "/etc/motd", "content": ""}]}});
    let id = edge.submit(upload);
    assert_eq!(edge.status(id)["type"], "upload_files");
    let id =
        edge.submit(json!({"type": "download_files", "payload": {"vmName": "vm-1", "paths": ["a.txt", "dir/b.txt"]}}));
    assert_eq!(edge.status(id)["targetServer"], SERVER, "routed by the registry like any VM task");

    let cases = [
        (json!({"type": "upload_files", "payload": {"vmName": "vm-1", "files": []}}), "payload.files"),
        (
            json!({"type": "upload_files", "payload": {"vmName": "vm-1", "files": [{"path": "big", "content": "x".repeat(48 * 1024 + 1)}]}}),
            "payload.files",
        ),
        (json!({"type": "download_files", "payload": {"vmName": "vm-1", "paths": ["a b"]}}), "payload.paths[0]"),
        (json!({"type": "download_files", "payload": {"vmName": "vm-1", "paths": ["../x"]}}), "payload.paths[0]"),
        (
            json!({"type": "run_command", "payload": {"vmName": "vm-1", "command": "ls", "timeoutSeconds": 3601}}),
            "payload.timeoutSeconds",
        ),
    ];
    for (body, field) in cases {
        let r = edge.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&body));
        assert_eq!(r.status, 400, "{}", body_text(&r));
        let reply: Value = r.json_body().unwrap();
        assert_eq!(reply["field"], field, "{reply}");
    }
    // A body over 64 KiB is refused before it is read, whatever it holds.
    let huge = json!({"type": "upload_files", "payload": {"vmName": "vm-1", "files": [{"path": "big", "content": "\u{1}".repeat(20_000)}]}});
    let r = edge.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&huge));
    assert_eq!(r.status, 413, "{}", body_text(&r));
}
