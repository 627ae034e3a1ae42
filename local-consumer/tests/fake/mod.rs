//! An in-process edge and executor for driving the daemon's loop in simulated time.
//!
//! [`FakeEdge`] keeps tasks the way the workers do (pending, claimed, terminal), answers polls
//! with a doorbell it rings on every change, enforces the API worker's 64 KiB body limit on
//! reports, and records every call. [`FakeExecutor`] takes a set time per task and records
//! when each ran.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    time::Duration,
};

use local_consumer::{
    config::{Cli, Config},
    daemon::{Daemon, Parts},
    edge::{ClaimOutcome, Edge, EdgeError},
    executor::{Attempts, Execute, Outcome},
    metrics::Metrics,
    notify::Notifier,
    retry::Jitter,
};
use serde_json::json;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use vm_task_types::{
    validate::Limits,
    wire::{BufferedTask, ClaimResponse, ErrorBody, ReadyTasksResponse, TaskStatusResponse, UpdateStatusRequest},
    Task, TaskResult, TaskStatus, Timestamp,
};

pub fn config(args: &[&str]) -> Config {
    let mut all = vec![
        "local-consumer",
        "--consumer-worker-url",
        "http://edge.invalid/consumer",
        "--api-worker-url",
        "http://edge.invalid",
        "--consumer-token",
        "t",
        "--lease-seconds",
        "60",
    ];
    all.extend_from_slice(args);
    <Cli as clap::Parser>::parse_from(all).validate().unwrap()
}

/// A daemon over `edge` and `executor`, with a fixed jitter seed.
pub fn daemon(
    config: Config,
    edge: &Arc<FakeEdge>,
    executor: &Arc<FakeExecutor>,
    shutdown: &CancellationToken,
) -> Daemon<Arc<FakeEdge>, Arc<FakeExecutor>> {
    let parts = Parts {
        config,
        edge: edge.clone(),
        executor: executor.clone(),
        metrics: Metrics::new(),
        jitter: Jitter::seeded(1),
        notifier: Arc::new(Notifier::disabled()),
    };
    Daemon::new(parts, shutdown.clone())
}

/// One call the daemon made, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Ready {
        since: Option<String>,
    },
    Claim(Uuid),
    Heartbeat(Uuid),
    Release(Uuid),
    /// The report's status and the size of its JSON body.
    Report {
        id: Uuid,
        status: TaskStatus,
        bytes: usize,
        accepted: bool,
    },
    TaskStatus(Uuid),
}

#[derive(Debug)]
pub struct FakeTask {
    pub task: Task,
    pub buffered: BufferedTask,
    /// Held by another daemon's claim until then.
    pub held_until: Option<Instant>,
    /// In the buffer listing (false: still in the queue, say).
    pub listed: bool,
    /// Accepted reports, in order.
    pub reports: Vec<UpdateStatusRequest>,
    /// The API has no record of it until then (KV has not propagated it to the daemon's
    /// location): claims get 404, status reads `None`.
    pub visible_from: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    tasks: BTreeMap<Uuid, FakeTask>,
    bell: u64,
    next_id: u64,
    calls: Vec<(Instant, Call)>,
    /// Refuse reports with this status whose result carries output (a worker refusing content).
    refuse_output_with: Option<u16>,
    /// Fail this many reports with a 503 before accepting any.
    fail_reports: u32,
    /// Answer waiting polls as the durable mode's push socket does (see [`FakeEdge::push`]).
    pushing: bool,
    pushed: std::collections::BTreeSet<Uuid>,
    pushes: u64,
}

#[derive(Debug, Default)]
pub struct FakeEdge {
    state: Mutex<State>,
    changed: Notify,
}

impl FakeEdge {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Buffers a `run_command` on `vm` (ids increase with submission order).
    pub fn submit(&self, vm: &str, command: &str) -> Uuid {
        self.submit_after(vm, command, None)
    }

