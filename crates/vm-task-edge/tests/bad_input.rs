//! Bad input to both services, natively: every case is a 4xx whose JSON body names the
//! problem (`code`, `field` where one is at fault, and a message a person can act on).
//!
//! `crates/stack/tests/bad_input.rs` sends the same requests over HTTP to the real workers.

mod common;

use common::*;
use serde_json::{json, Value};
use vm_task_edge::{
    auth::sign_cursor,
    http::{Request, Response},
};
use vm_task_types::{wire::ErrorBody, Limits};

/// A v7 UUID no task has.
const UNKNOWN_ID: &str = "0190b5a4-3b7c-7def-8abc-0123456789ab";

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

// ---------------------------------------------------------------------------------------------
// Bodies

#[test]
fn malformed_json_is_a_400_that_quotes_the_parser() {
    let edge = Edge::new();
    let r = post_tasks(&edge, br#"{"type": "stop_vm", "payload": {"vmName": "#, Some("application/json"));
    assert_error(&r, 400, "malformed_json", None, &["request body is not valid JSON", "EOF"]);
    let r = post_tasks(&edge, b"{'type': 'stop_vm'}", Some("application/json"));
    assert_error(&r, 400, "malformed_json", None, &["key must be a string"]);
}

#[test]
fn an_empty_body_is_a_400() {
    let edge = Edge::new();
    for body in [&b""[..], b"  \n"] {
        let r = post_tasks(&edge, body, Some("application/json"));
        assert_error(&r, 400, "empty_body", None, &["request body is empty"]);
    }
}

#[test]
fn a_body_that_is_not_json_by_content_type_is_a_415() {
    let edge = Edge::new();
    let body = serde_json::to_vec(&stop("vm-1")).unwrap();
    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let r = post_tasks(&edge, &body, Some(ct));
        assert_error(&r, 415, "unsupported_media_type", None, &[ct, "send application/json"]);
    }
    // JSON media types and a missing Content-Type are read as JSON.
    for ct in [Some("application/json; charset=utf-8"), Some("application/merge-patch+json"), None] {
        assert_eq!(post_tasks(&edge, &body, ct).status, 202, "{ct:?}");
    }
}

#[test]
fn a_body_that_is_not_an_object_is_a_400() {
    let edge = Edge::new();
    for body in [json!([]), json!("stop_vm"), json!(3)] {
        let r = submit(&edge, &body);
        assert_error(&r, 400, "invalid_field", Some("body"), &["must be a JSON object with `type` and `payload`"]);
    }
}

#[test]
fn an_unknown_operation_is_a_400_listing_the_known_ones() {
    let edge = Edge::new();
    let r = submit(&edge, &json!({"type": "reboot_vm", "payload": {"vmName": "vm-1"}}));
    assert_error(
        &r,
        400,
        "invalid_field",
        Some("type"),
        &["unknown operation \"reboot_vm\"", "launch_vm", "run_command"],
    );
    let r = submit(&edge, &json!({"type": 7, "payload": {"vmName": "vm-1"}}));
    assert_error(&r, 400, "invalid_field", Some("type"), &["must be a string"]);
}

#[test]
fn a_missing_type_or_payload_is_named() {
    let edge = Edge::new();
    let r = submit(&edge, &json!({"payload": {"vmName": "vm-1"}}));
    assert_error(&r, 400, "invalid_field", Some("type"), &["type: is required"]);
    let r = submit(&edge, &json!({"type": "stop_vm"}));
    assert_error(&r, 400, "invalid_field", Some("payload"), &["payload: is required"]);
    let r = submit(&edge, &json!({"type": "stop_vm", "payload": "vm-1"}));
    assert_error(&r, 400, "invalid_field", Some("payload"), &["must be a JSON object"]);
}

