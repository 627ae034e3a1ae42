//! Finding things: `GET /vm/tasks` filters and `GET /vms`, over the in-memory ports with
//! production KV limits (every request is one invocation of at most 1,000 operations).

mod common;

use std::collections::BTreeSet;

use common::*;
use futures::executor::block_on;
use serde_json::{json, Value};
use uuid::Uuid;
use vm_task_edge::{http::Request, KvStore};
use vm_task_types::{OperationKind, TaskStatus, TaskSummary, Timestamp};

fn get(edge: &Edge, path: &str) -> (u16, Value) {
    let r = edge.api_call(Request::new("GET", path).bearer(CLIENT));
    (r.status, r.json_body().unwrap_or(Value::Null))
}

/// Every page of a listing from `path` (which has a `?`), following cursors; the answers and
/// the most KV operations one page cost.
fn all_pages(edge: &Edge, path: &str) -> (Vec<Value>, u64) {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    let mut most_ops = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_owned(),
        };
        let (status, page) = get(edge, &url);
        assert_eq!(status, 200, "{page}");
        most_ops = most_ops.max(edge.invocation.ops());
        cursor = page["cursor"].as_str().map(str::to_owned);
        assert_eq!(page["listComplete"], json!(cursor.is_none()));
        pages.push(page);
        if cursor.is_none() {
            return (pages, most_ops);
        }
        assert!(pages.len() < 1_000, "the listing never ends");
    }
}

fn ids(pages: &[Value], field: &str) -> Vec<String> {
    pages
        .iter()
        .flat_map(|p| p[field].as_array().unwrap().clone())
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Finishes a claimed task as the daemon would.
fn complete(edge: &Edge, id: Uuid, result: Value) {
    let claim = edge.claimed(id).claim_id;
    edge.clock.advance_ms(1_100);
    let r = edge.report(id, claim, json!({"status": "completed", "result": result}));
    assert_eq!(r.status, 200, "{}", body_text(&r));
}

#[test]
fn task_filters_return_exactly_the_matching_tasks_across_pages() {
    let edge = Edge::new();
    let mut submitted = Vec::new();
    for i in 0..12 {
        let server = if i % 3 == 0 { "staging" } else { "production" };
        let vm = format!("vm-{}", i % 4);
        let body = if i % 2 == 0 {
            launch(&vm, server)
        } else {
            json!({"type": "stop_vm", "payload": {"vmName": vm, "targetServer": server}})
        };
        submitted.push((edge.submit(body), i));
        edge.clock.advance_ms(1_100);
    }
    edge.deliver();
    let failed = submitted[5].0;
    let claim = edge.claimed(failed).claim_id;
    edge.clock.advance_ms(1_100);
    assert_eq!(edge.report(failed, claim, json!({"status": "failed", "error": "boom"})).status, 200);

    let all: Vec<TaskSummary> = all_pages(&edge, "/vm/tasks?limit=1000").0[0]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| serde_json::from_value(t.clone()).unwrap())
        .collect();
    assert_eq!(all.len(), 12);
    let expect = |f: &dyn Fn(&TaskSummary) -> bool| -> Vec<String> {
        all.iter().filter(|t| f(t)).map(|t| t.id.to_string()).collect()
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("status=failed", expect(&|t| t.status == TaskStatus::Failed)),
        ("status=pending", expect(&|t| t.status == TaskStatus::Pending)),
        ("type=stop_vm", expect(&|t| t.kind == OperationKind::StopVm)),
        ("vmName=vm-1", expect(&|t| t.vm_name == "vm-1")),
        ("targetServer=staging", expect(&|t| t.target_server == "staging")),
        (
            "type=launch_vm&targetServer=production&vmName=vm-2",
            expect(&|t| t.kind == OperationKind::LaunchVm && t.target_server == "production" && t.vm_name == "vm-2"),
        ),
        ("vmName=nobody", Vec::new()),
    ];
    for (query, expected) in cases {
        let (pages, most_ops) = all_pages(&edge, &format!("/vm/tasks?limit=2&{query}"));
        let found = ids(&pages, "tasks");
        assert_eq!(found, expected, "{query}: newest first, each once");
        assert!(pages.iter().all(|p| p["count"].as_u64().unwrap() <= 2), "{query}");
        assert!(pages.iter().all(|p| p["partial"].is_null()), "{query}: small listings are never partial");
        assert!(most_ops <= 3, "{query}: a page costs a list and the cursor key, not reads: {most_ops}");
    }
    assert_eq!(ids(&all_pages(&edge, "/vm/tasks?status=failed").0, "tasks"), [failed.to_string()]);
}

