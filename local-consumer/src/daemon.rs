//! The main loop: long-poll the consumer worker, start runnable tasks, drain on shutdown.
//!
//! [`run`] wires the real workers, Arrakis, metrics and systemd together and hands them to a
//! [`Daemon`]. The daemon is one loop over one [`Event`] type (rust-analyzer's `main_loop`):
//! [`Daemon::next_event`] waits for whichever comes first (a poll's answer, a job's end, a
//! deferred task falling due, shutdown), and [`Daemon::handle`] applies it to the state, all of
//! which lives in the `Daemon`. Each started task runs as a job in a [`JoinSet`] (claim,
//! heartbeat, execute, report); the set's size is the number running, and a finished job is
//! joined as its event, so nothing accumulates. The daemon runs over the [`Edge`] and
//! [`Execute`] traits and tokio's clock only, so tests drive it in-process with
//! `tokio::time::pause` over a fake edge.
//!
//! The decisions (which task starts next, whether its predecessor is out of the way, what a
//! claim's answer means, whether a claimed command may be sent) are not made here but in
//! [`crate::decide`], plain synchronous code the production model (`edge-model`) runs too;
//! this module does the I/O around them.

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use arrakis_client::ArrakisClient;
use tokio::{
    task::{JoinError, JoinSet},
    time::{Instant, Interval},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;
use vm_task_types::{
    wire::{BufferedTask, ReadyTasksResponse, UpdateStatusRequest},
    Operation, TaskStatus,
};

use crate::{
    config::Config,
    decide::{self, AfterReport, Core, Predecessor, Start, CANCELLED_PREDECESSORS_MAX, UNREPORTED_RETRY},
    edge::{Edge, EdgeClient, EdgeError},
    executor::{Attempts, BootDefaults, Execute, Executor, Outcome},
    lock,
    metrics::{self, Metrics},
    notify::Notifier,
    report::{self, REPORT_MAX_BYTES},
    retry::{Jitter, RetryPolicy},
};

pub use crate::decide::{never_ran, not_resent};

/// Polls within this long of the last task found or finished ask for quick doorbell checks.
const HOT_AFTER_ACTIVITY: Duration = Duration::from_secs(5);

/// A truncated listing is repeated once fewer than this many listed tasks wait.
const BACKLOG_RELIST_BELOW: usize = 100;

/// Longest gap between a long command's heartbeats, which carry its client's cancel.
const LONG_COMMAND_HEARTBEAT: Duration = Duration::from_secs(5);

/// Retries of a failed report: quick at first, for up to one lease in all.
const REPORT_RETRY: RetryPolicy =
    RetryPolicy { retries: u32::MAX, base: Duration::from_millis(200), cap: Duration::from_secs(5) };

/// Runs the daemon until `shutdown` is cancelled, then drains in-flight tasks (up to the
/// drain timeout) and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let _locks = lock::lock_servers(&config.lock_dir, &config.server_names)?;
    let metrics = Metrics::new();
    let jitter = Jitter::from_entropy();
    let edge = EdgeClient::new(&config)?;
    let arrakis = ArrakisClient::new(&config.arrakis_url)
        .with_context(|| format!("ARRAKIS_URL: {:?} is not usable", config.arrakis_url))?
        .with_timeouts(config.arrakis_timeouts);
    let serving = CancellationToken::new();
    let metrics_server = match config.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("METRICS_ADDR: cannot listen on {addr}"))?;
            tracing::info!(%addr, "metrics and health on http://{addr}/metrics and /healthz");
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                edge.clone(),
                arrakis.clone(),
                serving.clone(),
            )))
        }
        None => None,
    };
    let notifier = Arc::new(Notifier::from_env());
    let executor = Executor {
        arrakis: arrakis.clone(),
        defaults: BootDefaults {
            kernel: config.default_kernel.clone(),
            rootfs: config.default_rootfs.clone(),
            initramfs: config.default_initramfs.clone(),
        },
        images: config.images.clone(),
        retry: RetryPolicy {
            retries: config.arrakis_retries,
            base: config.arrakis_retry_base,
            cap: Duration::from_secs(10),
        },
        jitter: jitter.clone(),
        metrics: metrics.clone(),
    };

    if wait_until_reachable(&config, &edge, &arrakis, &notifier, &jitter, &shutdown).await {
        tracing::info!(servers = ?config.server_names, consumer_id = %config.consumer_id, "local-consumer ready");
        notifier.ready(&format!("serving {}", config.server_names.join(",")));
        let parts = Parts { config, edge, executor, metrics, jitter, notifier: notifier.clone() };
        Daemon::new(parts, shutdown).run().await;
    }
    notifier.stopping();
    serving.cancel();
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    tracing::info!("local-consumer stopped");
    Ok(())
}