#[test]
fn every_operation_without_vm_name_names_the_missing_field() {
    let edge = Edge::new();
    for kind in vm_task_types::OperationKind::ALL {
        let payload = if kind.as_str() == "run_command" { json!({"command": "ls"}) } else { json!({}) };
        let r = submit(&edge, &json!({"type": kind.as_str(), "payload": payload}));
        let expected = format!("invalid {kind} payload: missing field `vmName`");
        assert_error(&r, 400, "invalid_field", Some("payload"), &[&expected]);
    }
}

#[test]
fn run_command_without_a_command_names_the_missing_field() {
    let edge = Edge::new();
    let r = submit(&edge, &json!({"type": "run_command", "payload": {"vmName": "vm-1"}}));
    assert_error(&r, 400, "invalid_field", Some("payload"), &["invalid run_command payload: missing field `command`"]);
    let r = submit(&edge, &json!({"type": "run_command", "payload": {"vmName": "vm-1", "command": " \n\t"}}));
    assert_error(&r, 400, "invalid_field", Some("payload.command"), &["must not be empty or only whitespace"]);
}

#[test]
fn unknown_and_mistyped_fields_are_named() {
    let edge = Edge::new();
    let r = submit(&edge, &json!({"type": "stop_vm", "payload": {"vmName": "vm-1"}, "priority": 1}));
    assert_error(&r, 400, "invalid_field", Some("priority"), &["unknown top-level field"]);
    let r = submit(&edge, &json!({"type": "stop_vm", "payload": {"vmName": "vm-1", "vmname": "vm-2"}}));
    assert_error(&r, 400, "invalid_field", Some("payload"), &["unknown field `vmname`", "expected `vmName`"]);
    let r = submit(&edge, &json!({"type": "stop_vm", "payload": {"vmName": 3}}));
    assert_error(&r, 400, "invalid_field", Some("payload"), &["invalid type: integer `3`, expected a string"]);
    let r =
        submit(&edge, &json!({"type": "run_command", "payload": {"vmName": "v", "command": "ls", "blocking": "yes"}}));
    assert_error(&r, 400, "invalid_field", Some("payload"), &["invalid type: string \"yes\", expected a boolean"]);
}

// ---------------------------------------------------------------------------------------------
// Names

#[test]
fn a_vm_name_with_a_slash_is_refused() {
    let edge = Edge::new();
    assert_error(&submit(&edge, &stop("a/b")), 400, "invalid_field", Some("payload.vmName"), &["contains '/'"]);
    assert_error(&submit(&edge, &stop("../etc")), 400, "invalid_field", Some("payload.vmName"), &["contains '/'"]);
    // In the path: `%2F` is decoded to a slash inside the segment, then refused.
    let r = client_get(&edge, "/vm/a%2Fb/status");
    assert_error(&r, 400, "invalid_field", Some("vmName"), &["contains '/'"]);
}

#[test]
fn a_vm_name_of_dots_is_refused() {
    let edge = Edge::new();
    for name in ["..", ".", ".hidden", "-rf"] {
        let r = submit(&edge, &stop(name));
        assert_error(&r, 400, "invalid_field", Some("payload.vmName"), &["must not start with '.' or '-'"]);
    }
    let r = client_get(&edge, "/vm/../status");
    assert_error(&r, 400, "invalid_field", Some("vmName"), &["must not start with '.' or '-'"]);
}

#[test]
fn a_vm_name_with_spaces_is_refused() {
    let edge = Edge::new();
    assert_error(&submit(&edge, &stop("my vm")), 400, "invalid_field", Some("payload.vmName"), &["contains ' '"]);
    assert_error(&submit(&edge, &stop(" vm")), 400, "invalid_field", Some("payload.vmName"), &["contains ' '"]);
    let r = client_get(&edge, "/vm/my%20vm/status");
    assert_error(&r, 400, "invalid_field", Some("vmName"), &["contains ' '"]);
}

