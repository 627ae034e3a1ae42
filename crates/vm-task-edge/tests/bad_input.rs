//! Bad input to both services, natively: every case is a 4xx whose JSON body names the
//! problem (`code`, `field` where one is at fault, and a message a person can act on).
//!
//! The cases are the table in `vm_task_edge::bad_input`, which the stack's e2e tests send over
//! HTTP to the real workers; the tests below add what needs state or a positive control.

mod common;

use common::*;
use serde_json::{json, Value};
use vm_task_edge::{
    bad_input::{self, Case, Fixture, Token, Worker, UNKNOWN_ID},
    http::{Request, Response},
};
use vm_task_types::{wire::ErrorBody, Limits};

/// Decodes the error body, checking the status, `success: false`, the JSON content type, the
/// code and the field, and that the message contains every one of `needles`.
#[track_caller]
fn assert_error(r: &Response, status: u16, code: &str, field: Option<&str>, needles: &[&str]) -> ErrorBody {
    let text = body_text(r);
    assert_eq!(r.status, status, "status of {text}");
    assert_eq!(r.get_header("content-type"), Some("application/json"), "{text}");
    let body: ErrorBody = r.json_body().unwrap_or_else(|e| panic!("not an ErrorBody ({e}): {text}"));
    assert!(!body.success, "{text}");
    assert_eq!(body.code, code, "{text}");
    assert_eq!(body.field.as_deref(), field, "{text}");
    for needle in needles {
        assert!(body.error.contains(needle), "message should contain {needle:?}: {text}");
    }
    body
}

fn post_tasks(edge: &Edge, body: &[u8], content_type: Option<&str>) -> Response {
    let mut request = Request::new("POST", "/vm/tasks").bearer(CLIENT);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    request.body = body.to_vec();
    edge.api_call(request)
}

fn submit(edge: &Edge, body: &Value) -> Response {
    edge.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(body))
}

fn submit_with_key(edge: &Edge, key: &str, body: &Value) -> Response {
    edge.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).header("idempotency-key", key).json_body(body))
}

fn stop(vm_name: &str) -> Value {
    json!({"type": "stop_vm", "payload": {"vmName": vm_name, "targetServer": "production"}})
}

fn client_get(edge: &Edge, path: &str) -> Response {
    edge.api_call(Request::new("GET", path).bearer(CLIENT))
}

fn consumer(edge: &Edge, method: &str, path: &str, body: Option<Value>) -> Response {
    let mut request = Request::new(method, path).bearer(CONSUMER);
    if let Some(body) = body {
        request = request.json_body(&body);
    }
    edge.consumer_call(request)
}

/// Sends one table case to the in-memory services.
fn send(edge: &Edge, case: &Case) -> Response {
    let mut request = Request::new(case.method, &case.path);
    request = match case.token {
        Token::None => request,
        Token::Client => request.bearer(CLIENT),
        Token::Consumer => request.bearer(CONSUMER),
        Token::Other(token) => request.bearer(token),
    };
    for (name, value) in &case.headers {
        request = request.header(name, value);
    }
    if let Some(body) = &case.body {
        request.body = body.clone();
    }
    match case.worker {
        Worker::Api => edge.api_call(request),
        Worker::Consumer => edge.consumer_call(request),
    }
}