/// Waits, with backoff, until both workers and Arrakis answer. False if shut down first.
async fn wait_until_reachable(
    config: &Config,
    edge: &EdgeClient,
    arrakis: &ArrakisClient,
    notifier: &Notifier,
    jitter: &Jitter,
    shutdown: &CancellationToken,
) -> bool {
    let backoff = RetryPolicy { retries: u32::MAX, base: config.poll_backoff_min, cap: config.poll_backoff_max };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (edge, arrakis_health) = tokio::join!(edge.health(), arrakis.health());
        match (edge, arrakis_health) {
            (Ok(()), Ok(_)) => return true,
            (edge, arrakis_health) => {
                let problem = format!(
                    "waiting for dependencies: workers {}, arrakis {}",
                    edge.err().unwrap_or_else(|| "ok".into()),
                    arrakis_health.err().map(|e| e.to_string()).unwrap_or_else(|| "ok".into())
                );
                if attempt == 1 {
                    tracing::warn!("{problem}");
                }
                notifier.status(&problem);
                notifier.watchdog();
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(backoff.delay(attempt, jitter)) => {}
        }
    }
}

/// What a [`Daemon`] is built from.
#[derive(Debug)]
pub struct Parts<E, X> {
    pub config: Config,
    pub edge: E,
    pub executor: X,
    pub metrics: Metrics,
    pub jitter: Jitter,
    pub notifier: Arc<Notifier>,
}

/// What every job shares with the loop.
struct Shared<E, X> {
    config: Config,
    edge: E,
    executor: X,
    metrics: Metrics,
    jitter: Jitter,
    shutdown: CancellationToken,
}

/// One thing the loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// Shutdown was requested: stop claiming and drain.
    Shutdown,
    /// A poll answered; `since` is the doorbell it waited on (`None` for a full listing).
    Polled { since: Option<String>, result: Result<ReadyTasksResponse, EdgeError> },
    /// A job ended (or panicked).
    JobEnded { job: tokio::task::Id, result: Result<JobEnd, JoinError> },
    /// A deferred task may be due.
    Wakeup,
    /// Time to tell systemd's watchdog we are alive.
    Watchdog,
}

/// What a task's job tells the loop when it ends ([`decide::JobEnd`] over tokio's clock).
pub type JobEnd = decide::JobEnd<Instant, UpdateStatusRequest>;

/// Whether the loop goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

type PollFuture = Pin<Box<dyn Future<Output = (Option<String>, Result<ReadyTasksResponse, EdgeError>)> + Send>>;

/// The polling side of the state: what to ask for next and how the last asks went.
#[derive(Debug)]
struct Polling {
    /// The doorbell value of the last listing, to wait on.
    bell: Option<String>,
    /// The last listing stopped at its page limit (or none was made yet).
    need_full_list: bool,
    last_full_list: Instant,
    /// Polls failed in a row; the next waits longer.
    failures: u32,
    unreachable_since: Option<Instant>,
    /// Last time a task was listed or finished, for hot polls.
    last_activity: Instant,
}

/// The daemon's loop and all of its state.
pub struct Daemon<E, X> {
    shared: Arc<Shared<E, X>>,
    notifier: Arc<Notifier>,
    /// The decisions: what is listed, running, deferred, finished, unreported.
    core: Core<Instant, UpdateStatusRequest>,
    /// Running jobs; joined as they end, so its length is the number running.
    jobs: JoinSet<JobEnd>,
    /// Each running job's task, to put it back if the job panics.
    job_tasks: HashMap<tokio::task::Id, BufferedTask>,
    poll: Option<PollFuture>,
    polling: Polling,
    watchdog: Option<Interval>,
}

impl<E, X> std::fmt::Debug for Daemon<E, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("core", &self.core)
            .field("jobs", &self.jobs.len())
            .field("polling", &self.polling)
            .finish_non_exhaustive()
    }
}