    /// Buffers a `run_command` whose `previousTaskId` is `previous`.
    pub fn submit_after(&self, vm: &str, command: &str, previous: Option<Uuid>) -> Uuid {
        let mut state = self.state();
        state.next_id += 1;
        let ms = 1_700_000_000_000 + state.next_id;
        let id = uuid::Builder::from_unix_timestamp_millis(ms, &[0; 10]).into_uuid();
        let mut task: Task = serde_json::from_value(json!({
            "id": id,
            "type": "run_command",
            "payload": {"vmName": vm, "command": command},
            "status": "pending",
            "targetServer": "production",
            "createdAt": "2026-11-27T00:00:00.000Z",
            "updatedAt": "2026-11-27T00:00:00.000Z"
        }))
        .unwrap();
        task.previous_task_id = previous;
        let buffered = BufferedTask {
            task_id: id,
            kind: task.kind(),
            vm_name: vm.into(),
            target_server: "production".into(),
            previous_task_id: previous,
            created_at: Timestamp(ms),
            buffered_at: Timestamp(ms),
        };
        state.tasks.insert(
            id,
            FakeTask { task, buffered, held_until: None, listed: true, reports: Vec::new(), visible_from: None },
        );
        state.bell += 1;
        drop(state);
        self.changed.notify_waiters();
        id
    }

    /// Marks `id` as claimed by another daemon for `lease`.
    pub fn hold(&self, id: Uuid, lease: Duration) {
        let mut state = self.state();
        let task = state.tasks.get_mut(&id).unwrap();
        task.task.status = TaskStatus::Processing;
        task.held_until = Some(Instant::now() + lease);
    }

    /// The API answers 404 for `id` for `for_how_long` (listed all along).
    pub fn hide_record(&self, id: Uuid, for_how_long: Duration) {
        self.state().tasks.get_mut(&id).unwrap().visible_from = Some(Instant::now() + for_how_long);
    }

    /// A client cancelled `id`.
    pub fn cancel(&self, id: Uuid) {
        self.state().tasks.get_mut(&id).unwrap().task.status = TaskStatus::Cancelled;
    }

    /// The queue gave up delivering `id` before any claim: it fails unrun (dead-lettered).
    pub fn dead_letter(&self, id: Uuid) {
        self.state().tasks.get_mut(&id).unwrap().task.status = TaskStatus::Failed;
    }

    /// An earlier claim of `id` (another daemon process's) ended without a report: the
    /// next claim is its second attempt.
    pub fn lose_attempt(&self, id: Uuid) {
        self.state().tasks.get_mut(&id).unwrap().task.attempts += 1;
    }

    /// Takes `id` out of the buffer listing, or puts it back (ringing the doorbell).
    pub fn set_listed(&self, id: Uuid, listed: bool) {
        let mut state = self.state();
        state.tasks.get_mut(&id).unwrap().listed = listed;
        state.bell += 1;
        drop(state);
        self.changed.notify_waiters();
    }

    pub fn refuse_output_with(&self, status: u16) {
        self.state().refuse_output_with = Some(status);
    }

    pub fn fail_reports(&self, count: u32) {
        self.state().fail_reports = count;
    }

    pub fn status(&self, id: Uuid) -> TaskStatus {
        self.state().tasks[&id].task.status
    }

    pub fn task(&self, id: Uuid) -> Task {
        self.state().tasks[&id].task.clone()
    }

    pub fn reports(&self, id: Uuid) -> Vec<UpdateStatusRequest> {
        self.state().tasks[&id].reports.clone()
    }

    pub fn all_terminal(&self) -> bool {
        self.state().tasks.values().all(|t| t.task.status.is_terminal())
    }

    /// From now on a poll with a doorbell is answered as the durable mode's push socket
    /// answers it: with the claimable tasks not pushed before, as a pushed (partial) listing,
    /// or with nothing when none come within the wait. Full listings stay as they are.
    pub fn push(&self) {
        self.state().pushing = true;
    }

