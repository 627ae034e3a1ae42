//! End-to-end tests of the whole flow: both workers under `wrangler dev`, the Arrakis
//! simulator, and the `local-consumer` daemon, as a user drives them with HTTP.
//!
//! Run with `cargo xtask e2e`; the worker bundles and release binaries must be built first.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use stack::{ApiClient, StackOptions};

use vm_task_types::{wire::TaskStatusResponse, TaskStatus, VmState};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

async fn run(api: &ApiClient, kind: &str, payload: Value) -> TaskStatusResponse {
    let created = api.submit_op(kind, payload).await.expect("accepted");
    api.wait_terminal(created.task_id, WAIT).await.expect("reaches a terminal state")
}

/// The simulator's request log, Arrakis calls only (the control API is not logged).
fn entries_for<'a>(log: &'a [Value], vm: &str) -> Vec<&'a Value> {
    log.iter().filter(|e| e["vmName"] == vm).collect()
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn the_seed_walkthrough_completes_with_results() {
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    assert_eq!(api.health().await.unwrap().status, "healthy");
    assert_eq!(api.consumer_health().await.unwrap().status, "healthy");

    let launch = run(
        &api,
        "launch_vm",
        json!({"vmName": "test-vm-001", "vmConfig": {"memory": "2G"}, "targetServer": "production"}),
    )
    .await;
    assert_eq!(launch.status, TaskStatus::Completed, "{launch:?}");
    let result = launch.result.clone().expect("a launch result");
    assert_eq!(result.vm_state, Some(VmState::Running));
    let ip = result.ip.expect("an ip");
    assert!(ip.starts_with("10.20.1.") && !ip.contains('/'), "ip without CIDR suffix: {ip}");
    let forwards = result.port_forwards.expect("port forwards");
    assert_eq!(forwards.first().map(|p| p.guest_port), Some(5901));

    let command =
        run(&api, "run_command", json!({"vmName": "test-vm-001", "command": "echo Hello from VM", "blocking": true}))
            .await;
    assert_eq!(command.status, TaskStatus::Completed, "{command:?}");
    assert_eq!(command.target_server, "production", "routed by the VM registry");
    let out = command.result.expect("a command result");
    assert_eq!(out.output.as_deref(), Some("Hello from VM\n"));
    assert_eq!(out.exit_code, Some(0));

    let stop = run(&api, "stop_vm", json!({"vmName": "test-vm-001"})).await;
    assert_eq!((stop.status, stop.result.and_then(|r| r.vm_state)), (TaskStatus::Completed, Some(VmState::Stopped)));
    let delete = run(&api, "delete_vm", json!({"vmName": "test-vm-001"})).await;
    assert_eq!(
        (delete.status, delete.result.and_then(|r| r.vm_state)),
        (TaskStatus::Completed, Some(VmState::Deleted))
    );

    let list = api.list(Some(10), None).await.unwrap();
    let kinds: Vec<(&str, TaskStatus)> = list.tasks.iter().map(|t| (t.kind.as_str(), t.status)).collect();
    assert_eq!(
        kinds,
        [
            ("delete_vm", TaskStatus::Completed),
            ("stop_vm", TaskStatus::Completed),
            ("run_command", TaskStatus::Completed),
            ("launch_vm", TaskStatus::Completed)
        ]
    );
    let vm = api.vm_status("test-vm-001").await.unwrap();
    assert_eq!(vm.state, Some(VmState::Deleted));

    // Repeating an operation whose effect is there is a success with a note.
    let again = run(&api, "delete_vm", json!({"vmName": "test-vm-001"})).await;
    assert_eq!(again.status, TaskStatus::Completed);
    assert_eq!(again.result.and_then(|r| r.note).as_deref(), Some("VM was already gone"));

    let ops: Vec<String> = sim_log(&stack)
        .await
        .iter()
        .filter(|e| e["vmName"] == "test-vm-001")
        .map(|e| e["op"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        ops.contains(&"start".to_owned()) && ops.contains(&"cmd".to_owned()) && ops.contains(&"stop".to_owned()),
        "{ops:?}"
    );
    assert_eq!(ops.iter().filter(|o| *o == "delete").count(), 2, "{ops:?}");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_failing_arrakis_call_fails_the_task_with_arrakis_message() {
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let launch = run(&api, "launch_vm", json!({"vmName": "vm-snap", "targetServer": "production"})).await;
    assert_eq!(launch.status, TaskStatus::Completed);
    let first = run(&api, "snapshot_vm", json!({"vmName": "vm-snap", "snapshotId": "snap-1"})).await;
    assert_eq!(first.status, TaskStatus::Completed, "{first:?}");
    assert_eq!(first.result.and_then(|r| r.snapshot_id).as_deref(), Some("snap-1"));

    // Arrakis snapshot ids are single-use: the second one is refused with a 500.
    let second = run(&api, "snapshot_vm", json!({"vmName": "vm-snap", "snapshotId": "snap-1"})).await;
    assert_eq!(second.status, TaskStatus::Failed);
    assert_eq!(second.error.as_deref(), Some("Failed to create snapshot: snapshot with ID snap-1 already exists"));

    let missing = run(&api, "stop_vm", json!({"vmName": "never-launched", "targetServer": "production"})).await;
    assert_eq!(missing.status, TaskStatus::Failed);
    assert!(missing.error.unwrap().contains("does not exist on server \"production\""));
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn twenty_tasks_on_five_vms_keep_per_vm_order_and_run_vms_in_parallel() {
    // Slow Arrakis calls make overlap between VMs visible in the request log.
    let stack = start(StackOptions::default().sim_arg("--latency").sim_arg("start=150ms,cmd=150ms")).await;
    let api = stack.client();
    let vms: Vec<String> = (0..5).map(|i| format!("order-vm-{i}")).collect();
    let mut ids = Vec::new();
    for step in 0..4 {
        for vm in &vms {
            let created = if step == 0 {
                api.submit_op("launch_vm", json!({"vmName": vm, "targetServer": "production"})).await
            } else {
                api.submit_op("run_command", json!({"vmName": vm, "command": format!("echo step-{step}")})).await
            }
            .expect("accepted");
            ids.push(created.task_id);
        }
    }
    let started = Instant::now();
    for id in &ids {
        let status = api.wait_terminal(*id, WAIT).await.unwrap();
        assert_eq!(status.status, TaskStatus::Completed, "{status:?}");
    }
    let elapsed = started.elapsed();

    let log = sim_log(&stack).await;
    for vm in &vms {
        let mine = entries_for(&log, vm);
        let work: Vec<String> = mine
            .iter()
            .filter(|e| e["op"] == "start" || e["op"] == "cmd")
            .map(|e| match e["op"].as_str() {
                Some("cmd") => serde_json::from_str::<Value>(e["requestBody"].as_str().unwrap_or("{}")).unwrap()["cmd"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                other => other.unwrap_or("").to_owned(),
            })
            .collect();
        assert_eq!(work, ["start", "echo step-1", "echo step-2", "echo step-3"], "{vm}: submission order");
        for pair in mine.windows(2) {
            assert!(pair[0]["endMs"].as_f64() <= pair[1]["startMs"].as_f64(), "{vm}: calls overlap: {pair:?}");
        }
    }
    // Different VMs ran at the same time: some calls of different VMs overlap in time.
    let calls: Vec<(&str, f64, f64)> = log
        .iter()
        .filter(|e| e["op"] == "start" || e["op"] == "cmd")
        .map(|e| {
            (
                e["vmName"].as_str().unwrap_or(""),
                e["startMs"].as_f64().unwrap_or(0.0),
                e["endMs"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let mut overlapping: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &calls {
        for b in &calls {
            if a.0 != b.0 && a.1 < b.2 && b.1 < a.2 {
                *overlapping.entry(a.0).or_default() += 1;
            }
        }
    }
    assert!(overlapping.len() >= 2, "no two VMs' calls overlapped: {calls:?}");
    // 20 calls of 150 ms one after another would take 3 s; in parallel they take far less.
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn issue_11_a_75_kb_output_completes_with_its_head_tail_and_size() {
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let launch = run(&api, "launch_vm", json!({"vmName": "big-output", "targetServer": "production"})).await;
    assert_eq!(launch.status, TaskStatus::Completed, "{launch:?}");

    // 15,001 bytes a line, five times: 75,005 bytes, over the API's 64 KiB body limit.
    let started = Instant::now();
    let command = format!("echo {} > f && cat f f f f f", "a".repeat(15_000));
    let done = run(&api, "run_command", json!({"vmName": "big-output", "command": command, "blocking": true})).await;
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    assert_eq!(done.status, TaskStatus::Completed, "{:?}", done.error);
    let result = done.result.expect("a command result");
    let output = result.output.expect("the output's head and tail");
    assert!(output.starts_with("aaaa") && output.ends_with("aaaa\n"), "{}", &output[..40]);
    assert!(output.len() < 40_000, "cut to MAX_OUTPUT_BYTES: {}", output.len());
    assert_eq!(result.output_truncated, Some(true));
    assert_eq!(result.output_bytes, Some(75_005));
    assert_eq!(result.exit_code, Some(0));
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn issue_11_host_paths_fail_the_launch_before_arrakis_sees_it() {
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    for (vm, field, path) in [("dev-vm", "rootfs", "/dev/sda"), ("shadow-vm", "kernel", "/etc/shadow")] {
        let done =
            run(&api, "launch_vm", json!({"vmName": vm, "targetServer": "production", "vmConfig": {field: path}}))
                .await;
        assert_eq!(done.status, TaskStatus::Failed, "{done:?}");
        let error = done.error.unwrap_or_default();
        assert!(error.contains(&format!("vmConfig.{field}")) && error.contains("/opt/arrakis"), "{error}");
    }
    let log = sim_log(&stack).await;
    assert!(entries_for(&log, "dev-vm").is_empty() && entries_for(&log, "shadow-vm").is_empty(), "{log:?}");
}