impl<E: Edge, X: Execute> Daemon<E, X> {
    pub fn new(parts: Parts<E, X>, shutdown: CancellationToken) -> Self {
        let Parts { config, edge, executor, metrics, jitter, notifier } = parts;
        let watchdog = notifier.watchdog_every.map(tokio::time::interval);
        let now = Instant::now();
        Self {
            shared: Arc::new(Shared { config, edge, executor, metrics, jitter, shutdown }),
            notifier,
            core: Core::new(),
            jobs: JoinSet::new(),
            job_tasks: HashMap::new(),
            poll: None,
            polling: Polling {
                bell: None,
                need_full_list: true,
                last_full_list: now,
                failures: 0,
                unreachable_since: None,
                last_activity: now,
            },
            watchdog,
        }
    }

    /// Runs until shutdown, then drains.
    pub async fn run(mut self) {
        while self.step().await == Flow::Continue {}
        self.drain().await;
    }

    /// One turn of the loop: start what may start, make sure a poll is out, wait for the next
    /// event and apply it.
    pub async fn step(&mut self) -> Flow {
        self.start_runnable();
        self.start_poll();
        let event = self.next_event().await;
        self.handle(event)
    }

    /// Jobs running now (the join set's size: finished jobs are not kept).
    pub fn running(&self) -> usize {
        self.jobs.len()
    }

    /// Listed tasks waiting to start.
    pub fn waiting(&self) -> usize {
        self.core.scheduler().waiting()
    }

    /// Starts whatever may start, while there are free slots.
    fn start_runnable(&mut self) {
        while self.jobs.len() < self.shared.config.max_concurrency {
            let Some(Start { task, previous_done, unreported }) = self.core.next(Instant::now()) else { break };
            // Every log line about the task, the executor's included, carries these fields.
            let span = tracing::info_span!("task", id = %task.task_id, vm = %task.vm_name, op = %task.kind);
            let shared = self.shared.clone();
            let job = self.jobs.spawn(job(shared, task.clone(), previous_done, unreported).instrument(span));
            self.job_tasks.insert(job.id(), task);
        }
    }

