//! A client's cancel racing the daemon's claim on the real stack (issue #11 item 2): 200
//! `run_command` tasks on one VM, each cancelled 0 to 300 ms after its POST. A `200` to the
//! cancel must mean the command never reached Arrakis (the simulator's request log), and every
//! final state must agree with the answer the client got.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{json, Value};
use stack::StackOptions;
use uuid::Uuid;

use crate::support::*;

const PAIRS: usize = 200;

/// The command of pair `i`, unique in the simulator's log. It runs for 100 ms in the guest, so
/// a task often waits behind its VM's previous one and a prompt cancel can win: with a command
/// that ends at once, a lone task is claimed and done within milliseconds of its POST, before
/// any cancel arrives, and the race would be one-sided.
fn command(i: usize) -> String {
    format!("sleep 0.1; echo [race {i}]")
}

/// Whether a command the simulator ran is pair `i`'s (`[race 1]` is not `[race 10]`).
fn is_pair(logged: &str, i: usize) -> bool {
    logged.contains(&format!("[race {i}]"))
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_cancel_answered_200_never_reaches_arrakis_and_every_answer_matches_the_outcome() {
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let launch = api.submit_op("launch_vm", json!({"vmName": "race-vm", "targetServer": "production"})).await.unwrap();
    api.wait_terminal(launch.task_id, Duration::from_secs(60)).await.unwrap();
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();
    let url = |path: &str| format!("{}{path}", stack.gateway_url());

    let mut pairs: Vec<(Uuid, u16)> = Vec::new();
    for i in 0..PAIRS {
        let created = api.submit_op("run_command", json!({"vmName": "race-vm", "command": command(i)})).await.unwrap();
        tokio::time::sleep(Duration::from_millis((i as u64 * 37) % 301)).await;
        let cancel = http
            .delete(url(&format!("/vm/tasks/{}", created.task_id)))
            .bearer_auth(stack.client_token())
            .send()
            .await
            .unwrap();
        let status = cancel.status().as_u16();
        let body: Value = cancel.json().await.unwrap_or(Value::Null);
        assert!(matches!(status, 200 | 202 | 409), "pair {i}: cancel answered {status} {body}");
        pairs.push((created.task_id, status));
    }

    // Every task ends: cancelled, or run by the daemon.
    let mut finals = Vec::new();
    for (id, _) in &pairs {
        finals.push(api.wait_terminal(*id, Duration::from_secs(120)).await.unwrap().status.as_str().to_owned());
    }
    let commands: Vec<String> = sim_log(&stack)
        .await
        .iter()
        .filter(|e| e["op"] == "cmd")
        .map(|e| e["requestBody"].as_str().unwrap_or("").to_owned())
        .collect();
    let reached = |i: usize| commands.iter().any(|c| is_pair(c, i));

    let mut violations = Vec::new();
    let mut outcomes: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for (i, ((id, answer), status)) in pairs.iter().zip(&finals).enumerate() {
        *outcomes.entry((*answer, status.clone())).or_default() += 1;
        let consistent = match *answer {
            200 => status == "cancelled" && !reached(i),
            409 => status != "cancelled",
            // Requested while a claim was undecided: either outcome, as long as it is honest.
            _ => status != "cancelled" || !reached(i),
        };
        if !consistent || (status == "cancelled" && reached(i)) {
            violations
                .push(format!("pair {i} ({id}): cancel {answer}, final {status}, reached Arrakis: {}", reached(i)));
        }
    }
    eprintln!("cancel answer / final status: {outcomes:?}");
    assert!(violations.is_empty(), "{} violations of {PAIRS}:\n{}", violations.len(), violations.join("\n"));
    assert!(outcomes.keys().any(|(a, _)| *a == 200), "no cancel won: {outcomes:?}");
    assert!(outcomes.keys().any(|(_, s)| s != "cancelled"), "no claim won: {outcomes:?}");
    stack.shutdown().await.expect("the stack stops cleanly");
}
