//! The `vmctl` binary as a user runs it, against an in-process fake API: what it prints,
//! what it sends, and the exit code a script sees.

mod common;

use common::{last_submitted, FakeApi, Vmctl, TOKEN};
use serde_json::json;

fn assert_code(run: &common::Run, code: i32) {
    assert_eq!(run.code, code, "{run:#?}");
}

#[tokio::test]
async fn launch_waits_for_the_task_and_prints_its_result() {
    let api = FakeApi::start().await;
    let run = api.vmctl(&["launch", "vm-1", "--memory", "2G", "--server", "production"]).await;
    assert_code(&run, 0);
    assert!(run.stdout.contains("status    completed after"), "{run:#?}");
    assert!(run.stdout.contains("ip        10.20.1.2"), "{run:#?}");
    assert!(run.stdout.contains("ports     3000→5901 gui"), "{run:#?}");
    assert_eq!(
        last_submitted(&api),
        json!({"type": "launch_vm", "payload": {"vmName": "vm-1", "vmConfig": {"memory": "2G"}, "targetServer": "production"}})
    );
    // stderr is a pipe here: no spinner, no escape codes.
    assert_eq!(run.stderr, "", "{run:#?}");
}

#[tokio::test]
async fn no_wait_prints_the_task_id_at_once() {
    let api = FakeApi::start().await;
    let run = api.vmctl(&["stop", "stuck-1", "--no-wait"]).await;
    assert_code(&run, 0);
    let id: uuid::Uuid = run.stdout.trim().parse().expect("a task id");
    let (task_id, status) = api.state().tasks.first().map(|t| (t.id, t.status)).unwrap();
    assert_eq!(task_id, id);
    assert_eq!(status, vm_task_types::TaskStatus::Pending, "nothing waited on it");

    let run = api.vmctl(&["pause", "stuck-1", "--no-wait", "--json"]).await;
    assert_code(&run, 0);
    assert_eq!(run.json()["type"], "pause_vm");
    assert_eq!(run.json()["status"], "pending");
}

#[tokio::test]
async fn callback_url_goes_in_the_submitted_body() {
    let api = FakeApi::start().await;
    let run = api.vmctl(&["stop", "vm-1", "--no-wait", "--callback-url", "https://hooks.example.com/vm"]).await;
    assert_code(&run, 0);
    assert_eq!(
        last_submitted(&api),
        json!({"type": "stop_vm", "payload": {"vmName": "vm-1"}, "callbackUrl": "https://hooks.example.com/vm"})
    );
}

#[tokio::test]
async fn exec_prints_the_output_and_exits_with_the_commands_code() {
    let api = FakeApi::start().await;
    let run = api.vmctl(&["exec", "vm-1", "--", "exit", "3"]).await;
    assert_code(&run, 3);
    assert_eq!(run.stdout, "ran: exit 3\n");
    assert_eq!(run.stderr, "");
    let run = api.vmctl(&["exec", "vm-1", "--", "echo hi"]).await;
    assert_code(&run, 0);
    assert_eq!(run.stdout, "ran: echo hi\n");
    // --json prints the record and still exits with the command's code.
    let run = api.vmctl(&["--json", "exec", "vm-1", "--", "exit 7"]).await;
    assert_code(&run, 7);
    assert_eq!(run.json()["result"]["exitCode"], 7);
}

#[tokio::test]
async fn a_failed_task_prints_its_record_and_exits_1_with_its_error() {
    let api = FakeApi::start().await;
    let run = api.vmctl(&["launch", "broken-1"]).await;
    assert_code(&run, 1);
    assert!(run.stdout.contains("status  failed after"), "{run:#?}");
    assert!(
        run.stderr.starts_with("vmctl: task ") && run.stderr.contains("failed: arrakis: boot failed: no kernel"),
        "{run:#?}"
    );
    let run = api.vmctl(&["--json", "delete", "broken-2"]).await;
    assert_code(&run, 1);
    assert_eq!(run.json()["status"], "failed");
}

#[tokio::test]
async fn settings_come_from_flags_then_environment_then_dotenv() {
    let api = FakeApi::start().await;
    let dotenv = format!("API_URL={}\nAPI_TOKEN={TOKEN}\n", api.url);
    let run = Vmctl::new().file(".env", &dotenv).run(&["stop", "vm-1"]).await;
    assert_code(&run, 0);
    // The environment wins over .env: a wrong token there is refused.
    let run = Vmctl::new().file(".env", &dotenv).env("API_TOKEN", "wrong").run(&["stop", "vm-1"]).await;
    assert_code(&run, 4);
    // And a flag wins over both.
    let run =
        Vmctl::new().file(".env", &dotenv).env("API_TOKEN", "wrong").run(&["stop", "vm-1", "--token", TOKEN]).await;
    assert_code(&run, 0);
    let run = Vmctl::new().file(".env", "API_TOKEN\n").run(&["stop", "vm-1"]).await;
    assert_code(&run, 2);
    assert!(run.stderr.contains("cannot read .env"), "{run:#?}");
}