    async fn next_push(&self, since: &str, wait: Duration) -> ReadyTasksResponse {
        let deadline = Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            {
                let mut state = self.state();
                let fresh: Vec<BufferedTask> = state
                    .tasks
                    .values()
                    .filter(|t| t.listed && !t.task.status.is_terminal() && t.task.claim.is_none())
                    .filter(|t| !state.pushed.contains(&t.task.id))
                    .map(|t| t.buffered.clone())
                    .collect();
                if !fresh.is_empty() {
                    state.pushed.extend(fresh.iter().map(|t| t.task_id));
                    state.pushes += 1;
                    return local_consumer::push::pushed_listing(fresh, state.pushes);
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return ReadyTasksResponse {
                    success: true,
                    count: 0,
                    tasks: Vec::new(),
                    bell: since.to_owned(),
                    list_complete: true,
                };
            }
        }
    }

    pub fn calls(&self) -> Vec<(Instant, Call)> {
        self.state().calls.clone()
    }

    fn record(&self, call: Call) {
        self.state().calls.push((Instant::now(), call));
    }
}

fn refused(status: u16, error: &str) -> EdgeError {
    EdgeError::Refused {
        status,
        body: ErrorBody {
            success: false,
            error: error.into(),
            code: "refused".into(),
            field: None,
            current_status: None,
            lease_expires_at: None,
        },
    }
}

impl Edge for FakeEdge {
    async fn ready(
        &self,
        _servers: &[String],
        since: Option<&str>,
        wait: Duration,
        _hot: bool,
    ) -> Result<ReadyTasksResponse, EdgeError> {
        self.record(Call::Ready { since: since.map(str::to_owned) });
        let pushing = self.state().pushing;
        if let (Some(since), true) = (since, pushing) {
            return Ok(self.next_push(since, wait).await);
        }
        if since.is_some_and(|s| s == self.state().bell.to_string()) {
            let _ = tokio::time::timeout(wait, self.changed.notified()).await;
        }
        let state = self.state();
        let tasks: Vec<BufferedTask> = state
            .tasks
            .values()
            .filter(|t| t.listed && !t.task.status.is_terminal() && t.task.claim.is_none())
            .map(|t| t.buffered.clone())
            .collect();
        Ok(ReadyTasksResponse {
            success: true,
            count: tasks.len(),
            tasks,
            bell: state.bell.to_string(),
            list_complete: true,
        })
    }

    async fn claim(&self, task: &BufferedTask, _lease: Duration) -> Result<ClaimOutcome, EdgeError> {
        self.record(Call::Claim(task.task_id));
        let mut state = self.state();
        let Some(fake) = state.tasks.get_mut(&task.task_id) else {
            return Ok(ClaimOutcome::NotVisible);
        };
        if fake.visible_from.is_some_and(|from| Instant::now() < from) {
            return Ok(ClaimOutcome::NotVisible);
        }
        if fake.task.status.is_terminal() {
            return Ok(ClaimOutcome::Finished(fake.task.status));
        }
        if let Some(until) = fake.held_until {
            let now = Instant::now();
            if until > now {
                return Ok(ClaimOutcome::Held(until - now));
            }
            fake.held_until = None;
        }
        if let Some(claim) = &fake.task.claim {
            // The daemon proposes the same claim id for a task every time: its claim again.
            let (task, claim_id) = (fake.task.clone(), claim.claim_id);
            return Ok(ClaimOutcome::Claimed(Box::new(ClaimResponse {
                success: true,
                task,
                claim_id,
                lease_expires_at: Timestamp(0),
            })));
        }
        let claim_id = Uuid::new_v4();
        fake.task.status = TaskStatus::Processing;
        fake.task.attempts += 1;
        fake.task.claim = Some(vm_task_types::Claim {
            claim_id,
            consumer_id: "test".into(),
            claimed_at: Timestamp(0),
            lease_expires_at: Timestamp(0),
        });
        let task = fake.task.clone();
        Ok(ClaimOutcome::Claimed(Box::new(ClaimResponse {
            success: true,
            task,
            claim_id,
            lease_expires_at: Timestamp(0),
        })))
    }

    async fn heartbeat(&self, id: Uuid, _claim_id: Uuid, _lease: Duration) -> Result<(), EdgeError> {
        self.record(Call::Heartbeat(id));
        Ok(())
    }

