//! The guarantees, natively: leases, releases, attempts, cancellation, idempotency, waiting,
//! and what happens to queue messages that cannot be buffered.

mod common;

use common::*;
use serde_json::{json, Value};
use vm_task_edge::{consumer::Delivery, http::Request};

fn sweep(edge: &Edge) -> Value {
    let r = edge.consumer_call(Request::new("POST", "/admin/sweep").bearer(CONSUMER));
    assert_eq!(r.status, 200, "{}", body_text(&r));
    r.json_body().unwrap()
}

#[test]
fn an_expired_lease_returns_the_task_and_the_last_one_fails_it() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    for attempt in 1..=3 {
        let claim = edge.claim(id, Some(5));
        assert_eq!(claim.status, 200, "attempt {attempt}: {}", body_text(&claim));
        // Still held: nobody else may claim it.
        assert_eq!(edge.claim(id, Some(5)).status, 409);
        // The lease's end, then KV's propagation window (the sweep waits both out).
        edge.clock.advance_ms(66_000);
        let report = sweep(&edge);
        if attempt < 3 {
            assert_eq!(report["returnedToReady"], 1, "{report}");
            assert_eq!(edge.status(id)["status"], "pending");
            assert_eq!(edge.status(id)["attempts"], attempt);
        } else {
            assert_eq!(report["failed"], 1, "{report}");
        }
    }
    let status = edge.status(id);
    assert_eq!(status["status"], "failed");
    assert!(status["error"].as_str().unwrap().contains("gave up after 3 attempts"), "{status}");
    assert!(edge.ready("production").tasks.is_empty(), "the failed task left the buffer");
}

#[test]
fn a_claim_after_the_lease_ended_takes_over_without_waiting_for_the_sweep() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    let first = edge.claimed(id);
    edge.clock.advance_ms(181_000);
    let second = edge.claimed(id);
    assert_ne!(first.claim_id, second.claim_id);
    assert_eq!(second.task.attempts, 2);
    // The old holder's report is refused.
    assert_eq!(edge.report(id, first.claim_id, json!({"status": "completed"})).status, 409);
    assert_eq!(edge.report(id, second.claim_id, json!({"status": "completed"})).status, 200);
}

#[test]
fn heartbeats_extend_the_lease_and_releases_do_not_count_as_attempts() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    let claim = edge.claimed(id);
    edge.clock.advance_ms(170_000);
    let beat = edge.consumer_call(
        Request::new("POST", &format!("/tasks/{id}/heartbeat"))
            .bearer(CONSUMER)
            .json_body(&json!({"claimId": claim.claim_id})),
    );
    assert_eq!(beat.status, 200, "{}", body_text(&beat));
    edge.clock.advance_ms(20_000);
    assert_eq!(sweep(&edge)["returnedToReady"], 0, "renewed lease still holds");

    let release = edge.consumer_call(
        Request::new("POST", &format!("/tasks/{id}/release"))
            .bearer(CONSUMER)
            .json_body(&json!({"claimId": claim.claim_id, "reason": "shutting down"})),
    );
    assert_eq!(release.status, 200, "{}", body_text(&release));
    let status = edge.status(id);
    assert_eq!((status["status"].as_str(), status["attempts"].as_u64()), (Some("pending"), Some(0)));
    assert_eq!(edge.claimed(id).task.attempts, 1);
}

#[test]
fn a_cancelled_task_is_never_handed_out() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    let r = edge.api_call(Request::new("DELETE", &format!("/vm/tasks/{id}")).bearer(CLIENT));
    assert_eq!(r.status, 200);
    assert_eq!(edge.status(id)["status"], "cancelled");
    let claim = edge.claim(id, None);
    assert_eq!(claim.status, 409);
    assert_eq!(claim.json_body::<Value>().unwrap()["currentStatus"], "cancelled");
    // Cancelling again is harmless; a started task cannot be cancelled.
    assert_eq!(edge.api_call(Request::new("DELETE", &format!("/vm/tasks/{id}")).bearer(CLIENT)).status, 200);
    let other = edge.submit(launch("vm-2", "production"));
    edge.deliver();
    edge.claimed(other);
    let r = edge.api_call(Request::new("DELETE", &format!("/vm/tasks/{other}")).bearer(CLIENT));
    assert_eq!(r.status, 409);
    assert_eq!(r.json_body::<Value>().unwrap()["currentStatus"], "processing");
}