#[tokio::test]
async fn errors_name_the_problem_and_what_to_do() {
    let api = FakeApi::start().await;
    let run = Vmctl::new().env("API_URL", &api.url).run(&["vm", "vm-1"]).await;
    assert_code(&run, 2);
    assert!(run.stderr.contains("no API token: set API_TOKEN or pass --token"), "{run:#?}");

    let run = Vmctl::new().env("API_URL", &api.url).env("API_TOKEN", "wrong").run(&["vm", "vm-1"]).await;
    assert_code(&run, 4);
    assert!(
        run.stderr.contains("refused the token (401: missing or invalid bearer token); check API_TOKEN or --token"),
        "{run:#?}"
    );

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let run = Vmctl::new().env("API_URL", &closed).env("API_TOKEN", TOKEN).run(&["tasks"]).await;
    assert_code(&run, 3);
    assert!(run.stderr.contains(&format!("cannot reach the API at {closed}/vm/tasks?limit=50")), "{run:#?}");
    assert!(run.stderr.contains("Is `cargo xtask dev` running?"), "{run:#?}");

    let run = api.vmctl(&["task", "0190b5a4-3b7c-7def-8abc-0123456789ab"]).await;
    assert_code(&run, 5);
    assert!(run.stderr.contains("not found (404): task 0190b5a4-3b7c-7def-8abc-0123456789ab not found"), "{run:#?}");

    let run = api.vmctl(&["launch", "../etc"]).await;
    assert_code(&run, 2);
    assert!(run.stderr.contains("the API rejected the request (400): payload.vmName:"), "{run:#?}");
    assert!(run.stderr.contains("(field: payload.vmName)"), "{run:#?}");

    let run = api.vmctl(&["vm", "nowhere"]).await;
    assert_code(&run, 5);
    assert!(run.stderr.contains("VM \"nowhere\" is not in the registry"), "{run:#?}");
}

#[tokio::test]
async fn cancel_prints_what_the_api_answered() {
    let api = FakeApi::start().await;
    let pending = api.vmctl(&["launch", "stuck-1", "--no-wait"]).await.stdout.trim().to_owned();
    let run = api.vmctl(&["cancel", &pending]).await;
    assert_code(&run, 0);
    assert_eq!(run.stdout, format!("task {pending} cancelled: task cancelled\n"));

    // A task past pending: the API's 409 with its current status.
    let busy = api.vmctl(&["launch", "busy-1", "--no-wait"]).await.stdout.trim().to_owned();
    api.vmctl(&["task", &busy]).await; // one read moves it to processing
    let run = api.vmctl(&["cancel", &busy]).await;
    assert_code(&run, 6);
    assert!(run.stderr.contains(&format!("conflict (409): task {busy} is processing")), "{run:#?}");

    // A claim in flight: the API took the request and the record tells the outcome.
    let long = api.vmctl(&["exec", "long-1", "--no-wait", "--", "sleep 90"]).await.stdout.trim().to_owned();
    api.vmctl(&["task", &long]).await;
    let run = api.vmctl(&["cancel", &long]).await;
    assert_code(&run, 0);
    assert!(run.stdout.starts_with(&format!("cancel requested for task {long}: a daemon is claiming")), "{run:#?}");
    assert!(run.stdout.contains(&format!("vmctl watch {long}")), "{run:#?}");
}

