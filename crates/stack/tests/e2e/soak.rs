//! The soak: 2,000 tasks over 100 VMs against an Arrakis that fails 10% of calls and is slow
//! now and then. At the end every task is terminal, no operation reached the simulator more
//! often than the task's record accounts for, and the simulator's VMs match the VM registry.
//!
//! Not part of `cargo xtask test` (it takes minutes): run `cargo xtask soak`. It prints the
//! figures RELIABILITY.md records. Sizes: SOAK_VMS (100) and SOAK_TASKS_PER_VM (20).

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use futures::future::join_all;
use serde_json::{json, Value};
use stack::{ApiClient, StackOptions};
use uuid::Uuid;
use vm_task_types::{TaskStatus, VmState};

use crate::support::start;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What each VM gets, `per_vm` tasks in all: launch, commands, a pause/resume pair, a stop
/// and, for every fourth VM, a delete. Commands echo a marker unique to their task.
fn plan(vm: usize, per_vm: usize) -> Vec<(String, Value)> {
    let name = format!("soak-{vm:03}");
    let mut ops = vec![("launch_vm".to_owned(), json!({"vmName": name, "targetServer": "production"}))];
    // launch, pause, resume and stop, a delete for every fourth VM, commands for the rest.
    let deletes = usize::from(vm.is_multiple_of(4));
    let commands = per_vm.saturating_sub(4 + deletes).max(1);
    for k in 0..commands {
        if k == commands / 2 {
            ops.push(("pause_vm".into(), json!({"vmName": name})));
            ops.push(("resume_vm".into(), json!({"vmName": name})));
        }
        ops.push(("run_command".into(), json!({"vmName": name, "command": format!("echo soak-{vm:03}-{k:03}")})));
    }
    ops.push(("stop_vm".into(), json!({"vmName": name})));
    if deletes == 1 {
        ops.push(("delete_vm".into(), json!({"vmName": name})));
    }
    ops
}

async fn submit_all(api: &ApiClient, vms: usize, per_vm: usize) -> Vec<(Uuid, String, Value)> {
    // Interleave VMs, so many VMs are busy at once, keeping each VM's own order.
    let plans: Vec<Vec<(String, Value)>> = (0..vms).map(|vm| plan(vm, per_vm)).collect();
    let longest = plans.iter().map(Vec::len).max().unwrap_or(0);
    let mut submitted = Vec::new();
    for step in 0..longest {
        let round: Vec<(String, Value)> = plans.iter().filter_map(|p| p.get(step).cloned()).collect();
        let results = submit_round(api, &round).await;
        for ((kind, payload), id) in round.into_iter().zip(results) {
            submitted.push((id, kind, payload));
        }
    }
    submitted
}

