//! End-to-end tests of the two workers under `wrangler dev`, without the daemon: each test
//! plays the daemon itself through the consumer API, so a failure points at the workers.
//!
//! Run with `cargo xtask e2e` (or `cargo test --release -p stack --test e2e -- --ignored
//! edge::`); the worker bundles must be built first.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stack::{ApiClient, Method, StackOptions, StatusCode};
use uuid::Uuid;
use vm_task_types::{
    wire::{CreateTaskResponse, ReadyTasksResponse},
    OperationKind, PortForward, TaskResult, TaskStatus, VmState,
};

use crate::support::start;

const SERVER: &str = "production";
const CONSUMER: &str = "e2e-daemon";

/// Submits `{"type": kind, "payload": payload}`, asserting the 202 and the echoed fields.
async fn submit(api: &ApiClient, kind: &str, payload: Value) -> CreateTaskResponse {
    let body = json!({ "type": kind, "payload": payload });
    let bearer = api.client_bearer();
    let (status, reply) = api
        .submit_raw(Method::POST, "/vm/tasks", &[("authorization", &bearer)], Some(&body))
        .await
        .expect("POST /vm/tasks answers");
    assert_eq!(status, StatusCode::ACCEPTED, "{kind}: {reply}");
    let created: CreateTaskResponse = serde_json::from_value(reply).expect("a CreateTaskResponse");
    assert!(created.success);
    assert_eq!(created.status, TaskStatus::Pending);
    assert_eq!(created.kind.as_str(), kind);
    created
}

/// Polls the ready list until every task in `ids` is buffered (queue → buffer takes ~1 s).
async fn wait_buffered(api: &ApiClient, ids: &[Uuid]) -> ReadyTasksResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = api.ready(SERVER).await.expect("GET /consumer/tasks/ready");
        let listed: Vec<Uuid> = ready.tasks.iter().map(|t| t.task_id).collect();
        if ids.iter().all(|id| listed.contains(id)) {
            return ready;
        }
        assert!(Instant::now() < deadline, "tasks {ids:?} were not all buffered within 30 s; ready: {listed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ready_ids(ready: &ReadyTasksResponse) -> Vec<Uuid> {
    ready.tasks.iter().map(|t| t.task_id).collect()
}

fn events(task: &vm_task_types::Task) -> Vec<&str> {
    task.timeline.iter().map(|e| e.event.as_str()).collect()
}