#[tokio::test]
async fn a_task_for_an_unserved_server_fails_when_cancelled_while_waiting_elsewhere() {
    // `launch` waits; another vmctl cancels; the waiting one reports the cancellation.
    let api = FakeApi::start().await;
    let waiting = {
        let api = api.clone();
        tokio::spawn(async move { api.vmctl(&["launch", "stuck-2", "--server", "nowhere"]).await })
    };
    let id = loop {
        if let Some(task) = api.state().tasks.first() {
            break task.id;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_code(&api.vmctl(&["cancel", &id.to_string()]).await, 0);
    let run = waiting.await.unwrap();
    assert_code(&run, 1);
    assert!(run.stderr.contains(&format!("task {id} cancelled: cancelled by client")), "{run:#?}");
}

#[tokio::test]
async fn tasks_sends_the_filters_to_the_api_and_prints_its_page() {
    let api = FakeApi::start().await;
    for vm in ["vm-a", "vm-b", "vm-a", "vm-b", "vm-b", "vm-a", "vm-b"] {
        assert_code(&api.vmctl(&["stop", vm, "--no-wait"]).await, 0);
    }
    let run = api.vmctl(&["tasks", "--vm", "vm-a", "--limit", "2"]).await;
    assert_code(&run, 0);
    let rows: Vec<&str> = run.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{run:#?}");
    assert!(rows.iter().all(|r| r.contains("vm-a") && !r.contains("vm-b")), "{run:#?}");
    let queries = api.state().list_queries.clone();
    assert_eq!(queries.len(), 1, "one request: the API filters: {queries:?}");
    assert_eq!(queries[0].get("vmName").map(String::as_str), Some("vm-a"));
    assert!(run.stderr.contains("more: vmctl tasks --cursor 2 (with the same filters)"), "{run:#?}");

    let run = api.vmctl(&["--json", "tasks", "--type", "stop_vm", "--status", "pending", "--limit", "1000"]).await;
    assert_code(&run, 0);
    assert_eq!(run.json()["count"], 7);
    assert_eq!(run.json()["listComplete"], true);

    let run = api.vmctl(&["tasks", "--limit", "3"]).await;
    assert_code(&run, 0);
    assert_eq!(run.stdout.lines().count(), 4, "{run:#?}");
    assert!(run.stderr.contains("more: vmctl tasks --cursor 3"), "{run:#?}");
}

#[tokio::test]
async fn task_shows_the_timeline_and_watch_follows_it_to_the_end() {
    let api = FakeApi::start().await;
    let id = api.vmctl(&["launch", "vm-1", "--no-wait"]).await.stdout.trim().to_owned();
    let run = api.vmctl(&["watch", &id]).await;
    assert_code(&run, 0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with(&format!("task {id} launch_vm vm-1 on production")), "{run:#?}");
    assert!(lines[1].starts_with("TIME") && lines[1].contains("FROM→TO"), "{run:#?}");
    let events: Vec<&str> = lines[2..].iter().take_while(|l| !l.is_empty()).copied().collect();
    assert_eq!(events.len(), 4, "created, buffered, claimed, completed: {run:#?}");
    assert!(events[2].contains("pending→processing") && events[2].contains("+"), "{run:#?}");
    assert!(events[3].contains("processing→completed"), "{run:#?}");
    assert!(run.stdout.contains("status    completed after"), "{run:#?}");

    let run = api.vmctl(&["task", &id]).await;
    assert_code(&run, 0);
    assert!(run.stdout.contains("status    completed ("), "{run:#?}");
    assert!(run.stdout.contains("ACTOR") && run.stdout.contains("host-a"), "{run:#?}");

    let failing = api.vmctl(&["launch", "broken-1", "--no-wait"]).await.stdout.trim().to_owned();
    let run = api.vmctl(&["--json", "watch", &failing]).await;
    assert_code(&run, 1);
    let mut lines = run.stdout.lines();
    let first: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(first["event"], "created");
}

#[tokio::test]
async fn vm_shows_the_registry_record() {
    let api = FakeApi::start().await;
    assert_code(&api.vmctl(&["launch", "vm-1"]).await, 0);
    let run = api.vmctl(&["vm", "vm-1"]).await;
    assert_code(&run, 0);
    assert!(run.stdout.contains("state       RUNNING"), "{run:#?}");
    assert!(run.stdout.contains("launch_vm (completed)"), "{run:#?}");
    assert_eq!(api.vmctl(&["--json", "vm", "vm-1"]).await.json()["ip"], "10.20.1.2");
}

#[tokio::test]
async fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let run = Vmctl::new().run(&["completions", shell]).await;
        assert_code(&run, 0);
        assert!(run.stdout.contains("launch") && run.stdout.contains("watch"), "{shell}: {run:#?}");
    }
}

#[tokio::test]
async fn transient_failures_are_retried_and_a_retried_submission_keeps_its_idempotency_key() {
    let api = FakeApi::start().await;
    api.state().fail_next_posts = 1;
    api.state().fail_next_reads = 1;
    let run = api.vmctl(&["stop", "vm-1"]).await;
    assert_code(&run, 0);
    let state = api.state();
    assert_eq!(state.idempotency_keys.len(), 2, "one failed try, one accepted");
    assert_eq!(state.idempotency_keys[0], state.idempotency_keys[1], "the retry is the same submission");
    assert_eq!(state.tasks.len(), 1);
}

#[tokio::test]
async fn a_persistent_server_error_ends_the_wait_naming_the_task_to_follow() {
    let api = FakeApi::start().await;
    api.state().fail_next_reads = 3;
    let run = api.vmctl(&["stop", "vm-1"]).await;
    assert_code(&run, 3);
    let id = api.state().tasks[0].id;
    assert!(run.stderr.contains("the API failed (502): injected: bad gateway"), "{run:#?}");
    assert!(run.stderr.contains(&format!("follow it with `vmctl watch {id}`")), "{run:#?}");
}
