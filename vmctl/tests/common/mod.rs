//! An in-process fake of the API worker for driving the `vmctl` binary: the same wire types
//! as the real one, tasks that move one step per read, and outcomes chosen by the VM's name.
//!
//! - `stuck-*`: never leaves `pending` (no host serves it).
//! - `busy-*`: reaches `processing` and stays; cancelling it is a 409.
//! - `long-*`: like `busy-*`, but cancelling it is a 202 (cancel requested).
//! - `broken-*`: fails with `arrakis: boot failed`.
//! - anything else completes; `run_command` reports `exit N` commands' code N.

#![allow(dead_code)] // Each test file uses a different subset.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::Output,
    sync::{Arc, Mutex},
};

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};
use uuid::Uuid;
use vm_task_types::{
    wire::{
        CreateTaskResponse, ErrorBody, ListTasksResponse, TaskDetailResponse, TaskStatusResponse, UpdateStatusResponse,
        VmStatusResponse,
    },
    Operation, OperationKind, PortForward, Task, TaskResult, TaskStatus, TimelineEvent, Timestamp, VmState,
};

pub const TOKEN: &str = "fake-token";

#[derive(Debug, Default)]
pub struct FakeState {
    pub tasks: Vec<Task>,
    /// The query string of every `GET /vm/tasks`, in order.
    pub list_queries: Vec<HashMap<String, String>>,
    /// Every body `POST /vm/tasks` received.
    pub submitted: Vec<Value>,
    /// The `Idempotency-Key` of every `POST /vm/tasks`, failed ones included.
    pub idempotency_keys: Vec<String>,
    /// Answer this many of the next submissions, then of the next status reads, with a 503.
    pub fail_next_posts: usize,
    pub fail_next_reads: usize,
    clock: u64,
}

impl FakeState {
    fn tick(&mut self, ms: u64) -> Timestamp {
        self.clock += ms;
        Timestamp(1_795_000_000_000 + self.clock)
    }
}

#[derive(Debug, Clone)]
pub struct FakeApi {
    pub url: String,
    pub state: Arc<Mutex<FakeState>>,
}

impl FakeApi {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = Router::new()
            .route("/vm/tasks", get(list).post(create))
            .route("/vm/tasks/{id}", get(detail).delete(cancel))
            .route("/vm/tasks/{id}/status", get(status))
            .route("/vm/{name}/status", get(vm_status))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        // Nagle plus delayed ACK would stall each small answer by 40 ms on loopback.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, state }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// Runs `vmctl` with the fake's URL and token (and `args`) in an empty directory.
    pub async fn vmctl(&self, args: &[&str]) -> Run {
        Vmctl::new().env("API_URL", &self.url).env("API_TOKEN", TOKEN).run(args).await
    }
}

/// A `vmctl` invocation with a clean environment and its own working directory.
#[derive(Debug)]
pub struct Vmctl {
    env: Vec<(String, String)>,
    pub dir: PathBuf,
}

impl Vmctl {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("vmctl-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { env: Vec::new(), dir }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn file(self, name: &str, text: &str) -> Self {
        std::fs::write(self.dir.join(name), text).unwrap();
        self
    }