    async fn release(&self, id: Uuid, claim_id: Uuid, _reason: &str) -> Result<(), EdgeError> {
        self.record(Call::Release(id));
        let mut state = self.state();
        let fake = state.tasks.get_mut(&id).unwrap();
        if fake.task.claim.as_ref().map(|c| c.claim_id) != Some(claim_id) {
            return Err(refused(409, "not your claim"));
        }
        fake.task.claim = None;
        fake.task.status = TaskStatus::Pending;
        state.bell += 1;
        drop(state);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn report(&self, id: Uuid, update: &UpdateStatusRequest) -> Result<(), EdgeError> {
        let bytes = serde_json::to_vec(update).unwrap().len();
        let outcome = {
            let mut state = self.state();
            let refuse_output_with = state.refuse_output_with;
            if state.fail_reports > 0 {
                state.fail_reports -= 1;
                Err(EdgeError::Transient("HTTP 503".into()))
            } else if bytes > Limits::BODY_MAX_BYTES {
                Err(refused(413, &format!("request body must be at most {} bytes", Limits::BODY_MAX_BYTES)))
            } else if let Some(status) =
                refuse_output_with.filter(|_| update.result.as_ref().is_some_and(|r| r.output.is_some()))
            {
                Err(refused(status, "result.output: refused"))
            } else {
                let fake = state.tasks.get_mut(&id).unwrap();
                if fake.task.claim.as_ref().map(|c| c.claim_id) != Some(update.claim_id) {
                    Err(refused(409, "claim does not hold the task"))
                } else {
                    fake.task.status = update.status;
                    fake.task.result = update.result.clone();
                    fake.task.error = update.error.clone();
                    fake.reports.push(update.clone());
                    Ok(())
                }
            }
        };
        self.record(Call::Report { id, status: update.status, bytes, accepted: outcome.is_ok() });
        outcome
    }

    async fn task_status(&self, id: Uuid) -> Result<Option<TaskStatusResponse>, EdgeError> {
        self.record(Call::TaskStatus(id));
        let now = Instant::now();
        Ok(self
            .state()
            .tasks
            .get(&id)
            .filter(|t| t.visible_from.is_none_or(|from| now >= from))
            .map(|t| TaskStatusResponse::of(&t.task)))
    }
}

/// When one task ran.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: Uuid,
    pub vm: String,
    pub started: Instant,
    pub ended: Option<Instant>,
}

/// Takes `took` per task and completes it with `output` (the command, unless set).
#[derive(Debug)]
pub struct FakeExecutor {
    took: Duration,
    output: Option<String>,
    runs: Mutex<Vec<Run>>,
    running: AtomicUsize,
    most_running: AtomicUsize,
}

impl FakeExecutor {
    pub fn new(took: Duration) -> Arc<Self> {
        Self::with_output(took, None)
    }

    pub fn with_output(took: Duration, output: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            took,
            output,
            runs: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            most_running: AtomicUsize::new(0),
        })
    }

    pub fn runs(&self) -> Vec<Run> {
        self.runs.lock().unwrap().clone()
    }

    pub fn most_running(&self) -> usize {
        self.most_running.load(SeqCst)
    }
}

impl Execute for FakeExecutor {
    async fn execute(&self, task: &Task, _attempts: &mut Attempts) -> Outcome {
        let index = {
            let mut runs = self.runs.lock().unwrap();
            runs.push(Run { id: task.id, vm: task.vm_name().into(), started: Instant::now(), ended: None });
            runs.len() - 1
        };
        let now_running = self.running.fetch_add(1, SeqCst) + 1;
        self.most_running.fetch_max(now_running, SeqCst);
        tokio::time::sleep(self.took).await;
        self.running.fetch_sub(1, SeqCst);
        self.runs.lock().unwrap()[index].ended = Some(Instant::now());
        let command = match &task.operation {
            vm_task_types::Operation::RunCommand(cmd) => cmd.command.clone(),
            other => format!("{other:?}"),
        };
        Outcome::Completed(TaskResult {
            output: Some(self.output.clone().unwrap_or(command)),
            exit_code: Some(0),
            ..TaskResult::default()
        })
    }
}
