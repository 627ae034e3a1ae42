//! End-to-end tests of the guarantees: auth, the state machine, leases, cancellation,
//! routing, ordering, idempotency, retries and the dead letter queue, waiting, the timeline.
//! Each runs on the local stack (wrangler dev, the simulator, the daemon).
//!
//! Run with `cargo xtask e2e`.

use std::time::{Duration, Instant};

use serde_json::json;
use stack::{Method, StackOptions, StatusCode};
use vm_task_types::{TaskStatus, VmState};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn auth_refuses_anonymous_and_wrong_tokens_and_cors_allows_only_configured_origins() {
    // No daemon: the task must stay as the refused requests left it.
    let stack = start(StackOptions::edge_only().worker_var("ALLOWED_ORIGINS", "https://console.example.com")).await;
    let api = stack.client();
    let task = api.submit_op("launch_vm", json!({"vmName": "auth-vm", "targetServer": "production"})).await.unwrap();
    let path = format!("/vm/tasks/{}/status", task.task_id);
    let body = json!({"status": "completed", "claimId": uuid::Uuid::new_v4()});
    let client = api.client_bearer();
    let cases: [(&str, Method, &str, Option<&str>); 5] = [
        ("anonymous PUT of a status", Method::PUT, &path, None),
        ("client token on a consumer route", Method::PUT, &path, Some(&client)),
        ("wrong token", Method::GET, "/vm/tasks", Some("Bearer not-a-token")),
        ("anonymous submit", Method::POST, "/vm/tasks", None),
        ("anonymous buffer listing", Method::GET, "/consumer/tasks/ready?server=production", None),
    ];
    for (what, method, path, auth) in cases {
        let headers: Vec<(&str, &str)> = auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
        let (status, reply) = api.submit_raw(method, path, &headers, Some(&body)).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {reply}");
        assert_eq!(reply["code"], "unauthorized", "{what}");
    }
    // Health stays open; the anonymous PUT changed nothing.
    assert_eq!(api.submit_raw(Method::GET, "/health", &[], None).await.unwrap().0, StatusCode::OK);
    assert_ne!(
        api.status(task.task_id).await.unwrap().status,
        TaskStatus::Completed,
        "anonymous PUT must not complete it"
    );

    let http = reqwest::Client::new();
    let get = |origin: &'static str| {
        http.get(format!("{}/vm/tasks", stack.gateway_url()))
            .header("authorization", api.client_bearer())
            .header("origin", origin)
            .send()
    };
    let allowed = get("https://console.example.com").await.unwrap();
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://console.example.com");
    let other = get("https://evil.example.com").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn only_legal_transitions_by_the_claim_holder_are_accepted() {
    let stack = start(StackOptions::edge_only()).await;
    let api = stack.client();
    let task = api.submit_op("launch_vm", json!({"vmName": "sm-vm", "targetServer": "production"})).await.unwrap();
    let stranger = uuid::Uuid::new_v4();
    let err = api.report(task.task_id, stranger, TaskStatus::Completed, None, None).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT));
    assert_eq!(err.body().unwrap()["currentStatus"], "pending");

    // Wait until buffered, then claim as the daemon would.
    let deadline = Instant::now() + WAIT;
    while api.ready("production").await.unwrap().tasks.is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let claim = api.claim(task.task_id, "host-a", None).await.unwrap();
    api.report(task.task_id, claim.claim_id, TaskStatus::Completed, None, None).await.unwrap();
    let err = api.report(task.task_id, claim.claim_id, TaskStatus::Failed, None, Some("late")).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT));
    assert_eq!(err.body().unwrap()["currentStatus"], "completed");
    let err = api.cancel(task.task_id).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT), "a finished task cannot be cancelled");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_daemon_killed_mid_command_leaves_a_task_that_ends_failed_after_its_lease_without_re_sending() {
    // Commands take 3 s; the lease is 4 s; the sweep runs every second.
    let mut stack = start(
        StackOptions::default()
            .sim_arg("--latency")
            .sim_arg("cmd=3s")
            .daemon_env("LEASE_SECONDS", 4)
            .cron_every(Duration::from_secs(1)),
    )
    .await;
    let api = stack.client();
    let launch = api.submit_op("launch_vm", json!({"vmName": "kill-vm", "targetServer": "production"})).await.unwrap();
    api.wait_terminal(launch.task_id, WAIT).await.unwrap();
    let cmd = api.submit_op("run_command", json!({"vmName": "kill-vm", "command": "echo survived"})).await.unwrap();
    wait_for_status(&stack, cmd.task_id, TaskStatus::Processing).await;
    stack.kill_daemon().await.unwrap();
    stack.start_daemon().await.unwrap();

    // The killed attempt may have sent the command to the guest: the README promises it is
    // never sent again, so the second attempt ends the task failed with the reason.
    let done = api.wait_terminal(cmd.task_id, WAIT).await.unwrap();
    assert_eq!(done.status, TaskStatus::Failed, "{done:?}");
    assert!(done.error.as_deref().unwrap_or_default().contains("not re-sent"), "{done:?}");
    assert_eq!(done.attempts, 2, "the killed claim counts as an attempt");
    let task = api.task(cmd.task_id).await.unwrap();
    assert!(task.timeline.iter().any(|e| e.event == "lease_expired"), "{:?}", task.timeline);
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_cancelled_buffered_task_never_reaches_the_simulator() {
    // The launch holds the VM for 2 s, so the command behind it waits, buffered.
    let stack = start(StackOptions::default().sim_arg("--latency").sim_arg("start=2s")).await;
    let api = stack.client();
    let launch =
        api.submit_op("launch_vm", json!({"vmName": "cancel-vm", "targetServer": "production"})).await.unwrap();
    let cmd = api.submit_op("run_command", json!({"vmName": "cancel-vm", "command": "echo never"})).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while !api.ready("production").await.unwrap().tasks.iter().any(|t| t.task_id == cmd.task_id) {
        assert!(Instant::now() < deadline, "never buffered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancelled = api.cancel(cmd.task_id).await.unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert_eq!(api.wait_terminal(launch.task_id, WAIT).await.unwrap().status, TaskStatus::Completed);
    // Give the daemon time to look at the cancelled task.
    let after = api.submit_op("run_command", json!({"vmName": "cancel-vm", "command": "echo after"})).await.unwrap();
    assert_eq!(api.wait_terminal(after.task_id, WAIT).await.unwrap().status, TaskStatus::Completed);
    assert_eq!(api.status(cmd.task_id).await.unwrap().status, TaskStatus::Cancelled);
    let commands: Vec<String> = sim_log(&stack)
        .await
        .iter()
        .filter(|e| e["op"] == "cmd")
        .map(|e| e["requestBody"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(commands.iter().all(|c| !c.contains("never")), "cancelled command reached Arrakis: {commands:?}");
    assert!(commands.iter().any(|c| c.contains("after")));
    let err = api.cancel(after.task_id).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT), "a started task cannot be cancelled");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn tasks_run_only_on_a_daemon_serving_their_server_and_the_registry_routes_later_ones() {
    let stack = start(StackOptions::default().server_names(["alpha"])).await;
    let api = stack.client();
    let here = api.submit_op("launch_vm", json!({"vmName": "vm-alpha", "targetServer": "alpha"})).await.unwrap();
    let elsewhere = api.submit_op("launch_vm", json!({"vmName": "vm-beta", "targetServer": "beta"})).await.unwrap();
    assert_eq!(api.wait_terminal(here.task_id, WAIT).await.unwrap().status, TaskStatus::Completed);
    // No targetServer: the registry sends it to alpha.
    let cmd = api.submit_op("run_command", json!({"vmName": "vm-alpha", "command": "hostname"})).await.unwrap();
    assert_eq!(cmd.target_server, "alpha");
    assert_eq!(
        api.wait_terminal(cmd.task_id, WAIT).await.unwrap().result.and_then(|r| r.output).as_deref(),
        Some("vm-alpha\n")
    );

    let beta = api.status(elsewhere.task_id).await.unwrap();
    assert_eq!(beta.status, TaskStatus::Pending, "no daemon serves beta");
    assert!(api.ready("beta").await.unwrap().tasks.iter().any(|t| t.task_id == elsewhere.task_id));
    assert!(sim_log(&stack).await.iter().all(|e| e["vmName"] != "vm-beta"));

    let vm = api.vm_status("vm-alpha").await.unwrap();
    assert_eq!((vm.server.as_str(), vm.state), ("alpha", Some(VmState::Running)));
    assert!(vm.ip.is_some());
    assert_eq!(vm.last_task_id, cmd.task_id);
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_second_daemon_for_the_same_server_on_one_host_is_refused() {
    let stack = start(StackOptions::default()).await;
    let bin = stack.options().resolved_bin_dir(&stack::repo_root()).join("local-consumer");
    let output = tokio::process::Command::new(bin)
        .env_clear()
        .env("API_WORKER_URL", stack.api_url())
        .env("CONSUMER_WORKER_URL", stack.consumer_url())
        .env("CONSUMER_TOKEN", stack.consumer_token())
        .env("ARRAKIS_URL", stack.arrakis_url())
        .env("SERVER_NAMES", "production")
        .env("METRICS_ADDR", "off")
        .env("LOCK_DIR", stack.dir().join("locks"))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another local-consumer already serves server \"production\""), "{stderr}");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn an_idempotency_key_replays_the_original_task_and_refuses_a_different_body() {
    let stack = start(StackOptions::edge_only()).await;
    let api = stack.client();
    let body = json!({"type": "launch_vm", "payload": {"vmName": "idem-vm", "targetServer": "production"}});
    let bearer = api.client_bearer();
    let headers = [("authorization", bearer.as_str()), ("idempotency-key", "launch-idem-vm-1")];
    let (first_status, first) = api.submit_raw(Method::POST, "/vm/tasks", &headers, Some(&body)).await.unwrap();
    let (again_status, again) = api.submit_raw(Method::POST, "/vm/tasks", &headers, Some(&body)).await.unwrap();
    assert_eq!((first_status, again_status), (StatusCode::ACCEPTED, StatusCode::OK));
    assert_eq!(first["taskId"], again["taskId"]);
    let listed = api.list(Some(100), None).await.unwrap();
    assert_eq!(listed.tasks.iter().filter(|t| t.vm_name == "idem-vm").count(), 1, "no second task");

    let other = json!({"type": "launch_vm", "payload": {"vmName": "idem-vm", "targetServer": "staging"}});
    let (status, reply) = api.submit_raw(Method::POST, "/vm/tasks", &headers, Some(&other)).await.unwrap();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reply}");
    assert_eq!(reply["code"], "idempotency_key_reused");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn transient_arrakis_failures_are_retried_and_recorded_on_the_task() {
    // The next two GETs of the VM fail with a 500; the daemon retries and completes.
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let launch = api.submit_op("launch_vm", json!({"vmName": "retry-vm", "targetServer": "production"})).await.unwrap();
    api.wait_terminal(launch.task_id, WAIT).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/_sim/fail-next", stack.arrakis_url().trim_end_matches('/'));
    http.post(url)
        .json(&json!({"op": "get", "status": 500, "count": 2}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let stop = api.submit_op("stop_vm", json!({"vmName": "retry-vm"})).await.unwrap();
    let done = api.wait_terminal(stop.task_id, WAIT).await.unwrap();
    assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
    let task = api.task(stop.task_id).await.unwrap();
    let retries: Vec<&str> = task.timeline.iter().filter(|e| e.event == "retry").map(|e| e.message.as_str()).collect();
    assert_eq!(retries.len(), 2, "{:?}", task.timeline);
    assert!(retries[0].contains("attempt 1 failed"), "{retries:?}");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_task_that_cannot_be_buffered_is_dead_lettered_and_failed_not_lost() {
    let stack = start(
        StackOptions::edge_only()
            .worker_var("FAULT_FAIL_BUFFERING_VM", "dlq-vm")
            .worker_var("QUEUE_RETRY_DELAY_SECONDS", 1),
    )
    .await;
    let api = stack.client();
    let task = api.submit_op("launch_vm", json!({"vmName": "dlq-vm", "targetServer": "production"})).await.unwrap();
    let done = api.wait_terminal(task.task_id, Duration::from_secs(90)).await.unwrap();
    assert_eq!(done.status, TaskStatus::Failed);
    assert!(done.error.unwrap().contains("dead-lettered"));
    let stats = api.consumer_stats().await.unwrap();
    assert!(stats.ops.queue_retries >= 3, "{stats:?}");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn waiting_returns_when_the_task_finishes_or_at_the_limit() {
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let nobody = api.submit_op("launch_vm", json!({"vmName": "wait-vm", "targetServer": "nobody"})).await.unwrap();
    let started = Instant::now();
    let (status, reply) = api
        .submit_raw(
            Method::GET,
            &format!("/vm/tasks/{}?wait=2", nobody.task_id),
            &[("authorization", &api.client_bearer())],
            None,
        )
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["task"]["status"], "pending");
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(5), "{waited:?}");

    let quick = api.submit_op("launch_vm", json!({"vmName": "wait-vm-2", "targetServer": "production"})).await.unwrap();
    let started = Instant::now();
    let (_, reply) = api
        .submit_raw(
            Method::GET,
            &format!("/vm/tasks/{}?wait=30", quick.task_id),
            &[("authorization", &api.client_bearer())],
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply["task"]["status"], "completed");
    assert!(started.elapsed() < Duration::from_secs(10), "answered when terminal, not at the limit");
    let timeline = reply["task"]["timeline"].as_array().unwrap();
    let steps: Vec<(&str, &str, &str)> = timeline
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["actor"].as_str().unwrap(), e["to"].as_str().unwrap_or("-")))
        .collect();
    assert_eq!(
        steps,
        [
            ("created", "api", "-"),
            ("buffered", "consumer-worker", "-"),
            ("claimed", "stack-consumer", "processing"),
            ("completed", "stack-consumer", "completed")
        ]
    );

    let (status, reply) = api
        .submit_raw(
            Method::GET,
            &format!("/vm/tasks/{}?wait=61", quick.task_id),
            &[("authorization", &api.client_bearer())],
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(reply["field"], "wait");
}