fn state(vm_state: VmState) -> TaskResult {
    TaskResult { vm_state: Some(vm_state), ..TaskResult::default() }
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn every_operation_round_trips_through_both_workers() {
    let stack = start(StackOptions::edge_only()).await;
    let api = stack.client();
    let vm = "test-vm-001";

    // The seed's launch names the server; every later operation is routed by the registry.
    let mut created = vec![
        submit(&api, "launch_vm", json!({"vmName": vm, "vmConfig": {"memory": "2G"}, "targetServer": SERVER})).await,
    ];
    let later = [
        ("run_command", json!({"vmName": vm, "command": "echo hello"})),
        ("snapshot_vm", json!({"vmName": vm})),
        ("pause_vm", json!({"vmName": vm})),
        ("resume_vm", json!({"vmName": vm})),
        ("stop_vm", json!({"vmName": vm})),
        ("delete_vm", json!({"vmName": vm})),
    ];
    for (kind, payload) in later {
        created.push(submit(&api, kind, payload).await);
    }
    for task in &created {
        assert_eq!(task.target_server, SERVER, "{:?} was not routed to {SERVER}", task.kind);
        assert_eq!(task.vm_name, vm);
    }
    let ids: Vec<Uuid> = created.iter().map(|c| c.task_id).collect();

    // Buffered in submission order, each pointing at the task submitted before it on the VM.
    let ready = wait_buffered(&api, &ids).await;
    assert_eq!(ready_ids(&ready), ids, "the ready list is not in submission order");
    assert_eq!(ready.count, ids.len());
    assert!(!ready.bell.is_empty());
    assert_eq!(ready.tasks[0].previous_task_id, None);
    for pair in ready.tasks.windows(2) {
        assert_eq!(pair[1].previous_task_id, Some(pair[0].task_id), "{:?}", pair[1].kind);
    }
    let detail = api.task(ids[2]).await.unwrap();
    assert!(
        matches!(&detail.operation, vm_task_types::Operation::SnapshotVm(s) if s.snapshot_id.as_deref().is_some_and(|id| id.starts_with(vm))),
        "snapshot_vm got no generated snapshotId: {:?}",
        detail.operation
    );

    let failing = OperationKind::SnapshotVm;
    let failure = "snapshot failed: no space left on device";
    let launched = TaskResult {
        vm_state: Some(VmState::Running),
        ip: Some("10.20.1.2".into()),
        tap_device_name: Some("tap0".into()),
        port_forwards: Some(vec![PortForward { host_port: 3000, guest_port: 22, description: "ssh".into() }]),
        ..TaskResult::default()
    };
    for created in &created {
        let id = created.task_id;
        let claim = api.claim(id, CONSUMER, Some(60)).await.unwrap_or_else(|e| panic!("claim {:?}: {e}", created.kind));
        assert_eq!(claim.task.id, id);
        assert_eq!(claim.task.status, TaskStatus::Processing);
        assert_eq!(claim.task.attempts, 1);
        assert_eq!(claim.task.claim.as_ref().map(|c| c.consumer_id.as_str()), Some(CONSUMER));
        assert!(claim.lease_expires_at > claim.task.created_at);
        // A second claim while the lease runs is refused and names the lease.
        let err = api.claim(id, "someone-else", Some(60)).await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::CONFLICT), "{err}");

        let progress = api.report(id, claim.claim_id, TaskStatus::Processing, None, None).await.unwrap();
        assert_eq!(progress.status, TaskStatus::Processing);
        let result = match created.kind {
            OperationKind::LaunchVm => Some(launched.clone()),
            OperationKind::RunCommand => {
                Some(TaskResult { output: Some("hello\n".into()), exit_code: Some(0), ..TaskResult::default() })
            }
            OperationKind::PauseVm => Some(state(VmState::Paused)),
            OperationKind::ResumeVm => Some(state(VmState::Running)),
            OperationKind::StopVm => Some(state(VmState::Stopped)),
            OperationKind::DeleteVm => Some(state(VmState::Deleted)),
            OperationKind::SnapshotVm | OperationKind::UploadFiles | OperationKind::DownloadFiles => None,
        };
        let done = if created.kind == failing {
            api.report(id, claim.claim_id, TaskStatus::Failed, None, Some(failure)).await.unwrap()
        } else {
            api.report(id, claim.claim_id, TaskStatus::Completed, result, None).await.unwrap()
        };
        assert!(done.status.is_terminal());
        // A repeated report (a retry after a lost response) is a no-op; a different one is
        // refused, since terminal is final.
        if created.kind == failing {
            let err = api.report(id, claim.claim_id, TaskStatus::Completed, None, None).await.unwrap_err();
            assert_eq!(err.status(), Some(StatusCode::CONFLICT), "{err}");
        } else {
            let again = api.report(id, claim.claim_id, TaskStatus::Completed, None, None).await.unwrap();
            assert_eq!(again.status, TaskStatus::Completed);
        }

        if created.kind == OperationKind::LaunchVm {
            // Later lifecycle tasks are unfinished, so the registry shows the launch's state.
            let vm_status = api.vm_status(vm).await.unwrap();
            assert_eq!(vm_status.state, Some(VmState::Running));
            assert_eq!(vm_status.ip.as_deref(), Some("10.20.1.2"));
            assert_eq!(vm_status.state_task_id, Some(id));
            assert_eq!(vm_status.last_task_id, *ids.last().unwrap());
        }
    }

    // Final statuses, one read each; `wait_terminal` returns at once for terminal tasks.
    for created in &created {
        let status = api.wait_terminal(created.task_id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(status.task_id, created.task_id);
        assert_eq!(status.attempts, 1);
        assert_eq!(status.target_server, SERVER);
        if created.kind == failing {
            assert_eq!(status.status, TaskStatus::Failed);
            assert_eq!(status.error.as_deref(), Some(failure));
        } else {
            assert_eq!(status.status, TaskStatus::Completed, "{:?}", created.kind);
            assert_eq!(status.error, None);
            assert!(status.result.is_some(), "{:?} lost its result", created.kind);
        }
    }
    let launch = api.status(ids[0]).await.unwrap();
    assert_eq!(launch.result, Some(launched));
    let run = api.task(ids[1]).await.unwrap();
    assert_eq!(run.result.as_ref().and_then(|r| r.output.as_deref()), Some("hello\n"));
    assert_eq!(events(&run), ["created", "buffered", "claimed", "completed"]);
    assert_eq!(run.claim.as_ref().map(|c| c.consumer_id.as_str()), Some(CONSUMER));

    // The list: newest first, statuses from the summaries.
    let list = api.list(None, None).await.unwrap();
    assert!(list.list_complete && list.cursor.is_none());
    let listed: Vec<(Uuid, TaskStatus)> = list.tasks.iter().map(|t| (t.id, t.status)).collect();
    let expected: Vec<(Uuid, TaskStatus)> = created
        .iter()
        .rev()
        .map(|c| (c.task_id, if c.kind == failing { TaskStatus::Failed } else { TaskStatus::Completed }))
        .collect();
    assert_eq!(listed, expected);
    // Paging: two at a time walks the same order.
    let first = api.list(Some(2), None).await.unwrap();
    assert_eq!(first.tasks.iter().map(|t| t.id).collect::<Vec<_>>(), [ids[6], ids[5]]);
    let cursor = first.cursor.expect("a cursor for the next page");
    let second = api.list(Some(2), Some(&cursor)).await.unwrap();
    assert_eq!(second.tasks.iter().map(|t| t.id).collect::<Vec<_>>(), [ids[4], ids[3]]);

    // The registry after the delete.
    let vm_status = api.vm_status(vm).await.unwrap();
    assert_eq!(vm_status.server, SERVER);
    assert_eq!(vm_status.state, Some(VmState::Deleted));
    assert_eq!(vm_status.ip, None);
    assert_eq!(vm_status.state_task_id, Some(ids[6]));
    assert_eq!(vm_status.last_task_id, ids[6]);
    assert_eq!(vm_status.last_task_status, TaskStatus::Completed);
    assert_eq!(vm_status.last_task_kind, OperationKind::DeleteVm);
    let unknown = api.vm_status("no-such-vm").await.unwrap_err();
    assert_eq!(unknown.status(), Some(StatusCode::NOT_FOUND));

    // Nothing is left buffered.
    assert!(api.ready(SERVER).await.unwrap().tasks.is_empty());
    let stats = api.consumer_stats().await.unwrap();
    assert_eq!(stats.buffered_total, Some(0), "{stats:?}");
    let api_stats = api.api_stats().await.unwrap();
    assert!(api_stats.ops.queue_sends >= 7, "{api_stats:?}");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn tokens_guard_each_side_and_health_is_open() {
    let stack = start(StackOptions::edge_only()).await;
    let api = stack.client();
    let task = submit(&api, "launch_vm", json!({"vmName": "auth-vm", "targetServer": SERVER})).await;
    let (client, consumer) = (api.client_bearer(), api.consumer_bearer());
    let report = json!({"status": "completed", "claimId": Uuid::nil()});
    let claim = json!({"consumerId": CONSUMER});
    let status_path = format!("/vm/tasks/{}/status", task.task_id);
    let claim_path = format!("/consumer/tasks/{}/claim", task.task_id);
    let task_path = format!("/vm/tasks/{}", task.task_id);
    let (status_path, claim_path, task_path) = (status_path.as_str(), claim_path.as_str(), task_path.as_str());
    let launch = json!({"type": "launch_vm", "payload": {"vmName": "auth-vm-2", "targetServer": SERVER}});
    let (client, consumer) = (client.as_str(), consumer.as_str());

    // (method, path, Authorization header, body, expected status)
    type Case<'a> = (Method, &'a str, Option<&'a str>, Option<&'a Value>, StatusCode);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        // Open.
        (Method::GET, "/health", None, None, StatusCode::OK),
        (Method::GET, "/consumer/health", None, None, StatusCode::OK),
        // Status reports need the consumer token.
        (Method::PUT, status_path, None, Some(&report), StatusCode::UNAUTHORIZED),
        (Method::PUT, status_path, Some(client), Some(&report), StatusCode::UNAUTHORIZED),
        (Method::PUT, status_path, Some("Bearer wrong"), Some(&report), StatusCode::UNAUTHORIZED),
        // Consumer routes refuse the client token and anonymous callers.
        (Method::GET, "/consumer/tasks/ready?server=production", Some(client), None, StatusCode::UNAUTHORIZED),
        (Method::GET, "/consumer/tasks/ready?server=production", None, None, StatusCode::UNAUTHORIZED),
        (Method::POST, claim_path, Some(client), Some(&claim), StatusCode::UNAUTHORIZED),
        (Method::GET, "/consumer/stats", Some(client), None, StatusCode::UNAUTHORIZED),
        // Client routes refuse the consumer token and anonymous callers.
        (Method::POST, "/vm/tasks", Some(consumer), Some(&launch), StatusCode::UNAUTHORIZED),
        (Method::GET, "/vm/tasks", Some(consumer), None, StatusCode::UNAUTHORIZED),
        (Method::DELETE, task_path, Some(consumer), None, StatusCode::UNAUTHORIZED),
        (Method::GET, status_path, None, None, StatusCode::UNAUTHORIZED),
        (Method::GET, "/vm/tasks", None, None, StatusCode::UNAUTHORIZED),
        // Except the status read, which daemons use to check a task's predecessor.
        (Method::GET, status_path, Some(consumer), None, StatusCode::OK),
        // And each token works on its own side.
        (Method::GET, status_path, Some(client), None, StatusCode::OK),
        (Method::GET, "/consumer/tasks/ready?server=production", Some(consumer), None, StatusCode::OK),
    ];
    for (method, path, bearer, body, expected) in cases {
        let headers: Vec<(&str, &str)> = bearer.map(|b| ("authorization", b)).into_iter().collect();
        let (status, reply) = api.submit_raw(method.clone(), path, &headers, body).await.unwrap();
        assert_eq!(status, expected, "{method} {path} with {bearer:?}: {reply}");
        if expected == StatusCode::UNAUTHORIZED {
            assert_eq!(reply["success"], false, "{reply}");
            assert_eq!(reply["code"], "unauthorized", "{reply}");
        }
    }
    let health = api.health().await.unwrap();
    assert_eq!((health.status.as_str(), health.worker.as_str()), ("healthy", "vm-api-worker"));
    assert_eq!(api.consumer_health().await.unwrap().worker, "vm-consumer-worker");
    // The refused report changed nothing.
    assert_eq!(api.status(task.task_id).await.unwrap().status, TaskStatus::Pending);
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_cancelled_buffered_task_cannot_be_claimed() {
    let stack = start(StackOptions::edge_only()).await;
    let api = stack.client();
    let doomed = submit(&api, "launch_vm", json!({"vmName": "cancel-vm", "targetServer": SERVER})).await;
    let other = submit(&api, "launch_vm", json!({"vmName": "other-vm", "targetServer": SERVER})).await;
    wait_buffered(&api, &[doomed.task_id, other.task_id]).await;

    let cancelled = api.cancel(doomed.task_id).await.unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    let status = api.status(doomed.task_id).await.unwrap();
    assert_eq!(status.status, TaskStatus::Cancelled);
    assert!(status.error.is_some(), "a cancelled task says why");
    // Cancelling again is a no-op, not an error.
    assert_eq!(api.cancel(doomed.task_id).await.unwrap().status, TaskStatus::Cancelled);

    let err = api.claim(doomed.task_id, CONSUMER, Some(60)).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT), "{err}");
    assert_eq!(err.body().unwrap()["currentStatus"], "cancelled", "{err}");
    let ready = api.ready(SERVER).await.unwrap();
    assert_eq!(ready_ids(&ready), [other.task_id], "the cancelled task is still listed");
    assert_eq!(api.status(doomed.task_id).await.unwrap().attempts, 0);

    // A task that is already running cannot be cancelled.
    api.claim(other.task_id, CONSUMER, Some(60)).await.unwrap();
    let err = api.cancel(other.task_id).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT), "{err}");
    assert_eq!(err.body().unwrap()["currentStatus"], "processing", "{err}");
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn an_expired_lease_returns_the_task_to_pending_via_the_cron() {
    let stack = start(StackOptions::edge_only()).await;
    let api = stack.client();
    let task = submit(&api, "launch_vm", json!({"vmName": "lease-vm", "targetServer": SERVER})).await;
    wait_buffered(&api, &[task.task_id]).await;

    let first = api.claim(task.task_id, CONSUMER, Some(2)).await.unwrap();
    assert_eq!(first.lease_expires_at.millis_since(first.task.updated_at), 2_000);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.sweep_now().await.unwrap();

    let detail = api.task(task.task_id).await.unwrap();
    assert_eq!(detail.status, TaskStatus::Pending);
    assert_eq!(detail.attempts, 1);
    assert_eq!(detail.claim, None);
    let expiry = detail.timeline.iter().find(|e| e.event == "lease_expired").expect("a lease_expired event");
    assert_eq!(expiry.actor, "sweeper");
    assert_eq!((expiry.from, expiry.to), (Some(TaskStatus::Processing), Some(TaskStatus::Pending)));
    assert_eq!(ready_ids(&api.ready(SERVER).await.unwrap()), [task.task_id], "the task is claimable again");

    // The old claim can no longer report; a new claim is attempt 2 and can.
    let err = api.report(task.task_id, first.claim_id, TaskStatus::Completed, None, None).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT), "{err}");
    let second = api.claim(task.task_id, CONSUMER, Some(60)).await.unwrap();
    assert_eq!(second.task.attempts, 2);
    api.report(task.task_id, second.claim_id, TaskStatus::Completed, Some(state(VmState::Running)), None)
        .await
        .unwrap();
    let done = api.wait_terminal(task.task_id, Duration::from_secs(5)).await.unwrap();
    assert_eq!((done.status, done.attempts), (TaskStatus::Completed, 2));
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn the_last_expired_lease_fails_the_task() {
    // MAX_ATTEMPTS=1: the first expiry is final. The cron ticker stands in for the real cron.
    let stack =
        start(StackOptions::edge_only().worker_var("MAX_ATTEMPTS", 1).cron_every(Duration::from_millis(500))).await;
    let api = stack.client();
    let task = submit(&api, "launch_vm", json!({"vmName": "doomed-vm", "targetServer": SERVER})).await;
    wait_buffered(&api, &[task.task_id]).await;
    api.claim(task.task_id, CONSUMER, Some(2)).await.unwrap();

    // The ticker sweeps on its own; the long poll returns once the task fails.
    let failed = api.wait_terminal(task.task_id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert_eq!(failed.attempts, 1);
    let reason = failed.error.expect("a failure reason");
    assert!(reason.contains("1 attempts"), "{reason}");
    let detail = api.task(task.task_id).await.unwrap();
    let tail: Vec<&str> = events(&detail).into_iter().rev().take(2).collect();
    assert_eq!(tail, ["attempts_exhausted", "lease_expired"]);
    assert!(api.ready(SERVER).await.unwrap().tasks.is_empty());
    assert_eq!(api.consumer_stats().await.unwrap().buffered_total, Some(0));
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn tasks_survive_a_wrangler_restart() {
    let mut stack = start(StackOptions::edge_only()).await;
    let api = stack.client();
    let waiting = submit(&api, "launch_vm", json!({"vmName": "persist-vm", "targetServer": SERVER})).await;
    let finished = submit(&api, "launch_vm", json!({"vmName": "done-vm", "targetServer": SERVER})).await;
    wait_buffered(&api, &[waiting.task_id, finished.task_id]).await;
    let claim = api.claim(finished.task_id, CONSUMER, Some(60)).await.unwrap();
    api.report(finished.task_id, claim.claim_id, TaskStatus::Completed, Some(state(VmState::Running)), None)
        .await
        .unwrap();

    stack.restart_wrangler().await.expect("wrangler restarts");

    let status = api.status(waiting.task_id).await.unwrap();
    assert_eq!((status.status, status.attempts), (TaskStatus::Pending, 0));
    assert_eq!(ready_ids(&api.ready(SERVER).await.unwrap()), [waiting.task_id], "the buffer did not survive");
    assert_eq!(api.status(finished.task_id).await.unwrap().status, TaskStatus::Completed);
    assert_eq!(api.vm_status("done-vm").await.unwrap().state, Some(VmState::Running));
    let listed: Vec<Uuid> = api.list(None, None).await.unwrap().tasks.iter().map(|t| t.id).collect();
    assert_eq!(listed, [finished.task_id, waiting.task_id]);

    // The restarted session still queues, buffers and claims.
    let fresh = submit(&api, "stop_vm", json!({"vmName": "persist-vm"})).await;
    let ready = wait_buffered(&api, &[fresh.task_id]).await;
    assert_eq!(ready_ids(&ready), [waiting.task_id, fresh.task_id]);
    assert_eq!(ready.tasks[1].previous_task_id, Some(waiting.task_id));
    let claim = api.claim(waiting.task_id, CONSUMER, Some(60)).await.unwrap();
    assert_eq!(claim.task.attempts, 1);
}