#[test]
fn a_vm_name_over_63_characters_is_refused() {
    let edge = Edge::new();
    let r = submit(&edge, &stop(&"v".repeat(64)));
    assert_error(&r, 400, "invalid_field", Some("payload.vmName"), &["must be at most 63 characters, got 64"]);
    assert_eq!(submit(&edge, &stop(&"v".repeat(63))).status, 202, "63 characters are fine");
    let r = submit(&edge, &stop(""));
    assert_error(&r, 400, "invalid_field", Some("payload.vmName"), &["must not be empty"]);
}

#[test]
fn a_non_ascii_vm_name_is_refused() {
    let edge = Edge::new();
    let r = submit(&edge, &stop("naïve-vm"));
    assert_error(&r, 400, "invalid_field", Some("payload.vmName"), &["contains 'ï'"]);
    let r = submit(&edge, &stop("vm-😀"));
    assert_error(&r, 400, "invalid_field", Some("payload.vmName"), &["contains '😀'"]);
    let r = client_get(&edge, "/vm/na%C3%AFve/status");
    assert_error(&r, 400, "invalid_field", Some("vmName"), &["contains 'ï'"]);
}

#[test]
fn a_bad_target_server_or_snapshot_id_is_named() {
    let edge = Edge::new();
    let r = submit(&edge, &json!({"type": "stop_vm", "payload": {"vmName": "vm-1", "targetServer": "prod:1"}}));
    assert_error(&r, 400, "invalid_field", Some("payload.targetServer"), &["contains ':'"]);
    let r =
        submit(&edge, &json!({"type": "snapshot_vm", "payload": {"vmName": "vm-1", "snapshotId": "s".repeat(129)}}));
    assert_error(&r, 400, "invalid_field", Some("payload.snapshotId"), &["at most 128 characters"]);
    let launch =
        json!({"type": "launch_vm", "payload": {"vmName": "vm-1", "vmConfig": {"kernel": ""}, "targetServer": "p"}});
    assert_error(
        &submit(&edge, &launch),
        400,
        "invalid_field",
        Some("payload.vmConfig.kernel"),
        &["must not be empty"],
    );
}

#[test]
fn no_target_server_for_an_unknown_vm_is_a_422() {
    let edge = Edge::new();
    let r = submit(&edge, &json!({"type": "stop_vm", "payload": {"vmName": "ghost"}}));
    assert_error(
        &r,
        422,
        "no_target_server",
        Some("payload.targetServer"),
        &["payload.targetServer is required", "\"ghost\""],
    );
}

// ---------------------------------------------------------------------------------------------
// Sizes

#[test]
fn a_command_over_16_kib_is_refused() {
    let edge = Edge::new();
    let command = |len: usize| json!({"type": "run_command", "payload": {"vmName": "vm-1", "command": "x".repeat(len), "targetServer": "p"}});
    let r = submit(&edge, &command(Limits::COMMAND_MAX_BYTES + 1));
    assert_error(&r, 400, "invalid_field", Some("payload.command"), &["must be at most 16384 bytes, got 16385"]);
    // Bytes, not characters: 8193 two-byte characters are 16386 bytes.
    let wide =
        json!({"type": "run_command", "payload": {"vmName": "vm-1", "command": "é".repeat(8193), "targetServer": "p"}});
    assert_error(&submit(&edge, &wide), 400, "invalid_field", Some("payload.command"), &["got 16386"]);
    assert_eq!(submit(&edge, &command(Limits::COMMAND_MAX_BYTES)).status, 202, "16384 bytes are fine");
}

#[test]
fn a_body_over_64_kib_is_a_413() {
    let edge = Edge::new();
    let padding = "m".repeat(Limits::BODY_MAX_BYTES);
    let body = json!({"type": "launch_vm", "payload": {"vmName": "vm-1", "vmConfig": {"memory": padding}}});
    let bytes = serde_json::to_vec(&body).unwrap();
    let r = post_tasks(&edge, &bytes, Some("application/json"));
    let expected = format!("request body is {} bytes; the limit is 65536 bytes", bytes.len());
    assert_error(&r, 413, "payload_too_large", None, &[&expected]);
    // The consumer's bodies have the same limit.
    let r = consumer(&edge, "POST", &format!("/tasks/{UNKNOWN_ID}/claim"), Some(json!({"consumerId": padding})));
    assert_error(&r, 413, "payload_too_large", None, &["the limit is 65536 bytes"]);
}

