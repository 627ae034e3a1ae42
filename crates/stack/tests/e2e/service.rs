//! End-to-end tests of the daemon as a service: graceful shutdown, released claims, metrics,
//! health, structured logs. Run with `cargo xtask e2e`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stack::StackOptions;
use vm_task_types::TaskStatus;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

async fn get(url: String) -> (u16, String) {
    let r = reqwest::get(url).await.expect("reachable");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn sigterm_mid_task_lets_the_task_finish_and_exits_zero() {
    let mut stack = start(StackOptions::default().sim_arg("--latency").sim_arg("cmd=2s")).await;
    let api = stack.client();
    let launch = api.submit_op("launch_vm", json!({"vmName": "drain-vm", "targetServer": "production"})).await.unwrap();
    api.wait_terminal(launch.task_id, WAIT).await.unwrap();
    let cmd = api.submit_op("run_command", json!({"vmName": "drain-vm", "command": "echo drained"})).await.unwrap();
    wait_for_status(&stack, cmd.task_id, TaskStatus::Processing).await;

    let exit = stack.terminate_daemon().await.unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    let done = api.status(cmd.task_id).await.unwrap();
    assert_eq!(done.status, TaskStatus::Completed, "finished before the daemon exited: {done:?}");
    assert_eq!(done.result.and_then(|r| r.output).as_deref(), Some("drained\n"));
    assert!(stack.log_tail("local-consumer").contains("draining in-flight tasks"));
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_released_claim_is_picked_up_again() {
    let mut stack = start(StackOptions::default()).await;
    stack.terminate_daemon().await.unwrap();
    let api = stack.client();
    let task = api.submit_op("launch_vm", json!({"vmName": "release-vm", "targetServer": "production"})).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while !api.ready("production").await.unwrap().tasks.iter().any(|t| t.task_id == task.task_id) {
        assert!(Instant::now() < deadline, "never buffered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let claim = api.claim(task.task_id, "departing-host", Some(600)).await.unwrap();
    api.release(task.task_id, claim.claim_id, Some("shutting down before starting")).await.unwrap();
    stack.start_daemon().await.unwrap();

    let done = api.wait_terminal(task.task_id, WAIT).await.unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(done.attempts, 1, "a release is not an attempt");
    let events: Vec<String> = api.task(task.task_id).await.unwrap().timeline.iter().map(|e| e.event.clone()).collect();
    assert_eq!(events, ["created", "buffered", "claimed", "released", "claimed", "completed"]);
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn metrics_count_the_work_and_healthz_follows_arrakis() {
    let mut stack = start(StackOptions::default()).await;
    let api = stack.client();
    let launch =
        api.submit_op("launch_vm", json!({"vmName": "metrics-vm", "targetServer": "production"})).await.unwrap();
    api.wait_terminal(launch.task_id, WAIT).await.unwrap();
    // One injected 500 on the command: retried, and counted as an Arrakis error.
    let fail_next = format!("{}/_sim/fail-next", stack.arrakis_url().trim_end_matches('/'));
    reqwest::Client::new().post(fail_next).json(&json!({"op": "cmd", "status": 500})).send().await.unwrap();
    let cmd = api.submit_op("run_command", json!({"vmName": "metrics-vm", "command": "true"})).await.unwrap();
    api.wait_terminal(cmd.task_id, WAIT).await.unwrap();
    let missing =
        api.submit_op("stop_vm", json!({"vmName": "no-such-vm", "targetServer": "production"})).await.unwrap();
    assert_eq!(api.wait_terminal(missing.task_id, WAIT).await.unwrap().status, TaskStatus::Failed);

    let (status, text) = get(format!("{}/metrics", stack.metrics_url())).await;
    assert_eq!(status, 200);
    for line in [
        "local_consumer_tasks_claimed_total{operation=\"launch_vm\"} 1",
        "local_consumer_tasks_completed_total{operation=\"launch_vm\"} 1",
        "local_consumer_tasks_completed_total{operation=\"run_command\"} 1",
        "local_consumer_tasks_failed_total{operation=\"stop_vm\"} 1",
        "local_consumer_task_duration_seconds_count{operation=\"run_command\"} 1",
        "local_consumer_arrakis_errors_total{kind=\"server_error\"} 1",
        "local_consumer_in_flight 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("local_consumer_polls_total{outcome=")), "{text}");
    // The durable mode's claims and reports ride the push socket, none falling back to HTTP;
    // the KV mode has no socket.
    let durable = std::env::var("STACK_DISPATCH_MODE").is_ok_and(|m| m.trim() == "durable");
    let over_socket = |op: &str| {
        let prefix = format!("local_consumer_socket_calls_total{{op=\"{op}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(|n| n.parse::<u64>().unwrap())
    };
    if durable {
        assert_eq!(over_socket("claim"), Some(3), "{text}");
        assert!(over_socket("report").is_some_and(|n| n >= 3), "{text}");
    } else {
        assert_eq!((over_socket("claim"), over_socket("report")), (None, None), "{text}");
    }
    assert!(!text.contains("local_consumer_socket_calls_unanswered_total{"), "{text}");

    let healthz = format!("{}/healthz", stack.metrics_url());
    let (status, body) = get(healthz.clone()).await;
    assert_eq!(status, 200, "{body}");
    stack.stop_sim().await.unwrap();
    let (status, body) = get(healthz.clone()).await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((body["status"].as_str(), body["workers"].as_str()), (Some("unhealthy"), Some("ok")));
    assert_ne!(body["arrakis"], "ok");
    stack.start_sim().await.unwrap();
    assert_eq!(get(healthz).await.0, 200);
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn json_logs_carry_the_task_id_vm_and_operation() {
    let stack = start(StackOptions::default().daemon_env("LOG_FORMAT", "json")).await;
    let api = stack.client();
    let launch = api.submit_op("launch_vm", json!({"vmName": "log-vm", "targetServer": "production"})).await.unwrap();
    api.wait_terminal(launch.task_id, WAIT).await.unwrap();
    let id = launch.task_id.to_string();
    let log = std::fs::read_to_string(stack.log_path("local-consumer")).unwrap();
    let lines: Vec<Value> =
        log.lines().filter(|l| l.contains(&id)).map(|l| serde_json::from_str(l).expect("JSON log line")).collect();
    assert!(lines.len() >= 2, "claimed and reported lines: {log}");
    for line in &lines {
        assert_eq!(line["span"]["id"], id.as_str(), "{line}");
        assert_eq!(line["span"]["vm"], "log-vm", "{line}");
        assert_eq!(line["span"]["op"], "launch_vm", "{line}");
    }
}