#[test]
fn every_case_of_the_bad_input_table_is_a_4xx_naming_the_problem() {
    let edge = Edge::new();
    let existing_id = edge.submit(stop("vm-1")).to_string();
    edge.submit(stop("vm-2"));
    let page: Value = client_get(&edge, "/vm/tasks?limit=1").json_body().unwrap();
    let genuine_cursor = page["cursor"].as_str().expect("a cursor to the second page").to_owned();
    let cases = bad_input::cases(&Fixture { existing_id, genuine_cursor });
    assert!(cases.len() > 100, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let r = send(&edge, case);
        let outcome = std::panic::catch_unwind(|| {
            let needles: Vec<&str> = case.needles.iter().map(String::as_str).collect();
            assert_error(&r, case.status, case.code, case.field, &needles);
            for (name, value) in &case.expect_headers {
                assert_eq!(r.get_header(name), Some(*value), "header {name}");
            }
        });
        if outcome.is_err() {
            failures.push(format!("{} ({} {}): {}", case.name, case.method, case.path, body_text(&r)));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n  {}", failures.len(), cases.len(), failures.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// What the table cannot say: positive controls beside each limit, and cases that need state.

#[test]
fn json_media_types_and_a_missing_content_type_are_read_as_json() {
    let edge = Edge::new();
    let body = serde_json::to_vec(&stop("vm-1")).unwrap();
    for ct in [Some("application/json; charset=utf-8"), Some("application/merge-patch+json"), None] {
        assert_eq!(post_tasks(&edge, &body, ct).status, 202, "{ct:?}");
    }
}

#[test]
fn names_and_commands_at_their_limits_are_accepted() {
    let edge = Edge::new();
    assert_eq!(submit(&edge, &stop(&"v".repeat(63))).status, 202, "63 characters are fine");
    let command = json!({"type": "run_command", "payload": {"vmName": "vm-1", "command": "x".repeat(Limits::COMMAND_MAX_BYTES), "targetServer": "p"}});
    assert_eq!(submit(&edge, &command).status, 202, "16384 bytes are fine");
}

#[test]
fn a_body_over_64_kib_is_a_413_naming_its_size() {
    let edge = Edge::new();
    let padding = "m".repeat(Limits::BODY_MAX_BYTES);
    let body = json!({"type": "launch_vm", "payload": {"vmName": "vm-1", "vmConfig": {"memory": padding}}});
    let bytes = serde_json::to_vec(&body).unwrap();
    let r = post_tasks(&edge, &bytes, Some("application/json"));
    let expected = format!("request body is {} bytes; the limit is 65536 bytes", bytes.len());
    assert_error(&r, 413, "payload_too_large", None, &[&expected]);
}

#[test]
fn wait_zero_and_a_genuine_cursor_are_accepted() {
    let edge = Edge::new();
    let id = edge.submit(stop("vm-1"));
    for i in 0..3 {
        edge.submit(stop(&format!("vm-{i}")));
    }
    assert_eq!(client_get(&edge, &format!("/vm/tasks/{id}/status?wait=0")).status, 200);
    let page: Value = client_get(&edge, "/vm/tasks?limit=1").json_body().unwrap();
    let genuine = page["cursor"].as_str().expect("a cursor to the second page").to_owned();
    assert_eq!(client_get(&edge, &format!("/vm/tasks?limit=1&cursor={genuine}")).status, 200);
    assert_eq!(consumer(&edge, "GET", "/tasks/ready?server=production&wait=0", None).status, 200);
}

#[test]
fn a_bad_idempotency_key_queues_nothing() {
    let edge = Edge::new();
    let r = submit_with_key(&edge, "has space", &stop("vm-1"));
    assert_error(&r, 400, "invalid_idempotency_key", Some("Idempotency-Key"), &["1 to 255 visible ASCII characters"]);
    assert!(edge.queue.drain().is_empty(), "nothing was queued");
    assert_eq!(submit_with_key(&edge, &"k".repeat(255), &stop("vm-1")).status, 202);
}

#[test]
fn the_same_idempotency_key_with_a_different_body_is_a_422() {
    let edge = Edge::new();
    let first = submit_with_key(&edge, "order-42", &stop("vm-1"));
    assert_eq!(first.status, 202, "{}", body_text(&first));
    let id = first.json_body::<Value>().unwrap()["taskId"].clone();
    let replay = submit_with_key(&edge, "order-42", &stop("vm-1"));
    assert_eq!(replay.status, 200, "same key and body: the first task again");
    assert_eq!(replay.json_body::<Value>().unwrap()["taskId"], id);

    let r = submit_with_key(&edge, "order-42", &stop("vm-2"));
    let expected = format!("Idempotency-Key was already used for task {} with a different body", id.as_str().unwrap());
    assert_error(&r, 422, "idempotency_key_reused", Some("Idempotency-Key"), &[&expected]);
    assert_eq!(edge.queue.drain().len(), 1, "one task queued in all");
}

#[test]
fn a_report_for_an_unknown_task_is_a_404_even_with_a_claim_id() {
    let edge = Edge::new();
    let r = edge.api_call(
        Request::new("PUT", &format!("/vm/tasks/{UNKNOWN_ID}/status"))
            .bearer(CONSUMER)
            .json_body(&json!({"status": "completed", "claimId": UNKNOWN_ID})),
    );
    assert_error(&r, 404, "not_found", None, &["not found"]);
}