#[test]
fn a_filter_that_matches_nothing_in_100_000_tasks_answers_partial_pages_within_the_budget() {
    let edge = Edge::new();
    // Written straight into KV (as 100,000 POSTs would leave them), newest first by key.
    let base = START_MS - 200_000_000;
    for i in 0..100_000u64 {
        if i % 900 == 0 {
            edge.invocation.begin();
        }
        let created = Timestamp(base + i);
        let id = uuid::Builder::from_unix_timestamp_millis(created.0, &[(i % 251) as u8; 10]).into_uuid();
        let summary = TaskSummary {
            id,
            kind: OperationKind::RunCommand,
            vm_name: "busy".into(),
            status: TaskStatus::Completed,
            target_server: "production".into(),
            created_at: created,
            updated_at: created,
            lease_expires_at: None,
        };
        let key = format!("task:{:012x}:{id}", 0xFFFF_FFFF_FFFFu64 - created.0);
        block_on(edge.tasks.put(&key, "{}", Some(&serde_json::to_value(&summary).unwrap()))).unwrap();
    }
    let (pages, most_ops) = all_pages(&edge, "/vm/tasks?status=failed");
    assert!(most_ops <= 8, "one page costs at most a few list operations: {most_ops}");
    assert_eq!(pages.len(), 20, "5,000 keys per page");
    for page in &pages[..19] {
        assert_eq!(page["partial"], true, "{page}");
        assert_eq!(page["count"], 0);
        assert_eq!(page["scanned"], 5_000);
    }
    let last = &pages[19];
    assert!(last["partial"].is_null() && last["listComplete"] == true, "{last}");
}

#[test]
fn bad_filters_and_limits_are_400s_naming_the_parameter() {
    let edge = Edge::new();
    for (path, field) in [
        ("/vm/tasks?status=done", "status"),
        ("/vm/tasks?type=reboot_vm", "type"),
        ("/vm/tasks?vmName=a:b", "vmName"),
        // An empty filter is refused, as the OpenAPI document says: leave it out to match all.
        ("/vm/tasks?targetServer=", "targetServer"),
        ("/vm/tasks?status=", "status"),
        ("/vms?server=", "server"),
        ("/vm/tasks?targetServer=x%2Fy", "targetServer"),
        ("/vms?state=exploded", "state"),
        ("/vms?server=a:b", "server"),
        ("/vms?limit=0", "limit"),
        ("/vms?limit=201", "limit"),
        ("/vms?cursor=forged", "cursor"),
    ] {
        let (status, body) = get(&edge, path);
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["field"], field, "{path}: {body}");
    }
}

#[test]
fn vms_lists_the_registry_with_state_ip_and_filters() {
    let edge = Edge::new();
    let a = edge.submit(launch("alpha", "production"));
    let b = edge.submit(launch("beta", "production"));
    let c = edge.submit(launch("gamma", "staging"));
    edge.deliver();
    complete(&edge, a, json!({"ip": "10.0.0.2", "vmState": "RUNNING"}));
    complete(&edge, c, json!({"ip": "10.0.0.4"}));
    edge.clock.advance_ms(1_100);
    let stop = edge.submit(op("stop_vm", "gamma"));
    edge.deliver();
    complete(&edge, stop, json!({}));

    let (status, page) = get(&edge, "/vms");
    assert_eq!(status, 200, "{page}");
    let names: Vec<&str> = page["vms"].as_array().unwrap().iter().map(|v| v["vmName"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma"]);
    let alpha = &page["vms"][0];
    assert_eq!(
        (alpha["server"].as_str(), alpha["state"].as_str(), alpha["ip"].as_str()),
        (Some("production"), Some("RUNNING"), Some("10.0.0.2"))
    );
    assert_eq!(alpha["lastTaskId"], json!(a));
    assert_eq!(alpha["lastTaskType"], "launch_vm");
    assert!(page["vms"][1]["state"].is_null(), "beta's launch has not finished: {}", page["vms"][1]);
    let gamma = &page["vms"][2];
    assert_eq!((gamma["state"].as_str(), gamma["ip"].as_str()), (Some("STOPPED"), Some("10.0.0.4")), "{gamma}");
    assert_eq!(gamma["lastTaskId"], json!(stop));
    assert!(page["vms"].as_array().unwrap().iter().all(|v| v["settled"] == true));

    let names_of = |path: &str| -> Vec<String> {
        let (pages, _) = all_pages(&edge, path);
        pages
            .iter()
            .flat_map(|p| p["vms"].as_array().unwrap().clone())
            .map(|v| v["vmName"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names_of("/vms?server=production&limit=1"), ["alpha", "beta"]);
    assert_eq!(names_of("/vms?state=stopped"), ["gamma"]);
    assert_eq!(names_of("/vms?state=RUNNING&server=production"), ["alpha"]);
    assert!(names_of("/vms?server=nowhere").is_empty());
    let _ = b;
}

#[test]
fn a_page_of_200_unsettled_vms_stays_within_1000_operations_and_says_which_it_did_not_settle() {
    let edge = Edge::new();
    let mut launches = Vec::new();
    for i in 0..200 {
        launches.push(edge.submit(launch(&format!("vm-{i:03}"), "production")));
    }
    for _ in 0..2 {
        edge.clock.advance_ms(1_100);
        for i in 0..200 {
            edge.submit(op("stop_vm", &format!("vm-{i:03}")));
        }
    }
    let (status, page) = get(&edge, "/vms?limit=200");
    assert_eq!(status, 200, "{page}");
    assert!(edge.invocation.ops() <= 1_000, "{}", edge.invocation.ops());
    let vms = page["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 200);
    let settled = vms.iter().filter(|v| v["settled"] == true).count();
    assert!((90..200).contains(&settled), "about 400 reads' worth settled: {settled}");
    assert!(vms.iter().filter(|v| v["settled"] == false).all(|v| v["unsettled"] == 3));
    let names: BTreeSet<&str> = vms.iter().map(|v| v["vmName"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 200);
}
