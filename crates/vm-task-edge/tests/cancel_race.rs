//! A client's cancel racing a daemon's claim (issue #11 item 2), natively: the in-memory KV
//! yields before every operation, so the two requests, joined, interleave operation by
//! operation; every head start of either side is tried. A 200 to the cancel must mean the
//! claim did not take the task, and the record must keep both sides' events.

mod common;

use common::*;
use futures::{executor::block_on, future::join};
use serde_json::{json, Value};
use vm_task_edge::http::{Request, Response};

/// Runs a cancel and a claim of one pending task together, `cancel_delay` and `claim_delay`
/// yields late; returns both answers and the final record.
fn race(cancel_delay: usize, claim_delay: usize) -> (Response, Response, Value) {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    edge.clock.advance_ms(5_000);
    edge.tasks.interleave(true);
    edge.buffer.interleave(true);
    let (api, consumer) = (edge.api(), edge.consumer());
    let cancel = api.handle(Request::new("DELETE", &format!("/vm/tasks/{id}")).bearer(CLIENT));
    let claim = consumer.handle(
        Request::new("POST", &format!("/tasks/{id}/claim"))
            .bearer(CONSUMER)
            .json_body(&json!({"consumerId": "host-a"})),
    );
    let (cancelled, claimed) = block_on(join(after_yields(cancel_delay, cancel), after_yields(claim_delay, claim)));
    edge.tasks.interleave(false);
    edge.buffer.interleave(false);
    (cancelled, claimed, edge.detail(id))
}

fn events(task: &Value) -> Vec<String> {
    task["timeline"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn a_cancel_answered_200_means_the_claim_did_not_take_the_task_in_any_interleaving() {
    let mut violations = Vec::new();
    let mut outcomes = std::collections::BTreeMap::new();
    for delay in 0..16 {
        for (cancel_delay, claim_delay) in [(delay, 0), (0, delay)] {
            let (cancel, claim, task) = race(cancel_delay, claim_delay);
            let status = task["status"].as_str().unwrap().to_owned();
            let events = events(&task);
            *outcomes.entry((cancel.status, claim.status, status.clone())).or_insert(0) += 1;
            let consistent = match (cancel.status, claim.status) {
                // The cancel won: the claim was refused, and the record says so.
                (200, 409) => status == "cancelled" && events.contains(&"cancelled".to_owned()),
                // The claim won: the cancel was refused or left pending, never confirmed.
                (409 | 202, 200) => status == "processing" && events.contains(&"claimed".to_owned()),
                _ => false,
            };
            if !consistent {
                violations.push(format!(
                    "cancel +{cancel_delay} → {}, claim +{claim_delay} → {}, record {status} {events:?}: {} / {}",
                    cancel.status,
                    claim.status,
                    body_text(&cancel),
                    body_text(&claim)
                ));
            }
        }
    }
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), violations.join("\n"));
    // Both outcomes occur: the test does reach the race.
    assert!(outcomes.keys().any(|(c, _, _)| *c == 200), "{outcomes:?}");
    assert!(outcomes.keys().any(|(_, k, _)| *k == 200), "{outcomes:?}");
}

#[test]
fn a_claim_that_sees_the_cancel_yields_and_the_record_keeps_both_events() {
    let (cancel, claim, task) = (0..16)
        .map(|delay| race(0, delay))
        .find(|(_, claim, task)| claim.status == 409 && events(task).contains(&"claim_yielded".to_owned()))
        .expect("some interleaving has the claim see the cancel and yield");
    assert_eq!(cancel.status, 200, "{}", body_text(&cancel));
    assert_eq!(claim.json_body::<Value>().unwrap()["currentStatus"], "cancelled");
    let events = events(&task);
    assert!(events.contains(&"cancelled".to_owned()) && events.contains(&"claim_yielded".to_owned()), "{events:?}");
    assert_eq!(task["status"], "cancelled");
}

#[test]
fn a_cancel_facing_an_undecided_claim_answers_202_and_the_next_claim_yields() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    edge.clock.advance_ms(5_000);
    // A claim that wrote its intent, then could not write its decision (its worker died).
    edge.tasks.fail_writes_to(Some("task:"));
    assert_eq!(edge.claim(id, None).status, 503);
    edge.tasks.fail_writes_to(None);
    let started = edge.clock.now_ms();
    let r = edge.api_call(Request::new("DELETE", &format!("/vm/tasks/{id}")).bearer(CLIENT));
    assert_eq!(r.status, 202, "{}", body_text(&r));
    assert_eq!(r.json_body::<Value>().unwrap()["status"], "cancel_requested");
    assert!(edge.clock.now_ms() - started <= 2_000, "the cancel waits at most 2 s");
    assert_eq!(edge.status(id)["status"], "pending");
    let shown = events(&edge.detail(id));
    assert_eq!(shown.last().map(String::as_str), Some("cancel_requested"), "{shown:?}");
    edge.clock.advance_ms(5_000);
    let next = edge.claim(id, None);
    assert_eq!(next.status, 409, "{}", body_text(&next));
    assert_eq!(next.json_body::<Value>().unwrap()["currentStatus"], "cancelled");
    assert_eq!(edge.status(id)["status"], "cancelled");
    assert!(edge.ready("production").tasks.is_empty());
}

#[test]
fn a_cancel_after_a_released_claim_wins_at_once_and_later_claims_are_refused() {
    let edge = Edge::new();
    let id = edge.submit(launch("vm-1", "production"));
    edge.deliver();
    edge.clock.advance_ms(5_000);
    let stalled = edge.claimed(id);
    let released = edge.consumer_call(
        Request::new("POST", &format!("/tasks/{id}/release"))
            .bearer(CONSUMER)
            .json_body(&json!({"claimId": stalled.claim_id})),
    );
    assert_eq!(released.status, 200, "{}", body_text(&released));
    edge.clock.advance_ms(5_000);
    // The released claim has settled: the cancel wins at once.
    let r = edge.api_call(Request::new("DELETE", &format!("/vm/tasks/{id}")).bearer(CLIENT));
    assert_eq!(r.status, 200, "{}", body_text(&r));
    edge.clock.advance_ms(5_000);
    let again = edge.claim(id, None);
    assert_eq!(again.status, 409);
    assert_eq!(edge.status(id)["status"], "cancelled");
}