// ---------------------------------------------------------------------------------------------
// Ids

/// Every route with a task id, as `(consumer worker?, method, path with {id}, token, body)`.
fn id_routes() -> Vec<(bool, &'static str, &'static str, &'static str, Option<Value>)> {
    let claim_id = json!({"claimId": UNKNOWN_ID});
    vec![
        (false, "GET", "/vm/tasks/{id}", CLIENT, None),
        (false, "DELETE", "/vm/tasks/{id}", CLIENT, None),
        (false, "GET", "/vm/tasks/{id}/status", CLIENT, None),
        (false, "PUT", "/vm/tasks/{id}/status", CONSUMER, Some(json!({"status": "completed", "claimId": UNKNOWN_ID}))),
        (true, "DELETE", "/tasks/{id}", CONSUMER, None),
        (true, "POST", "/tasks/{id}/claim", CONSUMER, Some(json!({"consumerId": "host-a"}))),
        (true, "POST", "/tasks/{id}/heartbeat", CONSUMER, Some(claim_id.clone())),
        (true, "POST", "/tasks/{id}/release", CONSUMER, Some(claim_id)),
    ]
}

fn call_with_id(edge: &Edge, route: &(bool, &str, &str, &str, Option<Value>), id: &str) -> Response {
    let (is_consumer, method, path, token, body) = route;
    let mut request = Request::new(method, &path.replace("{id}", id)).bearer(token);
    if let Some(body) = body {
        request = request.json_body(body);
    }
    if *is_consumer {
        edge.consumer_call(request)
    } else {
        edge.api_call(request)
    }
}

#[test]
fn ids_that_are_not_uuids_are_a_400_on_every_route() {
    let edge = Edge::new();
    for route in id_routes() {
        for bad in ["not-a-uuid", "0190b5a43b7c7def8abc0123456789ab", "0190b5a4-3b7c-7def-8abc-0123456789ag"] {
            let r = call_with_id(&edge, &route, bad);
            let expected = format!("id: \"{bad}\" is not a UUID");
            let body = assert_error(&r, 400, "invalid_field", Some("id"), &[&expected]);
            assert!(body.error.contains(bad), "{} {}: {}", route.1, route.2, body.error);
        }
    }
}

#[test]
fn unknown_task_ids_are_a_404_on_every_route() {
    let edge = Edge::new();
    for route in id_routes() {
        let r = call_with_id(&edge, &route, UNKNOWN_ID);
        let expected = format!("task {UNKNOWN_ID} not found");
        assert_error(&r, 404, "not_found", None, &[&expected]);
    }
    // A v4 UUID is well-formed but can never be a task id.
    let r = client_get(&edge, "/vm/tasks/3f2b7c1e-9a4d-4e2b-8c1f-5d6e7f8a9b0c");
    assert_error(&r, 404, "not_found", None, &["not found"]);
    let r = client_get(&edge, "/vm/ghost/status");
    assert_error(&r, 404, "not_found", None, &["VM \"ghost\" is not in the registry"]);
}

// ---------------------------------------------------------------------------------------------
// Query parameters