    /// Sends the next poll unless one is out or a backlog is still being worked off.
    fn start_poll(&mut self) {
        // After a truncated listing, list again only once most of it has been worked off, so
        // a backlog over the page size does not turn into back-to-back listings.
        let backlog = self.polling.need_full_list && self.core.scheduler().waiting() >= BACKLOG_RELIST_BELOW;
        if self.poll.is_some() || backlog {
            return;
        }
        let config = &self.shared.config;
        let polling = &self.polling;
        let full = polling.need_full_list || polling.last_full_list.elapsed() >= config.relist_every;
        let since = if full { None } else { polling.bell.clone() };
        let delay = match polling.failures {
            0 => Duration::ZERO,
            failures => RetryPolicy { retries: u32::MAX, base: config.poll_backoff_min, cap: config.poll_backoff_max }
                .delay(failures, &self.shared.jitter),
        };
        let hot = polling.last_activity.elapsed() < HOT_AFTER_ACTIVITY;
        let shared = self.shared.clone();
        // A push socket that opens again ends the backoff: the workers answer again.
        let reconnected = self.shared.edge.reconnected();
        self.poll = Some(Box::pin(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = reconnected => {}
            }
            let config = &shared.config;
            let result = shared.edge.ready(&config.server_names, since.as_deref(), config.poll_wait, hot).await;
            (since, result)
        }));
    }

    /// Waits for the next thing to react to.
    pub async fn next_event(&mut self) -> Event {
        // A deferred task due now can start only when a slot is free; a full house waits for a
        // job to end instead of spinning.
        let wakeup = self
            .core
            .scheduler()
            .next_wakeup()
            .filter(|_| self.jobs.len() < self.shared.config.max_concurrency)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        // Biased: events ready at the same instant are taken in this order, not at random, so
        // a run in paused or simulated time replays exactly.
        tokio::select! {
            biased;
            _ = self.shared.shutdown.cancelled() => Event::Shutdown,
            (since, result) = async { self.poll.as_mut().expect("checked").await }, if self.poll.is_some() => {
                self.poll = None;
                Event::Polled { since, result }
            }
            Some(joined) = self.jobs.join_next_with_id() => match joined {
                Ok((job, end)) => Event::JobEnded { job, result: Ok(end) },
                Err(e) => Event::JobEnded { job: e.id(), result: Err(e) },
            },
            _ = tokio::time::sleep_until(wakeup) => Event::Wakeup,
            _ = async { self.watchdog.as_mut().expect("checked").tick().await }, if self.watchdog.is_some() => Event::Watchdog,
        }
    }

    /// Applies one event to the state.
    pub fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::Shutdown => return Flow::Stop,
            Event::Polled { since, result: Ok(response) } => self.listed(since, response),
            Event::Polled { result: Err(e), .. } => self.poll_failed(e),
            Event::JobEnded { job, result } => self.job_ended(job, result),
            Event::Wakeup => {}
            Event::Watchdog => self.notifier.watchdog(),
        }
        Flow::Continue
    }

    fn listed(&mut self, since: Option<String>, response: ReadyTasksResponse) {
        let polling = &mut self.polling;
        if let Some(since) = polling.unreachable_since.take() {
            tracing::info!(after_s = since.elapsed().as_secs(), "workers reachable again");
        }
        polling.failures = 0;
        let listed = since.as_deref() != Some(response.bell.as_str());
        self.shared.metrics.poll(if !listed {
            "idle"
        } else if response.tasks.is_empty() {
            "empty"
        } else {
            "tasks"
        });
        if since.is_none() {
            polling.last_full_list = Instant::now();
        }
        if listed {
            if !response.tasks.is_empty() {
                polling.last_activity = Instant::now();
            }
            // A page cut at its limit calls for the rest; pushed tasks are partial by nature.
            polling.need_full_list = !response.list_complete && !crate::push::is_pushed(&response);
            self.core.listed(response.tasks, response.list_complete);
        }
        polling.bell = Some(response.bell);
    }

    fn poll_failed(&mut self, e: EdgeError) {
        self.polling.failures += 1;
        self.shared.metrics.poll("error");
        self.shared.metrics.edge_error("ready");
        if self.polling.unreachable_since.is_none() {
            self.polling.unreachable_since = Some(Instant::now());
            tracing::warn!(error = %e, "cannot poll the consumer worker; backing off until it answers");
        }
    }

    fn job_ended(&mut self, job: tokio::task::Id, result: Result<JobEnd, JoinError>) {
        let task = self.job_tasks.remove(&job);
        match result {
            Ok(end) => {
                if matches!(end, JobEnd::Finished(_)) {
                    self.polling.last_activity = Instant::now();
                }
                self.core.ended(end, Instant::now());
            }
            Err(e) => {
                // A bug, not an outcome: free the VM and try again later; the lease, if the
                // task was claimed, expires first.
                tracing::error!(error = %e, "a task's job panicked");
                if let Some(task) = task {
                    let at = Instant::now() + self.shared.config.lease;
                    self.core.ended(JobEnd::Deferred(task, at), Instant::now());
                }
            }
        }
    }

    /// No new claims; in-flight tasks finish to a safe point, up to the drain timeout.
    pub async fn drain(&mut self) {
        self.notifier.stopping();
        let timeout = self.shared.config.drain_timeout;
        let in_flight = self.jobs.len();
        if in_flight > 0 {
            tracing::info!(in_flight, timeout_s = timeout.as_secs(), "draining in-flight tasks");
        }
        let drained = tokio::time::timeout(timeout, async {
            while let Some(joined) = self.jobs.join_next_with_id().await {
                let (job, result) = match joined {
                    Ok((job, end)) => (job, Ok(end)),
                    Err(e) => (e.id(), Err(e)),
                };
                self.job_ended(job, result);
                self.notifier.watchdog();
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                abandoned = self.jobs.len(),
                "drain timeout reached; abandoned tasks will be retried when their leases expire"
            );
            self.jobs.abort_all();
        }
    }
}