#[test]
fn a_task_cancelled_while_queued_is_never_handed_to_a_daemon() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.api_call(Request::new("DELETE", &format!("/vm/tasks/{id}")).bearer(CLIENT));
    // Buffering does not read the record, so the entry is written; the claim refuses it.
    assert_eq!(edge.deliver(), vec![Delivery::Ack]);
    let r = edge.claim(id, None);
    assert_eq!(r.status, 409);
    assert_eq!(r.json_body::<Value>().unwrap()["currentStatus"], "cancelled");
    assert!(edge.ready("production").tasks.is_empty(), "the refused claim dropped the entry");
    assert_eq!(edge.status(id)["status"], "cancelled");
}

#[test]
fn an_idempotency_key_replays_and_a_reused_key_with_another_body_is_refused() {
    let edge = Edge::new();
    let post = |body: &Value, key: &str| {
        edge.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).header("idempotency-key", key).json_body(body))
    };
    let body = launch("vm-1", "production");
    let first = post(&body, "k-1");
    let again = post(&body, "k-1");
    assert_eq!((first.status, again.status), (202, 200));
    assert_eq!(first.json_body::<Value>().unwrap()["taskId"], again.json_body::<Value>().unwrap()["taskId"]);
    assert_eq!(edge.queue.drain().len(), 1, "one task queued");
    let other = post(&launch("vm-1", "staging"), "k-1");
    assert_eq!(other.status, 422);
    assert_eq!(other.json_body::<Value>().unwrap()["code"], "idempotency_key_reused");
    assert_eq!(post(&body, "bad key").status, 400);
}

#[test]
fn waiting_answers_at_the_limit_with_the_current_state() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    let before = edge.clock.now_ms();
    let r = edge.api_call(Request::new("GET", &format!("/vm/tasks/{id}?wait=5")).bearer(CLIENT));
    assert_eq!(r.status, 200);
    assert_eq!(r.json_body::<Value>().unwrap()["task"]["status"], "pending");
    assert!(edge.clock.now_ms() - before >= 5_000, "waited the full 5 s of (manual) time");
    let r = edge.api_call(Request::new("GET", &format!("/vm/tasks/{id}/status?wait=61")).bearer(CLIENT));
    assert_eq!(r.status, 400);
}

#[test]
fn a_buffering_failure_retries_its_message_and_every_later_one_of_the_same_vm() {
    let mut edge = Edge::new();
    edge.consumer_config.fault_fail_buffering_vm = Some("vm-a".into());
    edge.submit(launch("vm-a", "production"));
    edge.submit(launch("vm-c", "production"));
    edge.submit(json!({"type": "stop_vm", "payload": {"vmName": "vm-a", "targetServer": "production"}}));
    let decisions = edge.deliver();
    assert_eq!(decisions, [Delivery::Retry { delay_secs: 5 }, Delivery::Ack, Delivery::Retry { delay_secs: 5 }]);
    let ready: Vec<String> = edge.ready("production").tasks.iter().map(|t| t.vm_name.clone()).collect();
    assert_eq!(ready, ["vm-c"]);
}

#[test]
fn dead_lettered_tasks_fail_with_the_reason() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    let bodies: Vec<Value> = edge.queue.drain().iter().map(|m| serde_json::to_value(m).unwrap()).collect();
    let decisions = futures::executor::block_on(edge.consumer().dead_letter_batch(&bodies));
    assert_eq!(decisions, [Delivery::Ack]);
    let status = edge.status(id);
    assert_eq!(status["status"], "failed");
    assert!(status["error"].as_str().unwrap().contains("dead-lettered"), "{status}");
    let timeline = edge.detail(id)["timeline"].clone();
    assert_eq!(timeline.as_array().unwrap().last().unwrap()["event"], "dead_lettered");
}

