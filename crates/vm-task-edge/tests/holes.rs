//! The smaller holes of issue #11 item 8, on the edge: a VM named `tasks`, idempotency keys
//! per client, consumer tokens bound to servers, cursors that outlive token rotation, a lease
//! floor safe against propagation, validated settings.

mod common;

use common::*;
use serde_json::{json, Value};
use vm_task_edge::{
    api::ApiConfig,
    auth::Tokens,
    consumer::ConsumerConfig,
    http::{Request, Response},
};
use vm_task_types::{wire::ClaimResponse, Limits};

const OTHER_CLIENT: &str = "other-client-token";
const BOUND: &str = "bound-token";

fn get(edge: &Edge, path: &str, token: &str) -> Response {
    edge.api_call(Request::new("GET", path).bearer(token))
}

#[test]
fn a_vm_named_tasks_has_a_readable_status() {
    let edge = Edge::new();
    edge.submit(json!({"type": "stop_vm", "payload": {"vmName": "tasks", "targetServer": "production"}}));
    let r = get(&edge, "/vm/tasks/status", CLIENT);
    assert_eq!(r.status, 200, "{}", body_text(&r));
    assert_eq!(r.json_body::<Value>().unwrap()["vmName"], "tasks");
}

#[test]
fn idempotency_keys_are_scoped_per_client_token() {
    let mut edge = Edge::new();
    edge.api_config.client_tokens = Tokens::parse(&format!("{CLIENT},{OTHER_CLIENT}"));
    let post = |token: &str, vm: &str| {
        edge.api_call(Request::new("POST", "/vm/tasks").bearer(token).header("idempotency-key", "order-1").json_body(
            &json!(
                {"type": "stop_vm", "payload": {"vmName": vm, "targetServer": "production"}}
            ),
        ))
    };
    let mine = post(CLIENT, "vm-a");
    assert_eq!(mine.status, 202);
    let theirs = post(OTHER_CLIENT, "vm-b");
    assert_eq!(theirs.status, 202, "another client's key is not mine: {}", body_text(&theirs));
    let my_id = mine.json_body::<Value>().unwrap()["taskId"].as_str().unwrap().to_owned();
    assert!(!body_text(&theirs).contains(&my_id), "no task id leaks across clients");
    edge.clock.advance_ms(2_000);
    let replay = post(OTHER_CLIENT, "vm-b");
    assert_eq!(replay.status, 200, "the other client's own replay still works");
}

fn bound_edge() -> Edge {
    let mut edge = Edge::new();
    let tokens = Tokens::parse_bound(&format!("{CONSUMER},{BOUND}:server-a|server-c")).unwrap();
    edge.api_config.consumer_tokens = tokens.clone();
    edge.consumer_config.consumer_tokens = tokens;
    edge
}

#[test]
fn a_consumer_token_bound_to_servers_lists_claims_and_reports_only_for_them() {
    let edge = bound_edge();
    let on_a = edge.submit(launch("vm-a", "server-a"));
    let on_b = edge.submit(launch("vm-b", "server-b"));
    edge.deliver();
    edge.clock.advance_ms(2_000);
    let consumer = |method: &str, path: &str, body: Option<Value>| {
        let mut request = Request::new(method, path).bearer(BOUND);
        if let Some(body) = body {
            request = request.json_body(&body);
        }
        edge.consumer_call(request)
    };
    let claim_b = consumer("POST", &format!("/tasks/{on_b}/claim"), Some(json!({"consumerId": "host-a"})));
    assert_eq!(claim_b.status, 403, "{}", body_text(&claim_b));
    assert_eq!(claim_b.json_body::<Value>().unwrap()["code"], "forbidden");
    assert_eq!(consumer("GET", "/tasks/ready?server=server-b", None).status, 403);
    assert_eq!(consumer("GET", "/tasks/all", None).status, 403);
    assert_eq!(consumer("POST", "/admin/sweep", None).status, 403);
    let own: Value = consumer("GET", "/tasks/ready", None).json_body().unwrap();
    assert_eq!(own["count"], 1, "a listing of every server is a listing of its own: {own}");
    assert_eq!(own["tasks"][0]["taskId"], json!(on_a));
    let claim_a = consumer("POST", &format!("/tasks/{on_a}/claim"), Some(json!({"consumerId": "host-a"})));
    assert_eq!(claim_a.status, 200, "{}", body_text(&claim_a));
    // The unbound token takes server-b's task; the bound one cannot report on it.
    let other: ClaimResponse = edge.claim(on_b, None).json_body().unwrap();
    edge.clock.advance_ms(2_000);
    let report = edge.api_call(
        Request::new("PUT", &format!("/vm/tasks/{on_b}/status"))
            .bearer(BOUND)
            .json_body(&json!({"status": "completed", "claimId": other.claim_id})),
    );
    assert_eq!(report.status, 403, "{}", body_text(&report));
    assert_eq!(edge.status(on_b)["status"], "processing");
}