/// One task: check its predecessor, claim it, run it with a heartbeat (unless it already ran
/// here and only its report is missing), report the outcome.
async fn job<E: Edge, X: Execute>(
    shared: Arc<Shared<E, X>>,
    task: BufferedTask,
    previous_done: bool,
    unreported: Option<UpdateStatusRequest>,
) -> JobEnd {
    let config = &shared.config;
    let id = task.task_id;

    if let Some(previous) = task.previous_task_id.filter(|_| !previous_done) {
        let checked = previous_finished(&shared, previous, task.created_at).await;
        if let Some(end) = decide::after_predecessor_check(task.clone(), checked, Instant::now()) {
            return end;
        }
    }
    if shared.shutdown.is_cancelled() {
        return JobEnd::Deferred(task, Instant::now());
    }

    let claimed = shared.edge.claim(&task, config.lease).await;
    if claimed.is_err() {
        shared.metrics.edge_error("claim");
    }
    let claim = match decide::after_claim(task.clone(), claimed, Instant::now()) {
        Ok(claim) => claim,
        Err(end) => return end,
    };
    let operation = claim.task.kind().as_str();
    shared.metrics.claimed(operation);
    if shared.shutdown.is_cancelled() {
        // Claimed but not started: give it back rather than hold it through the shutdown.
        match shared.edge.release(id, claim.claim_id, "daemon shutting down before starting the task").await {
            Ok(()) => tracing::info!("released unstarted claim"),
            Err(e) => tracing::warn!(error = %e, "could not release claim; its lease will expire"),
        }
        return JobEnd::Deferred(task, Instant::now());
    }

    if let Some(mut update) = unreported {
        tracing::info!(status = %update.status, "claimed again; reporting the outcome it had here instead of running it again");
        update.claim_id = claim.claim_id;
        return match while_holding(&shared, id, claim.claim_id, deliver(&shared, id, update)).await {
            Ok(status) => {
                tracing::info!(%status, "reported");
                JobEnd::Finished(id)
            }
            Err(update) => JobEnd::Unreported(task, Box::new(update), Instant::now() + UNREPORTED_RETRY),
        };
    }

    shared.metrics.in_flight_add(1);
    let started = Instant::now();
    let mut attempts = Attempts::default();
    // A long command can be cancelled while it runs: its heartbeats come often enough for a
    // cancel to stop it within seconds, and their answers carry the cancel.
    let long = matches!(&claim.task.operation, Operation::RunCommand(cmd) if cmd.is_long());
    let renew_every = if long { (config.lease / 3).min(LONG_COMMAND_HEARTBEAT) } else { config.lease / 3 };
    let cancel = attempts.cancel.clone();
    let outcome = if let Some(reason) = not_resent(&claim.task) {
        tracing::warn!(attempt = claim.task.attempts, "{reason}");
        Outcome::Failed(reason)
    } else {
        tracing::info!(attempt = claim.task.attempts, "claimed; executing");
        let execution = shared.executor.execute(&claim.task, &mut attempts);
        while_holding_every(&shared, id, claim.claim_id, renew_every, &cancel, execution).await
    };
    let (status, result, error, message) = match outcome {
        Outcome::Completed(result) => (TaskStatus::Completed, Some(result), None, None),
        Outcome::Failed(error) => {
            tracing::warn!(%error, "task failed");
            (TaskStatus::Failed, None, Some(error), None)
        }
        Outcome::Cancelled(result) => {
            tracing::info!("cancelled by its client while running; stopped in the guest");
            (TaskStatus::Cancelled, Some(result), None, Some("stopped in the guest after the client's cancel".into()))
        }
    };
    let update =
        UpdateStatusRequest { status, claim_id: claim.claim_id, result, error, message, retries: attempts.notes };
    let delivered = while_holding(&shared, id, claim.claim_id, deliver(&shared, id, update)).await;
    shared.metrics.in_flight_add(-1);
    match delivered {
        Ok(status) => {
            shared.metrics.finished(operation, status == TaskStatus::Completed, started.elapsed());
            tracing::info!(%status, took_ms = started.elapsed().as_millis() as u64, "reported");
            JobEnd::Finished(id)
        }
        Err(update) => JobEnd::Unreported(task, Box::new(update), Instant::now() + UNREPORTED_RETRY),
    }
}

/// Whether the VM's previous task is out of the way, asking the API along the chain as
/// [`decide::predecessor`] says.
async fn previous_finished<E: Edge, X>(
    shared: &Shared<E, X>,
    previous: Uuid,
    created_at: vm_task_types::Timestamp,
) -> Result<bool, EdgeError> {
    let mut previous = previous;
    for _ in 0..CANCELLED_PREDECESSORS_MAX {
        let status = shared.edge.task_status(previous).await?;
        let servers = &shared.config.server_names;
        match decide::predecessor(status.as_ref(), servers, created_at, crate::edge::wall_clock()) {
            Predecessor::Done => return Ok(true),
            Predecessor::NotYet => return Ok(false),
            Predecessor::Before(before) => previous = before,
        }
    }
    Ok(false)
}