#[test]
fn a_task_no_daemon_claims_fails_after_the_queueing_limit() {
    let mut edge = Edge::new();
    edge.consumer_config.max_queued_secs = 60;
    let id = edge.submit(launch("vm-1", "nobody-serves-this"));
    edge.deliver();
    edge.clock.advance_ms(61_000);
    assert_eq!(sweep(&edge)["failed"], 1);
    let status = edge.status(id);
    assert_eq!(status["status"], "failed");
    assert!(status["error"].as_str().unwrap().contains("no daemon serving \"nobody-serves-this\""), "{status}");
}

#[test]
fn status_reports_must_come_from_the_claim_holder_and_follow_the_machine() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    let claim = edge.claimed(id);
    let anonymous = edge.api_call(
        Request::new("PUT", &format!("/vm/tasks/{id}/status"))
            .json_body(&json!({"status": "completed", "claimId": claim.claim_id})),
    );
    assert_eq!(anonymous.status, 401);
    let with_client_token = edge.api_call(
        Request::new("PUT", &format!("/vm/tasks/{id}/status"))
            .bearer(CLIENT)
            .json_body(&json!({"status": "completed", "claimId": claim.claim_id})),
    );
    assert_eq!(with_client_token.status, 401);
    assert_eq!(edge.report(id, claim.claim_id, json!({"status": "pending"})).status, 409);
    assert_eq!(edge.report(id, claim.claim_id, json!({"status": "failed", "error": "boom"})).status, 200);
    let late = edge.report(id, claim.claim_id, json!({"status": "completed"}));
    assert_eq!(late.status, 409);
    assert_eq!(late.json_body::<Value>().unwrap()["currentStatus"], "failed");
    assert_eq!(edge.status(id)["error"], "boom");
}

#[test]
fn a_task_whose_queue_message_was_lost_is_buffered_by_the_sweep() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.queue.drain(); // The message never reaches the consumer.
    assert_eq!(sweep(&edge)["rebuffered"], 0, "too young: it may still be in the queue");
    edge.clock.advance_ms(61_000);
    assert_eq!(sweep(&edge)["rebuffered"], 1);
    assert_eq!(edge.ready("production").tasks[0].task_id, id);
    assert_eq!(sweep(&edge)["rebuffered"], 0, "buffered once");
    edge.claimed(id);
}

#[test]
fn a_claim_retried_after_a_lost_response_gets_the_same_claim_back() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    let proposed = uuid::Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef);
    let claim = |claim_id: uuid::Uuid| {
        edge.consumer_call(
            Request::new("POST", &format!("/tasks/{id}/claim"))
                .bearer(CONSUMER)
                .json_body(&json!({"consumerId": "host-a", "claimId": claim_id})),
        )
    };
    let first = claim(proposed);
    assert_eq!(first.status, 200);
    let again = claim(proposed);
    assert_eq!(again.status, 200, "{}", body_text(&again));
    assert_eq!(again.json_body::<Value>().unwrap()["claimId"], json!(proposed));
    assert_eq!(edge.status(id)["attempts"], 1, "the retry is not another attempt");
    assert_eq!(claim(uuid::Uuid::from_u128(7)).status, 409, "another claimer still waits for the lease");
}

#[test]
fn the_sweep_rings_again_for_entries_left_unclaimed() {
    let edge = Edge::new();
    edge.submit(launch("vm-1", "production"));
    edge.deliver();
    let bell = edge.ready("production").bell;
    assert_eq!(sweep(&edge)["rung"], 0, "fresh entries need no second ring");
    edge.clock.advance_ms(61_000);
    assert_eq!(sweep(&edge)["rung"], 1);
    assert_ne!(edge.ready("production").bell, bell, "a waiting daemon wakes up");
}