#[test]
fn wait_beyond_60_seconds_is_a_400() {
    let edge = Edge::new();
    let id = edge.submit(stop("vm-1"));
    for path in [format!("/vm/tasks/{id}"), format!("/vm/tasks/{id}/status")] {
        for bad in ["61", "-1", "1.5", "soon", "99999999999999999999"] {
            let r = client_get(&edge, &format!("{path}?wait={bad}"));
            let expected = format!("must be whole seconds from 0 to 60, got \"{bad}\"");
            assert_error(&r, 400, "invalid_field", Some("wait"), &[&expected]);
        }
    }
    assert_eq!(client_get(&edge, &format!("/vm/tasks/{id}/status?wait=0")).status, 200);
    // The consumer worker's long poll stops at MAX_WAIT_SECONDS (30).
    let r = consumer(&edge, "GET", "/tasks/ready?server=production&wait=31", None);
    assert_error(&r, 400, "invalid_field", Some("wait"), &["must be an integer from 0 to 30, got \"31\""]);
}

#[test]
fn a_forged_cursor_is_a_400() {
    let edge = Edge::new();
    for i in 0..3 {
        edge.submit(stop(&format!("vm-{i}")));
    }
    let page: Value = client_get(&edge, "/vm/tasks?limit=1").json_body().unwrap();
    let genuine = page["cursor"].as_str().expect("a cursor to the second page").to_owned();
    assert_eq!(client_get(&edge, &format!("/vm/tasks?limit=1&cursor={genuine}")).status, 200);

    let other_key = sign_cursor(b"not-the-secret", "task:");
    let tampered = format!("00{genuine}");
    for forged in ["task:000", "abc.def", other_key.as_str(), tampered.as_str(), &genuine.replace('.', "")] {
        let r = client_get(&edge, &format!("/vm/tasks?cursor={forged}"));
        assert_error(&r, 400, "invalid_cursor", Some("cursor"), &["cursor is not one this API issued"]);
    }
}

#[test]
fn limit_zero_is_a_400() {
    let edge = Edge::new();
    for bad in ["0", "1001", "-5", "ten"] {
        let r = client_get(&edge, &format!("/vm/tasks?limit={bad}"));
        let expected = format!("must be an integer from 1 to 1000, got \"{bad}\"");
        assert_error(&r, 400, "invalid_field", Some("limit"), &[&expected]);
    }
    for path in ["/tasks/ready?limit=0", "/tasks/all?limit=0"] {
        let r = consumer(&edge, "GET", path, None);
        assert_error(&r, 400, "invalid_field", Some("limit"), &["must be an integer from 1 to 1000, got \"0\""]);
    }
}