#[test]
fn consumer_token_lists_with_a_bad_server_name_are_refused_naming_the_variable() {
    let problem = Tokens::parse_bound("tok:server/a").unwrap_err();
    assert!(problem.contains("CONSUMER_TOKENS") && problem.contains("'/'"), "{problem}");
    let body = body_text(&Response::misconfigured(&problem));
    assert!(body.contains("CONSUMER_TOKENS"), "{body}");
}

#[test]
fn list_cursors_survive_a_client_token_rotation_without_cursor_secret() {
    let mut edge = Edge::new();
    edge.api_config.cursor_secret = Vec::new();
    for i in 0..3 {
        edge.submit(json!({"type": "stop_vm", "payload": {"vmName": format!("vm-{i}"), "targetServer": "p"}}));
    }
    let page: Value = get(&edge, "/vm/tasks?limit=1", CLIENT).json_body().unwrap();
    let cursor = page["cursor"].as_str().expect("a cursor").to_owned();
    edge.api_config.client_tokens = Tokens::parse("rotated-token");
    let next = get(&edge, &format!("/vm/tasks?limit=1&cursor={cursor}"), "rotated-token");
    assert_eq!(next.status, 200, "{}", body_text(&next));
    let forged = vm_task_edge::auth::sign_cursor(format!("cursor:{CLIENT}").as_bytes(), "task:");
    assert_eq!(get(&edge, &format!("/vm/tasks?cursor={forged}"), "rotated-token").status, 400, "not token-derived");
}

#[test]
fn a_lease_is_never_shorter_than_120_seconds_by_default() {
    let mut edge = Edge::new();
    edge.consumer_config = ConsumerConfig { consumer_tokens: Tokens::parse(CONSUMER), ..ConsumerConfig::default() };
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    edge.clock.advance_ms(2_000);
    let claim: ClaimResponse = edge.claim(id, Some(2)).json_body().unwrap();
    assert_eq!((claim.lease_expires_at.as_millis() - edge.clock.now_ms()) / 1000, 120, "{claim:?}");
}

#[test]
fn wait_poll_ms_is_validated() {
    assert_eq!(ApiConfig::wait_poll_ms(""), Ok(250));
    assert_eq!(ApiConfig::wait_poll_ms(" 500 "), Ok(500));
    for bad in ["0", "49", "5001", "fast", "-1"] {
        let problem = ApiConfig::wait_poll_ms(bad).unwrap_err();
        assert!(problem.contains("WAIT_POLL_MS") && problem.contains(bad), "{problem}");
    }
}

#[test]
fn the_edge_accepts_as_many_servers_per_poll_as_a_daemon_may_serve() {
    let edge = Edge::new();
    assert_eq!(Limits::SERVERS_PER_POLL_MAX, 32);
    let servers = (0..Limits::SERVERS_PER_POLL_MAX).map(|i| format!("s{i}")).collect::<Vec<_>>().join(",");
    let r = edge.consumer_call(Request::new("GET", &format!("/tasks/ready?server={servers}")).bearer(CONSUMER));
    assert_eq!(r.status, 200, "{}", body_text(&r));
}
