//! The main loop: long-poll the consumer worker, start runnable tasks, drain on shutdown.
//!
//! One loop owns the [`Scheduler`]; each started task runs in its own tokio task (claim,
//! heartbeat, execute, report) and tells the loop when it is done over a channel.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use arrakis_client::ArrakisClient;
use tokio::{
    sync::{mpsc, Semaphore},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;
use vm_task_types::{
    wire::{BufferedTask, ReadyTasksResponse, UpdateStatusRequest},
    TaskStatus,
};

use crate::{
    config::Config,
    edge::{ClaimOutcome, EdgeClient, EdgeError},
    executor::{backoff, now, Attempts, BootDefaults, Executor, Outcome, RetryPolicy},
    lock,
    metrics::{self, Metrics},
    notify::Notifier,
    scheduler::Scheduler,
};

/// Polls within this long of the last task found or finished ask for quick doorbell checks.
const HOT_AFTER_ACTIVITY: Duration = Duration::from_secs(5);

/// A truncated listing is repeated once fewer than this many listed tasks wait.
const BACKLOG_RELIST_BELOW: usize = 100;

/// What a task's job tells the loop when it ends.
#[derive(Debug)]
enum JobEnd {
    /// Done here or found terminal: never start again.
    Finished(Uuid),
    /// Not startable yet; try again at this time if still listed.
    Deferred(BufferedTask, Instant),
}

struct Shared {
    config: Config,
    edge: EdgeClient,
    executor: Executor,
    metrics: Metrics,
    shutdown: CancellationToken,
}

type PollFuture = Pin<Box<dyn Future<Output = (Option<String>, Result<ReadyTasksResponse, EdgeError>)> + Send>>;

/// Runs the daemon until `shutdown` is cancelled, then drains in-flight tasks (up to the
/// drain timeout) and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let _locks = lock::lock_servers(&config.lock_dir, &config.server_names)?;
    let metrics = Metrics::new();
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
    let notifier = Notifier::from_env();
    let executor = Executor {
        arrakis: arrakis.clone(),
        defaults: BootDefaults {
            kernel: config.default_kernel.clone(),
            rootfs: config.default_rootfs.clone(),
            initramfs: config.default_initramfs.clone(),
        },
        retry: RetryPolicy {
            retries: config.arrakis_retries,
            base: config.arrakis_retry_base,
            cap: Duration::from_secs(10),
        },
        metrics: metrics.clone(),
    };
    let shared = Arc::new(Shared { config, edge, executor, metrics, shutdown: shutdown.clone() });

    if wait_until_reachable(&shared, &arrakis, &notifier).await {
        tracing::info!(servers = ?shared.config.server_names, consumer_id = %shared.config.consumer_id, "local-consumer ready");
        notifier.ready(&format!("serving {}", shared.config.server_names.join(",")));
        main_loop(&shared, &notifier).await;
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
async fn wait_until_reachable(shared: &Shared, arrakis: &ArrakisClient, notifier: &Notifier) -> bool {
    let mut delay = shared.config.poll_backoff_min;
    let mut logged = false;
    loop {
        let (edge, arrakis_health) = tokio::join!(shared.edge.health(), arrakis.health());
        match (edge, arrakis_health) {
            (Ok(()), Ok(_)) => return true,
            (edge, arrakis_health) => {
                let problem = format!(
                    "waiting for dependencies: workers {}, arrakis {}",
                    edge.err().unwrap_or_else(|| "ok".into()),
                    arrakis_health.err().map(|e| e.to_string()).unwrap_or_else(|| "ok".into())
                );
                if !logged {
                    tracing::warn!("{problem}");
                    logged = true;
                }
                notifier.status(&problem);
                notifier.watchdog();
            }
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(shared.config.poll_backoff_max);
    }
}

async fn main_loop(shared: &Arc<Shared>, notifier: &Notifier) {
    let config = &shared.config;
    let mut scheduler = Scheduler::new();
    let permits = Arc::new(Semaphore::new(config.max_concurrency));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<JobEnd>();
    let mut jobs = JoinSet::new();
    let mut poll: Option<PollFuture> = None;
    let mut bell: Option<String> = None;
    let mut need_full_list = true;
    let mut last_full_list = Instant::now();
    let mut failures = 0u32;
    let mut unreachable_since: Option<Instant> = None;
    let mut last_activity = Instant::now();
    let mut watchdog = notifier.watchdog_every.map(tokio::time::interval);

    loop {
        // Start whatever may start, while there are free slots.
        while permits.available_permits() > 0 {
            let Some(task) = scheduler.next(Instant::now()) else { break };
            let Ok(permit) = permits.clone().try_acquire_owned() else { unreachable!("a permit was available") };
            let (shared, done) = (shared.clone(), done_tx.clone());
            // A predecessor this daemon saw finish needs no check with the API.
            let previous_done = task.previous_task_id.is_some_and(|p| scheduler.has_finished(p));
            // Every log line about the task, the executor's included, carries these fields.
            let span = tracing::info_span!("task", id = %task.task_id, vm = %task.vm_name, op = %task.kind);
            jobs.spawn(
                async move {
                    let end = job(&shared, task, previous_done).await;
                    drop(permit);
                    let _ = done.send(end);
                }
                .instrument(span),
            );
        }

        // After a truncated listing, list again only once most of it has been worked off, so
        // a backlog over the page size does not turn into back-to-back listings.
        let backlog = need_full_list && scheduler.waiting() >= BACKLOG_RELIST_BELOW;
        if poll.is_none() && !backlog {
            let full = need_full_list || last_full_list.elapsed() >= config.relist_every;
            let since = if full { None } else { bell.clone() };
            let delay = if failures == 0 { Duration::ZERO } else { backoff_delay(config, failures) };
            let (edge, servers, wait) = (shared.edge.clone(), config.server_names.clone(), config.poll_wait);
            let hot = last_activity.elapsed() < HOT_AFTER_ACTIVITY;
            poll = Some(Box::pin(async move {
                tokio::time::sleep(delay).await;
                let result = edge.ready(&servers, since.as_deref(), wait, hot).await;
                (since, result)
            }));
        }

        // A deferred task due now can start only when a slot is free; a full house waits for a
        // job to end instead of spinning.
        let wakeup = scheduler
            .next_wakeup()
            .filter(|_| permits.available_permits() > 0)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            (since, result) = async { poll.as_mut().expect("checked").await }, if poll.is_some() => {
                poll = None;
                match result {
                    Ok(response) => {
                        if let Some(since) = unreachable_since.take() {
                            tracing::info!(after_s = since.elapsed().as_secs(), "workers reachable again");
                        }
                        failures = 0;
                        let listed = since.as_deref() != Some(response.bell.as_str());
                        shared.metrics.poll(if !listed { "idle" } else if response.tasks.is_empty() { "empty" } else { "tasks" });
                        if since.is_none() {
                            last_full_list = Instant::now();
                        }
                        if listed {
                            if !response.tasks.is_empty() {
                                last_activity = Instant::now();
                            }
                            need_full_list = !response.list_complete;
                            if response.list_complete { scheduler.offer(response.tasks) } else { scheduler.add(response.tasks) }
                        }
                        bell = Some(response.bell);
                    }
                    Err(e) => {
                        failures += 1;
                        shared.metrics.poll("error");
                        shared.metrics.edge_error("ready");
                        if unreachable_since.is_none() {
                            unreachable_since = Some(Instant::now());
                            tracing::warn!(error = %e, "cannot poll the consumer worker; backing off until it answers");
                        }
                    }
                }
            }
            Some(end) = done_rx.recv() => match end {
                JobEnd::Finished(id) => {
                    scheduler.finish(id);
                    last_activity = Instant::now();
                }
                JobEnd::Deferred(task, at) => scheduler.defer(task, at),
            },
            _ = tokio::time::sleep_until(wakeup) => {}
            _ = async { watchdog.as_mut().expect("checked").tick().await }, if watchdog.is_some() => notifier.watchdog(),
        }
    }

    // Drain: no new claims; in-flight tasks finish to a safe point, up to the drain timeout.
    notifier.stopping();
    let in_flight = jobs.len();
    if in_flight > 0 {
        tracing::info!(in_flight, timeout_s = config.drain_timeout.as_secs(), "draining in-flight tasks");
    }
    let drained = tokio::time::timeout(config.drain_timeout, async {
        while jobs.join_next().await.is_some() {
            notifier.watchdog();
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = jobs.len(),
            "drain timeout reached; abandoned tasks will be retried when their leases expire"
        );
        jobs.abort_all();
    }
}

fn backoff_delay(config: &Config, failures: u32) -> Duration {
    let policy = RetryPolicy { retries: 0, base: config.poll_backoff_min, cap: config.poll_backoff_max };
    backoff(policy, failures)
}

/// One task: check its predecessor, claim it, run it with a heartbeat, report the outcome.
async fn job(shared: &Shared, task: BufferedTask, previous_done: bool) -> JobEnd {
    let config = &shared.config;
    let id = task.task_id;

    if let Some(previous) = task.previous_task_id.filter(|_| !previous_done) {
        match previous_finished(shared, previous).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(%previous, "waiting for the VM's previous task");
                return JobEnd::Deferred(task, Instant::now() + Duration::from_millis(500));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the previous task; will retry");
                return JobEnd::Deferred(task, Instant::now() + Duration::from_secs(2));
            }
        }
    }
    if shared.shutdown.is_cancelled() {
        return JobEnd::Deferred(task, Instant::now());
    }

    let claim = match shared.edge.claim(&task, config.lease).await {
        Ok(ClaimOutcome::Claimed(claim)) => claim,
        Ok(ClaimOutcome::Finished(status)) => {
            tracing::info!(%status, "task is already terminal; skipping");
            return JobEnd::Finished(id);
        }
        Ok(ClaimOutcome::Held(until)) => {
            let wait = Duration::from_millis(until.millis_since(now()) + 250);
            tracing::info!(until = %until, "task is held by another claim; retrying when its lease ends");
            return JobEnd::Deferred(task, Instant::now() + wait);
        }
        Err(e) => {
            shared.metrics.edge_error("claim");
            tracing::warn!(error = %e, "claim failed; will retry");
            let delay = if e.is_transient() { Duration::from_secs(2) } else { Duration::from_secs(30) };
            return JobEnd::Deferred(task, Instant::now() + delay);
        }
    };
    let operation = claim.task.kind().as_str();
    shared.metrics.claimed(operation);
    if shared.shutdown.is_cancelled() {
        // Claimed but not started: give it back rather than hold it through the shutdown.
        match shared.edge.release(id, claim.claim_id, "daemon shutting down before starting the task").await {
            Ok(_) => tracing::info!("released unstarted claim"),
            Err(e) => tracing::warn!(error = %e, "could not release claim; its lease will expire"),
        }
        return JobEnd::Deferred(task, Instant::now());
    }

    tracing::info!(attempt = claim.task.attempts, "claimed; executing");
    shared.metrics.in_flight_add(1);
    let started = std::time::Instant::now();
    let heartbeat_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(
        heartbeat(shared.edge.clone(), id, claim.claim_id, config.lease, heartbeat_stop.clone()).in_current_span(),
    );
    let mut attempts = Attempts::default();
    let outcome = shared.executor.execute(&claim.task, &mut attempts).await;
    heartbeat_stop.cancel();
    let _ = heartbeat.await;

    let (status, update) = match outcome {
        Outcome::Completed(result) => (
            TaskStatus::Completed,
            UpdateStatusRequest {
                status: TaskStatus::Completed,
                claim_id: claim.claim_id,
                result: Some(result),
                error: None,
                message: None,
                retries: attempts.notes,
            },
        ),
        Outcome::Failed(error) => (
            TaskStatus::Failed,
            UpdateStatusRequest {
                status: TaskStatus::Failed,
                claim_id: claim.claim_id,
                result: None,
                error: Some(error),
                message: None,
                retries: attempts.notes,
            },
        ),
    };
    if let Some(error) = &update.error {
        tracing::warn!(%error, "task failed");
    }
    report(shared, id, &update).await;
    shared.metrics.in_flight_add(-1);
    shared.metrics.finished(operation, status == TaskStatus::Completed, started.elapsed());
    tracing::info!(%status, took_ms = started.elapsed().as_millis() as u64, "reported");
    JobEnd::Finished(id)
}

/// Whether the VM's previous task is out of the way: terminal, unknown, or on another server.
async fn previous_finished(shared: &Shared, previous: Uuid) -> Result<bool, EdgeError> {
    match shared.edge.task_status(previous).await? {
        None => Ok(true),
        Some(status) => Ok(status.status.is_terminal() || !shared.config.server_names.contains(&status.target_server)),
    }
}

/// Renews the lease every third of its length until stopped.
async fn heartbeat(edge: EdgeClient, id: Uuid, claim_id: Uuid, lease: Duration, stop: CancellationToken) {
    let every = lease / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match edge.heartbeat(id, claim_id, lease).await {
            Ok(_) => tracing::debug!("lease renewed"),
            Err(EdgeError::Refused { status, body }) => {
                tracing::warn!(status, error = %body.error, "lease lost; the task may be retried elsewhere");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
        }
    }
}

/// Reports the outcome, retrying transient failures for up to one lease.
async fn report(shared: &Shared, id: Uuid, update: &UpdateStatusRequest) {
    let deadline = Instant::now() + shared.config.lease;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match shared.edge.report(id, update).await {
            Ok(_) => return,
            Err(EdgeError::Refused { status, body }) => {
                tracing::error!(status, error = %body.error, "report refused; the task's claim was lost");
                return;
            }
            Err(e) => {
                shared.metrics.edge_error("report");
                if Instant::now() >= deadline {
                    tracing::error!(error = %e, "giving up reporting; the lease will expire and the task will be retried");
                    return;
                }
                let delay = backoff(
                    RetryPolicy { retries: 0, base: Duration::from_millis(200), cap: Duration::from_secs(5) },
                    attempt,
                );
                tracing::warn!(error = %e, "report failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