    pub async fn run(&self, args: &[&str]) -> Run {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmctl"))
            .args(args)
            .env_clear()
            .envs(self.env.iter().cloned())
            .current_dir(&self.dir)
            .output()
            .await
            .expect("vmctl runs");
        let _ = std::fs::remove_dir_all(&self.dir);
        Run::from(output)
    }
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

type Shared = State<Arc<Mutex<FakeState>>>;

fn error(status: StatusCode, message: String, field: Option<&str>, current: Option<TaskStatus>) -> Response {
    let body = ErrorBody {
        success: false,
        error: message,
        code: "fake".into(),
        field: field.map(str::to_owned),
        current_status: current,
        lease_expires_at: None,
    };
    (status, Json(body)).into_response()
}

fn authorized(headers: &HeaderMap) -> Result<(), Response> {
    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(value) if value == format!("Bearer {TOKEN}") => Ok(()),
        _ => Err(error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token".into(), None, None)),
    }
}

async fn create(State(state): Shared, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(denied) = authorized(&headers) {
        return denied;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    {
        let mut state = state.lock().unwrap();
        state.idempotency_keys.extend(key.clone());
        if state.fail_next_posts > 0 {
            state.fail_next_posts -= 1;
            return error(StatusCode::SERVICE_UNAVAILABLE, "injected: KV unavailable".into(), None, None);
        }
    }
    let operation = match Operation::parse(&body) {
        Ok(op) => op,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{}: {}", e.field, e.message), Some(&e.field), None),
    };
    let mut state = state.lock().unwrap();
    state.submitted.push(body);
    let now = state.tick(1);
    let target_server = operation.requested_server().unwrap_or("production").to_owned();
    let mut task = Task {
        id: Uuid::now_v7(),
        operation,
        status: TaskStatus::Pending,
        target_server,
        previous_task_id: None,
        created_at: now,
        updated_at: now,
        attempts: 0,
        claim: None,
        result: None,
        error: None,
        callback_url: None,
        gen: 0,
        timeline: Vec::new(),
    };
    task.record(now, "api", TimelineEvent::Created, None, format!("queued for server {}", task.target_server));
    let response = CreateTaskResponse {
        success: true,
        task_id: task.id,
        status: task.status,
        message: format!("{} task queued successfully", task.kind().describe()),
        kind: task.kind(),
        vm_name: task.vm_name().to_owned(),
        target_server: task.target_server.clone(),
        created_at: task.created_at,
        warnings: Vec::new(),
    };
    state.tasks.push(task);
    (StatusCode::ACCEPTED, Json(response)).into_response()
}

/// One step of a task's life, as a host would make it.
fn advance(state: &mut FakeState, index: usize) {
    let name = state.tasks[index].vm_name().to_owned();
    let status = state.tasks[index].status;
    if name.starts_with("stuck") || status.is_terminal() {
        return;
    }
    let now = state.tick(250);
    let task = &mut state.tasks[index];
    match status {
        TaskStatus::Pending => {
            task.record(now, "consumer-worker", TimelineEvent::Buffered, None, "");
            task.attempts += 1;
            task.record(
                now.plus_millis(40),
                "host-a",
                TimelineEvent::Claimed,
                Some(TaskStatus::Processing),
                "attempt 1",
            );
        }
        _ if name.starts_with("busy") || name.starts_with("long") => {}
        _ if name.starts_with("broken") => {
            task.error = Some("arrakis: boot failed: no kernel".into());
            task.record(
                now,
                "host-a",
                TimelineEvent::Failed,
                Some(TaskStatus::Failed),
                "arrakis: boot failed: no kernel",
            );
        }
        _ => {
            task.result = Some(outcome(&task.operation));
            task.record(now, "host-a", TimelineEvent::Completed, Some(TaskStatus::Completed), "");
        }
    }
}

fn outcome(operation: &Operation) -> TaskResult {
    let state = |s| TaskResult { vm_state: Some(s), ..Default::default() };
    match operation {
        Operation::LaunchVm(_) | Operation::ResumeVm(_) => TaskResult {
            vm_state: Some(VmState::Running),
            ip: Some("10.20.1.2".into()),
            tap_device_name: Some("tap0".into()),
            port_forwards: Some(vec![PortForward { host_port: 3000, guest_port: 5901, description: "gui".into() }]),
            ..Default::default()
        },
        Operation::StopVm(_) => state(VmState::Stopped),
        Operation::PauseVm(_) => state(VmState::Paused),
        Operation::DeleteVm(_) => state(VmState::Deleted),
        Operation::SnapshotVm(p) => TaskResult { snapshot_id: p.snapshot_id.clone(), ..state(VmState::Running) },
        Operation::UploadFiles(_) => state(VmState::Running),
        Operation::DownloadFiles(p) => TaskResult {
            files: Some(
                p.paths
                    .iter()
                    .map(|path| vm_task_types::FileContent {
                        path: path.clone(),
                        content: format!("content of {path}\n"),
                    })
                    .collect(),
            ),
            ..state(VmState::Running)
        },
        Operation::RunCommand(p) => {
            let code = p.command.strip_prefix("exit ").and_then(|n| n.trim().parse().ok()).unwrap_or(0);
            TaskResult {
                vm_state: Some(VmState::Running),
                output: Some(format!("ran: {}\n", p.command)),
                error: (code != 0).then(|| format!("exit status {code}")),
                exit_code: Some(code),
                ..Default::default()
            }
        }
    }
}

/// A short stand-in for `?wait=`: an unfinished task's answer is held a moment, as the real
/// API holds it until the task finishes or the wait ends.
async fn long_poll_pause(query: &HashMap<String, String>, finished: bool) {
    let wait: u64 = query.get("wait").and_then(|w| w.parse().ok()).unwrap_or(0);
    if wait > 0 && !finished {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn find(state: &FakeState, raw: &str) -> Result<usize, Response> {
    let id: Uuid =
        raw.parse().map_err(|_| error(StatusCode::BAD_REQUEST, "id: not a UUID".into(), Some("id"), None))?;
    state
        .tasks
        .iter()
        .position(|t| t.id == id)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("task {id} not found"), None, None))
}

async fn status(
    State(state): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(denied) = authorized(&headers) {
        return denied;
    }
    let (response, finished) = {
        let mut state = state.lock().unwrap();
        if state.fail_next_reads > 0 {
            state.fail_next_reads -= 1;
            return error(StatusCode::BAD_GATEWAY, "injected: bad gateway".into(), None, None);
        }
        let index = match find(&state, &id) {
            Ok(i) => i,
            Err(e) => return e,
        };
        advance(&mut state, index);
        (Json(TaskStatusResponse::of(&state.tasks[index])).into_response(), state.tasks[index].status.is_terminal())
    };
    long_poll_pause(&query, finished).await;
    response
}

async fn detail(
    State(state): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(denied) = authorized(&headers) {
        return denied;
    }
    let (response, finished) = {
        let mut state = state.lock().unwrap();
        let index = match find(&state, &id) {
            Ok(i) => i,
            Err(e) => return e,
        };
        advance(&mut state, index);
        (
            Json(TaskDetailResponse { success: true, task: state.tasks[index].clone() }).into_response(),
            state.tasks[index].status.is_terminal(),
        )
    };
    long_poll_pause(&query, finished).await;
    response
}

async fn cancel(State(state): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(denied) = authorized(&headers) {
        return denied;
    }
    let mut state = state.lock().unwrap();
    let index = match find(&state, &id) {
        Ok(i) => i,
        Err(e) => return e,
    };
    let now = state.tick(1);
    let task = &mut state.tasks[index];
    let answer = |task: &Task, message: &str| UpdateStatusResponse {
        success: true,
        task_id: task.id,
        status: task.status,
        message: message.into(),
    };
    match task.status {
        TaskStatus::Pending => {
            task.record(now, "client", TimelineEvent::Cancelled, Some(TaskStatus::Cancelled), "cancelled by client");
            task.error = Some("cancelled by client".into());
            Json(answer(task, "task cancelled")).into_response()
        }
        // The API's 202 when a claim is in flight: `status` is `cancel_requested`.
        TaskStatus::Processing if task.vm_name().starts_with("long") => (
            StatusCode::ACCEPTED,
            Json(json!({"success": true, "taskId": task.id, "status": "cancel_requested",
                        "message": "a daemon is claiming the task; read the task for the outcome"})),
        )
            .into_response(),
        other => error(
            StatusCode::CONFLICT,
            format!("task {} is {other}; only a pending task can be cancelled", task.id),
            None,
            Some(other),
        ),
    }
}

async fn list(State(state): Shared, headers: HeaderMap, Query(query): Query<HashMap<String, String>>) -> Response {
    if let Err(denied) = authorized(&headers) {
        return denied;
    }
    let mut state = state.lock().unwrap();
    state.list_queries.push(query.clone());
    let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(50);
    let offset: usize = query.get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
    // Filters as the API applies them.
    let wanted = |field: &str, value: &str| query.get(field).is_none_or(|w| w == value);
    let newest_first: Vec<_> = state
        .tasks
        .iter()
        .rev()
        .map(Task::summary)
        .filter(|t| {
            wanted("status", t.status.as_str())
                && wanted("type", t.kind.as_str())
                && wanted("vmName", &t.vm_name)
                && wanted("targetServer", &t.target_server)
        })
        .collect();
    let page: Vec<_> = newest_first.iter().skip(offset).take(limit).cloned().collect();
    let cursor = (offset + limit < newest_first.len()).then(|| (offset + limit).to_string());
    Json(ListTasksResponse {
        success: true,
        count: page.len(),
        tasks: page,
        list_complete: cursor.is_none(),
        cursor,
        partial: false,
        scanned: None,
    })
    .into_response()
}

async fn vm_status(State(state): Shared, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Err(denied) = authorized(&headers) {
        return denied;
    }
    let state = state.lock().unwrap();
    let Some(last) = state.tasks.iter().rev().find(|t| t.vm_name() == name) else {
        return error(StatusCode::NOT_FOUND, format!("VM {name:?} is not in the registry"), None, None);
    };
    let known =
        state.tasks.iter().rev().find(|t| {
            t.vm_name() == name && t.status == TaskStatus::Completed && t.kind() != OperationKind::RunCommand
        });
    let result = known.and_then(|t| t.result.clone()).unwrap_or_default();
    Json(VmStatusResponse {
        success: true,
        vm_name: name,
        server: last.target_server.clone(),
        state: result.vm_state,
        ip: result.ip,
        port_forwards: result.port_forwards,
        state_task_id: known.map(|t| t.id),
        last_task_id: last.id,
        last_task_status: last.status,
        last_task_kind: last.kind(),
        updated_at: last.updated_at,
    })
    .into_response()
}

/// A JSON body as the fake recorded it, for asserting what vmctl sent.
pub fn last_submitted(api: &FakeApi) -> Value {
    api.state().submitted.last().cloned().unwrap_or(Value::Null)
}