/// Runs `work` while renewing the claim's lease every third of its length.
async fn while_holding<E: Edge, X, T>(
    shared: &Shared<E, X>,
    id: Uuid,
    claim_id: Uuid,
    work: impl Future<Output = T>,
) -> T {
    let every = shared.config.lease / 3;
    while_holding_every(shared, id, claim_id, every, &CancellationToken::new(), work).await
}

/// Runs `work` while renewing the claim's lease `every` so often; fires `cancel` when a
/// renewal's answer says the client asked to cancel.
async fn while_holding_every<E: Edge, X, T>(
    shared: &Shared<E, X>,
    id: Uuid,
    claim_id: Uuid,
    every: Duration,
    cancel: &CancellationToken,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    tokio::select! {
        biased;
        out = &mut work => out,
        () = keep_lease(&shared.edge, id, claim_id, shared.config.lease, every, cancel) => work.await,
    }
}

/// Renews the lease every `every`; returns only when the lease is lost.
async fn keep_lease(
    edge: &impl Edge,
    id: Uuid,
    claim_id: Uuid,
    lease: Duration,
    every: Duration,
    cancel: &CancellationToken,
) {
    loop {
        tokio::time::sleep(every).await;
        match edge.renew(id, claim_id, lease).await {
            Ok(renewal) => {
                tracing::debug!("lease renewed");
                if renewal.cancel_requested && !cancel.is_cancelled() {
                    tracing::info!("the client asked to cancel the running task");
                    cancel.cancel();
                }
            }
            Err(EdgeError::Refused { status, body }) => {
                tracing::warn!(status, error = %body.error, "lease lost; the task may be retried elsewhere");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
        }
    }
}

/// Reports an outcome until the API accepts it, and says the status it accepted.
///
/// The report is first fitted to the API's body limit ([`report::fit`]). Transient failures
/// are retried for up to one lease (the caller keeps heartbeating meanwhile). A report the API
/// refuses for its content (400, 413, 422) is replaced once by a small `failed` report giving
/// the reason, so the task ends readable instead of stuck. Any other refusal means the claim
/// is no longer ours. `Err` gives back what is still to be reported.
async fn deliver<E: Edge, X>(
    shared: &Shared<E, X>,
    id: Uuid,
    mut update: UpdateStatusRequest,
) -> Result<TaskStatus, UpdateStatusRequest> {
    let fitted = report::fit(&mut update, shared.config.max_output_bytes, REPORT_MAX_BYTES);
    if let Some(output_bytes) = fitted.output_cut_from {
        tracing::info!(
            output_bytes,
            report_bytes = fitted.bytes,
            "output truncated to its head and tail to fit the report"
        );
    }
    let mut deadline = Instant::now() + shared.config.lease;
    let mut attempt = 0;
    let mut content_refused = false;
    loop {
        attempt += 1;
        let answer = shared.edge.report(id, &update).await;
        let decision = decide::after_report(&answer, content_refused);
        let Err(e) = answer else { return Ok(update.status) };
        match decision {
            AfterReport::Accepted => return Ok(update.status),
            AfterReport::ReportFailedInstead => {
                let (status, reason) = match &e {
                    EdgeError::Refused { status, body } => (*status, body.error.clone()),
                    EdgeError::Transient(reason) => (0, reason.clone()),
                };
                tracing::error!(status, error = %reason, bytes = fitted.bytes, "the API refused the report's content; reporting the task failed with the reason instead");
                content_refused = true;
                update = UpdateStatusRequest {
                    status: TaskStatus::Failed,
                    claim_id: update.claim_id,
                    result: None,
                    error: Some(report::head_and_tail(
                        &format!(
                            "the task ran, but the API refused its {} report (HTTP {status}: {reason}); its result is lost",
                            update.status
                        ),
                        2048,
                    )),
                    message: None,
                    retries: Vec::new(),
                };
                (attempt, deadline) = (0, Instant::now() + shared.config.lease);
            }
            AfterReport::Keep => {
                tracing::error!(error = %e, "report refused: the claim is no longer ours; will report again if the task is claimed again");
                return Err(update);
            }
            AfterReport::Retry => {
                shared.metrics.edge_error("report");
                if Instant::now() >= deadline {
                    tracing::error!(error = %e, "giving up reporting for now; will report again when the task is claimed again");
                    return Err(update);
                }
                tracing::warn!(error = %e, attempt, "report failed; retrying");
                tokio::time::sleep(REPORT_RETRY.delay(attempt, &shared.jitter)).await;
            }
        }
    }
}
