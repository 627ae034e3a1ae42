//! Finding things and who is serving, on the real stack: task filters and `GET /vms` (#14.3),
//! the host registry and the POST's warning for an unserved server (#15.2).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stack::{Auth, Method, StackOptions};
use vm_task_types::TaskStatus;

use crate::support::*;

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn filters_and_the_vm_list_answer_from_listing_metadata() {
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let mut launches = Vec::new();
    for vm in ["find-a", "find-b"] {
        launches.push(
            api.submit_op("launch_vm", json!({"vmName": vm, "targetServer": "production"})).await.unwrap().task_id,
        );
    }
    let command = api.submit_op("run_command", json!({"vmName": "find-a", "command": "exit 3"})).await.unwrap().task_id;
    for id in launches.iter().chain([&command]) {
        api.wait_terminal(*id, Duration::from_secs(60)).await.unwrap();
    }
    let get = |path: String| {
        let api = api.clone();
        async move { api.call::<Value>(Method::GET, &path, Auth::Client, None, None).await }
    };
    let launched = get("/vm/tasks?type=launch_vm&vmName=find-a".into()).await.unwrap();
    assert_eq!(launched["count"], 1, "{launched}");
    assert_eq!(launched["tasks"][0]["id"], json!(launches[0]));
    let commands = get("/vm/tasks?type=run_command&targetServer=production".into()).await.unwrap();
    assert_eq!(commands["tasks"].as_array().unwrap().len(), 1, "{commands}");
    let none = get("/vm/tasks?status=cancelled".into()).await.unwrap();
    assert_eq!(none["count"], 0);

    let vms = get("/vms?server=production&state=running".into()).await.unwrap();
    let names: Vec<&str> = vms["vms"].as_array().unwrap().iter().map(|v| v["vmName"].as_str().unwrap()).collect();
    assert_eq!(names, ["find-a", "find-b"], "{vms}");
    assert!(vms["vms"][0]["ip"].is_string(), "{vms}");
    assert_eq!(vms["vms"][0]["lastTaskId"], json!(command));

    for (path, field) in [("/vm/tasks?status=done", "status"), ("/vms?state=asleep", "state")] {
        let refused = get(path.into()).await.unwrap_err();
        assert_eq!(refused.status().map(|s| s.as_u16()), Some(400), "{path}");
        assert_eq!(refused.body().unwrap()["field"], field, "{path}");
    }
    stack.shutdown().await.unwrap();
}

/// The local stack's daemon reports every second and polls for 2 s, and hosts are live for
/// 6 s here (production: 120 s reports, 300 s liveness), so "not live" shows in seconds.
#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn hosts_show_the_daemon_live_then_not_after_it_stops_and_unserved_posts_warn() {
    let opts = StackOptions::default()
        .worker_var("HOST_LIVE_SECONDS", 6)
        .daemon_env("HOST_REPORT_SECONDS", 1)
        .daemon_env("POLL_WAIT_SECONDS", 2);
    let mut stack = start(opts).await;
    let api = stack.client();
    let hosts = |api: stack::ApiClient| async move {
        api.call::<Value>(Method::GET, "/hosts?server=production", Auth::Client, None, None).await.unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let live = loop {
        let listed = hosts(api.clone()).await;
        if listed["hosts"][0]["live"] == true {
            break listed;
        }
        assert!(Instant::now() < deadline, "the daemon never showed as live: {listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let host = &live["hosts"][0];
    assert_eq!(host["server"], "production", "{live}");
    assert_eq!(host["arrakisReachable"], true, "{live}");
    assert!(host["concurrency"].as_u64().unwrap() >= 1, "{live}");

    let served = api.submit_op("stop_vm", json!({"vmName": "nobody-1", "targetServer": "production"})).await.unwrap();
    assert!(served.warnings.is_empty(), "{:?}", served.warnings);
    let unserved = api.submit_op("stop_vm", json!({"vmName": "nobody-2", "targetServer": "elsewhere"})).await.unwrap();
    assert_eq!(unserved.status, TaskStatus::Pending, "queued regardless");
    assert!(
        unserved.warnings.iter().any(|w| w.contains("\"elsewhere\"") && w.contains("MAX_QUEUED_SECONDS")),
        "{:?}",
        unserved.warnings
    );

    stack.terminate_daemon().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = hosts(api.clone()).await;
        if listed["hosts"][0]["live"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "the stopped daemon still shows as live: {listed}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = api.submit_op("stop_vm", json!({"vmName": "nobody-3", "targetServer": "production"})).await.unwrap();
    assert!(
        after.warnings.iter().any(|w| w.contains("no live host serves server \"production\"")),
        "{:?}",
        after.warnings
    );
    stack.shutdown().await.unwrap();
}
