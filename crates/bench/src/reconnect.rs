//! Worker restart: `wrangler dev` (both workers, their KV, queues and objects' state kept on
//! disk) is stopped and started again while the daemon keeps running. From the moment both
//! workers answer `/health` again: when the daemon is back (the durable mode: its push socket
//! open again; the KV mode: its first successful poll), and how long a task submitted at that
//! moment takes from POST to completed, followed with `?wait`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::json;
use stack::{client::Auth, Stack};
use vm_task_types::{wire::TaskDetailResponse, TaskStatus};

use crate::{measure::log_len, Mode, SERVER, TASK_TIMEOUT};

#[derive(Debug)]
pub(crate) struct ReconnectResult {
    /// Stopping wrangler until both workers answered again.
    pub(crate) restart: Duration,
    /// From both workers answering until the daemon's log said it was back; `None` when it
    /// did not within the timeout. Zero when it was back before the health checks returned.
    pub(crate) daemon_back: Option<Duration>,
    pub(crate) daemon_line: &'static str,
    /// A task submitted when both workers answered: POST sent until `?wait` said completed
    /// (POSTs refused while the runtime settles are retried, and count).
    pub(crate) first_task: Option<Duration>,
    pub(crate) first_task_status: String,
}

pub(crate) async fn reconnect(stack: &mut Stack, mode: Mode) -> Result<ReconnectResult> {
    let daemon_log = stack.log_path("local-consumer");
    let offset = log_len(&daemon_log);
    let daemon_line = match mode {
        Mode::Durable => "push channel open",
        Mode::Kv => "workers reachable again",
    };
    tracing::info!("reconnect: restarting wrangler under the running daemon");
    let stopping = Instant::now();
    stack.restart_wrangler().await.context("restarting wrangler")?;
    let answered = Instant::now();
    let restart = answered.duration_since(stopping);
    let api = stack.client();

    let watch_log = async {
        loop {
            let text = std::fs::read(&daemon_log).unwrap_or_default();
            if String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default()).contains(daemon_line) {
                return Some(answered.elapsed());
            }
            if answered.elapsed() > TASK_TIMEOUT {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let first_task = async {
        let sent = Instant::now();
        let created = loop {
            match api.submit_op("launch_vm", json!({"vmName": "bench-restart-vm", "targetServer": SERVER})).await {
                Ok(created) => break created,
                Err(e) if sent.elapsed() < TASK_TIMEOUT => {
                    tracing::debug!("reconnect: POST refused right after the restart: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(anyhow::Error::from(e)),
            }
        };
        let path = format!("/vm/tasks/{}?wait=30", created.task_id);
        loop {
            let detail: TaskDetailResponse =
                api.call(Method::GET, &path, Auth::Client, None, Some(Duration::from_secs(30))).await?;
            if detail.task.status.is_terminal() || sent.elapsed() > TASK_TIMEOUT {
                return Ok((sent.elapsed(), detail.task.status));
            }
        }
    };
    let (back, task) = tokio::join!(watch_log, first_task);
    let (first_task, status) = match task {
        Ok((took, status)) => (Some(took).filter(|_| status == TaskStatus::Completed), status.to_string()),
        Err(e) => {
            tracing::warn!("reconnect: the first task after the restart failed: {e:#}");
            (None, "unreadable".into())
        }
    };
    Ok(ReconnectResult { restart, daemon_back: back, daemon_line, first_task, first_task_status: status })
}