#[test]
fn a_hot_poll_flag_other_than_0_or_1_is_refused() {
    let edge = Edge::new();
    let r = edge.consumer_call(Request::new("GET", "/tasks/ready?server=production&hot=AAA").bearer(CONSUMER));
    assert_eq!(r.status, 400);
    assert_eq!(r.json_body::<Value>().unwrap()["field"], "hot");
    let ok = edge.consumer_call(Request::new("GET", "/tasks/ready?server=production&hot=1").bearer(CONSUMER));
    assert_eq!(ok.status, 200);
}

#[test]
fn a_task_that_cannot_be_queued_is_failed_with_the_reason_not_lost() {
    let edge = Edge::new();
    edge.queue.fail_sends(true);
    let r = edge.api_call(Request::new("POST", "/vm/tasks").bearer(CLIENT).json_body(&launch("vm-1", "production")));
    assert_eq!(r.status, 503);
    let listed: Value = edge.api_call(Request::new("GET", "/vm/tasks").bearer(CLIENT)).json_body().unwrap();
    assert_eq!(listed["tasks"][0]["status"], "failed", "{listed}");
    let id: uuid::Uuid = listed["tasks"][0]["id"].as_str().unwrap().parse().unwrap();
    assert!(edge.status(id)["error"].as_str().unwrap().contains("could not be queued"));
    // The registry was not pointed at the failed task: the next one has no predecessor.
    edge.queue.fail_sends(false);
    let next = edge.submit(launch("vm-1", "production"));
    assert!(edge.detail(next).get("previousTaskId").is_none());
}

/// `?server=` on a claim, heartbeat, release or status report (the durable mode's daemon
/// names its task's server there) is checked in the KV mode too, as `openapi.json` documents it: an invalid name
/// is a 400 naming `server`, a server the token is not bound to a 403, another server's task a
/// 404; the task's own server is accepted. It was ignored before.
#[test]
fn a_named_server_on_claims_and_leases_is_checked() {
    let mut edge = Edge::new();
    edge.consumer_config.consumer_tokens = vm_task_edge::auth::Tokens::parse_bound("bound:production|staging").unwrap();
    edge.api_config.consumer_tokens = edge.consumer_config.consumer_tokens.clone();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    let call = |op: &str, query: &str, body: Value| {
        edge.consumer_call(Request::new("POST", &format!("/tasks/{id}/{op}{query}")).bearer("bound").json_body(&body))
    };
    let claim_body = json!({"consumerId": "host-a", "leaseSeconds": 30});
    let bad = call("claim", "?server=a%20b", claim_body.clone());
    assert_eq!((bad.status, bad.json_body::<Value>().unwrap()["field"].as_str()), (400, Some("server")));
    assert_eq!(call("claim", "?server=elsewhere", claim_body.clone()).status, 403);
    let claim = call("claim", "?server=production", claim_body);
    assert_eq!(claim.status, 200, "{}", body_text(&claim));
    let claim_id = claim.json_body::<Value>().unwrap()["claimId"].clone();

    let lease = json!({"claimId": claim_id, "leaseSeconds": 30});
    assert_eq!(call("heartbeat", "?server=elsewhere", lease.clone()).status, 403);
    assert_eq!(call("heartbeat", "?server=production", lease.clone()).status, 200);
    assert_eq!(call("heartbeat", "?server=staging", lease.clone()).status, 404, "not on that server");

    // The status report (API worker) alike.
    let report = |query: &str| {
        let body = json!({"status": "completed", "claimId": claim_id});
        let path = format!("/vm/tasks/{id}/status{query}");
        edge.api_call(Request::new("PUT", &path).bearer("bound").json_body(&body)).status
    };
    assert_eq!(report("?server=a%20b"), 400);
    assert_eq!(report("?server=elsewhere"), 403);
    assert_eq!(report("?server=staging"), 404);
    assert_eq!(report("?server=production"), 200);
    assert_eq!(edge.status(id)["status"], "completed");
}