#[test]
fn bad_server_lists_on_the_ready_poll_are_a_400() {
    let edge = Edge::new();
    let r = consumer(&edge, "GET", "/tasks/ready?server=prod/1", None);
    assert_error(&r, 400, "invalid_field", Some("server"), &["contains '/'"]);
    let many = (0..33).map(|i| format!("s{i}")).collect::<Vec<_>>().join(",");
    let r = consumer(&edge, "GET", &format!("/tasks/ready?server={many}"), None);
    assert_error(&r, 400, "invalid_field", Some("server"), &["at most 32 servers"]);
    let r = consumer(&edge, "GET", "/tasks/ready?wait=5", None);
    assert_error(&r, 400, "invalid_field", Some("server"), &["is required with `wait` or `since`"]);
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys

#[test]
fn a_bad_idempotency_key_is_a_400() {
    let edge = Edge::new();
    let long = "k".repeat(Limits::IDEMPOTENCY_KEY_MAX + 1);
    for bad in ["", "has space", "tab\tkey", "ключ", long.as_str()] {
        let r = submit_with_key(&edge, bad, &stop("vm-1"));
        assert_error(
            &r,
            400,
            "invalid_idempotency_key",
            Some("Idempotency-Key"),
            &["Idempotency-Key must be 1 to 255 visible ASCII characters"],
        );
    }
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

// ---------------------------------------------------------------------------------------------
// Daemon bodies

#[test]
fn daemon_bodies_missing_their_required_fields_are_a_400() {
    let edge = Edge::new();
    let id = edge.submit(stop("vm-1"));
    let r = consumer(&edge, "POST", &format!("/tasks/{id}/claim"), Some(json!({"leaseSeconds": 60})));
    assert_error(&r, 400, "invalid_body", None, &["missing field `consumerId`"]);
    let r = consumer(&edge, "POST", &format!("/tasks/{id}/claim"), Some(json!({"consumerId": "a/b"})));
    assert_error(&r, 400, "invalid_field", Some("consumerId"), &["contains '/'"]);
    let r =
        consumer(&edge, "POST", &format!("/tasks/{id}/claim"), Some(json!({"consumerId": "h", "leaseSeconds": -1})));
    assert_error(&r, 400, "invalid_body", None, &["invalid value: integer `-1`, expected u64"]);
    for action in ["heartbeat", "release"] {
        let r = consumer(&edge, "POST", &format!("/tasks/{id}/{action}"), Some(json!({"leaseSeconds": 60})));
        assert_error(&r, 400, "invalid_body", None, &["missing field `claimId`"]);
    }
    let report = |body: Value| {
        edge.api_call(Request::new("PUT", &format!("/vm/tasks/{id}/status")).bearer(CONSUMER).json_body(&body))
    };
    assert_error(&report(json!({"status": "completed"})), 400, "invalid_body", None, &["missing field `claimId`"]);
    let r = report(json!({"status": "done", "claimId": UNKNOWN_ID}));
    assert_error(&r, 400, "invalid_body", None, &["unknown variant `done`"]);
    // serde names the problem, but not the field at fault (`claimId`).
    let r = report(json!({"status": "completed", "claimId": "claim-1"}));
    assert_error(&r, 400, "invalid_body", None, &["invalid request body: UUID parsing failed"]);
}

// ---------------------------------------------------------------------------------------------
// Tokens, routes, methods

#[test]
fn missing_or_wrong_tokens_are_a_401_with_a_bearer_challenge() {
    let edge = Edge::new();
    let cases = [
        (edge.api_call(Request::new("GET", "/vm/tasks")), "missing Authorization header"),
        (edge.api_call(Request::new("GET", "/vm/tasks").bearer("guess")), "invalid client token"),
        (edge.api_call(Request::new("GET", "/vm/tasks").header("authorization", "Basic YTpi")), "Bearer scheme"),
        (
            edge.api_call(Request::new("POST", "/vm/tasks").bearer(CONSUMER).json_body(&stop("vm-1"))),
            "invalid client token",
        ),
        (
            edge.api_call(Request::new("PUT", &format!("/vm/tasks/{UNKNOWN_ID}/status")).bearer(CLIENT)),
            "invalid consumer token",
        ),
        (edge.consumer_call(Request::new("GET", "/tasks/ready").bearer(CLIENT)), "invalid consumer token"),
        (edge.consumer_call(Request::new("POST", "/admin/sweep")), "missing Authorization header"),
    ];
    for (r, needle) in cases {
        assert_error(&r, 401, "unauthorized", None, &[needle]);
        assert_eq!(r.get_header("www-authenticate"), Some("Bearer"));
    }
}

#[test]
fn unknown_paths_are_a_404_and_wrong_methods_a_405_naming_the_allowed_ones() {
    let edge = Edge::new();
    let r = client_get(&edge, "/vm/tasks/x/y/z");
    assert_error(&r, 404, "not_found", None, &["no route for GET /vm/tasks/x/y/z"]);
    let r = edge.api_call(Request::new("PATCH", &format!("/vm/tasks/{UNKNOWN_ID}")).bearer(CLIENT));
    assert_error(&r, 405, "method_not_allowed", None, &["method PATCH is not allowed", "allowed: GET, DELETE"]);
    assert_eq!(r.get_header("allow"), Some("GET, DELETE"));
    let r = edge.consumer_call(Request::new("GET", &format!("/tasks/{UNKNOWN_ID}/claim")).bearer(CONSUMER));
    assert_error(&r, 405, "method_not_allowed", None, &["allowed: POST"]);
    assert_eq!(r.get_header("allow"), Some("POST"));
}