/// Submits one round concurrently (one task per VM, so per-VM order holds); ids in round order.
async fn submit_round(api: &ApiClient, round: &[(String, Value)]) -> Vec<Uuid> {
    let submits = round.iter().map(|(kind, payload)| api.submit_op(kind, payload.clone()));
    join_all(submits).await.into_iter().map(|created| created.expect("accepted").task_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the soak takes minutes: cargo xtask soak"]
async fn soak_two_thousand_tasks_with_faults() {
    let vms = env_usize("SOAK_VMS", 100);
    let per_vm = env_usize("SOAK_TASKS_PER_VM", 20);
    let stack = start(
        StackOptions::default()
            .sim_arg("--error-rate")
            .sim_arg("0.1")
            .sim_arg("--seed")
            .sim_arg("2026")
            .sim_arg("--latency")
            .sim_arg("start=20ms,cmd=5ms,snapshot=20ms")
            .daemon_env("MAX_CONCURRENCY", 32)
            .daemon_env("ARRAKIS_RETRY_BASE_MS", 20),
    )
    .await;
    let api = stack.client();
    let started = Instant::now();
    let submitted = submit_all(&api, vms, per_vm).await;
    let submit_secs = started.elapsed().as_secs_f64();

    // Every task reaches a terminal state.
    let mut final_status: HashMap<Uuid, vm_task_types::wire::TaskStatusResponse> = HashMap::new();
    for (id, _, _) in &submitted {
        let status = api.wait_terminal(*id, Duration::from_secs(600)).await.expect("terminal");
        assert!(status.status.is_terminal(), "{status:?}");
        final_status.insert(*id, status);
    }
    let total_secs = started.elapsed().as_secs_f64();

    let log: Vec<Value> = reqwest::get(format!("{}/_sim/log", stack.arrakis_url().trim_end_matches('/')))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let injected = log.iter().filter(|e| e["faultInjected"] == true).count();

    // Commands: each marker reached Arrakis once per recorded attempt, and ran exactly once
    // when its task completed.
    let mut cmd_requests: HashMap<String, (usize, usize)> = HashMap::new();
    for e in log.iter().filter(|e| e["op"] == "cmd") {
        let body: Value = serde_json::from_str(e["requestBody"].as_str().unwrap_or("{}")).unwrap_or(Value::Null);
        let marker = body["cmd"].as_str().unwrap_or("").to_owned();
        let entry = cmd_requests.entry(marker).or_default();
        entry.0 += 1;
        if e["faultInjected"] != true {
            entry.1 += 1;
        }
    }
    let (mut completed, mut failed, mut retries, mut duplicates) = (0, 0, 0, 0);
    let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (id, kind, payload) in &submitted {
        let status = &final_status[id];
        let task = api.task(*id).await.unwrap();
        let task_retries: Vec<&str> =
            task.timeline.iter().filter(|e| e.event == "retry").map(|e| e.message.as_str()).collect();
        retries += task_retries.len();
        let slot = by_kind.entry(kind.as_str()).or_default();
        match status.status {
            TaskStatus::Completed => {
                completed += 1;
                slot.0 += 1;
            }
            TaskStatus::Failed => {
                failed += 1;
                slot.1 += 1;
                assert!(status.error.as_deref().is_some_and(|e| !e.is_empty()), "failure without a reason: {status:?}");
            }
            other => panic!("{id} ended {other}"),
        }
        if kind == "run_command" {
            let marker = payload["command"].as_str().unwrap();
            let (reached, executed) = cmd_requests.get(marker).copied().unwrap_or((0, 0));
            let cmd_retries = task_retries.iter().filter(|m| m.contains(": cmd: ")).count();
            if executed > 1 || reached > 1 + cmd_retries {
                duplicates += 1;
                eprintln!(
                    "duplicate: {marker} reached {reached}×, executed {executed}×, {cmd_retries} cmd retries recorded"
                );
            }
            if status.status == TaskStatus::Completed {
                assert_eq!(executed, 1, "{marker} completed but ran {executed}×");
            }
        }
    }

    // The simulator's VMs match the VM registry.
    let state: Value = reqwest::get(format!("{}/_sim/state", stack.arrakis_url().trim_end_matches('/')))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sim_vms: HashMap<String, String> = state["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["vmName"].as_str().unwrap().to_owned(), v["status"].as_str().unwrap().to_owned()))
        .collect();
    let mut mismatches = 0;
    for vm in 0..vms {
        let name = format!("soak-{vm:03}");
        let registry = api.vm_status(&name).await.unwrap();
        let expected = match registry.state {
            Some(VmState::Deleted) | None => None,
            Some(s) => Some(serde_json::to_value(s).unwrap().as_str().unwrap().to_owned()),
        };
        if sim_vms.get(&name).cloned() != expected {
            mismatches += 1;
            eprintln!("{name}: simulator {:?}, registry {:?}", sim_vms.get(&name), registry.state);
        }
    }
    let stats_api = api.api_stats().await.unwrap().ops;
    let stats_consumer = api.consumer_stats().await.unwrap().ops;

    println!("soak: {} tasks over {vms} VMs, {} operation kinds", submitted.len(), by_kind.len());
    println!(
        "  submitted in {submit_secs:.1} s; all terminal after {total_secs:.1} s ({:.1} tasks/s)",
        submitted.len() as f64 / total_secs
    );
    println!("  completed {completed}, failed {failed}, lost 0, duplicates {duplicates}");
    for (kind, (ok, bad)) in &by_kind {
        println!("    {kind:<12} completed {ok:>5}  failed {bad:>4}");
    }
    println!("  Arrakis requests {}, faults injected {injected}, retries recorded {retries}", log.len());
    println!("  simulator VMs vs registry mismatches: {mismatches}");
    println!(
        "  KV write-class ops per task: {:.2} (api {} + consumer {})",
        (stats_api.kv_write_class() + stats_consumer.kv_write_class()) as f64 / submitted.len() as f64,
        stats_api.kv_write_class(),
        stats_consumer.kv_write_class()
    );
    assert_eq!(duplicates, 0, "operations reached the simulator more often than the records account for");
    assert_eq!(mismatches, 0, "the simulator's VMs must match the VM registry");
    assert!(injected > 0, "faults were on");
    if failed == 0 {
        // Every injected fault is transient, so each one was retried, and every retry is on
        // the record of the task that met it.
        assert_eq!(retries, injected, "faults the task records do not account for");
    }
}
