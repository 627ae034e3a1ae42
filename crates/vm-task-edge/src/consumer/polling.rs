//! What a daemon reads: the long poll for its servers' buffered tasks (`/tasks/ready`, waiting
//! on the doorbells), the whole buffer (`/tasks/all`), `/stats`, and removing an entry.

use std::collections::BTreeMap;

use vm_task_types::{
    validate::{self, parse_task_id},
    wire::{AllBufferedResponse, BufferedTask, ReadyTasksResponse, StatsResponse},
    FieldError, Limits,
};

use super::{parse_bounded, ConsumerService};
use crate::{
    auth::Caller,
    hosts,
    http::{Request, Response},
    keys, AppError, Clock, Ids, KvStore,
};

/// First doorbell check interval of a `hot` long poll.
const HOT_BELL_CHECK_MS: u64 = 100;
/// KV operations one long poll may make: under the 1,000 per invocation, with a margin.
const POLL_OP_BUDGET: u64 = 900;
/// Listing pages `/stats` reads per request; beyond this the count is cut short.
const MAX_SCAN_PAGES: usize = 20;

impl<S: KvStore, B: KvStore, C: Clock, I: Ids> ConsumerService<'_, S, B, C, I> {
    pub(super) async fn ready(&self, request: &Request, caller: &Caller) -> Result<Response, AppError> {
        let mut servers = parse_servers(request.query_param("server"))?;
        for server in &servers {
            caller.check_server(server)?;
        }
        if let (true, Caller::Consumer { servers: Some(bound) }) = (servers.is_empty(), caller) {
            // A bound token listing "every server" lists its own.
            servers = bound.clone();
        }
        let limit = parse_bounded(request, "limit", 100, 1, 1000)? as usize;
        let wait_ms = parse_bounded(request, "wait", 0, 0, self.config.max_wait_secs)? * 1000;
        let since = request.query_param("since").filter(|s| !s.is_empty());
        if servers.is_empty() && (wait_ms > 0 || since.is_some()) {
            return Err(AppError::invalid_field(FieldError::new("server", "is required with `wait` or `since`")));
        }
        // `hot=1`: the daemon just saw work, and more often follows at once. Check the bell at
        // 100, 200, 400... ms up to the usual interval, so back-to-back tasks are picked up in
        // about 0.1 s for a handful of extra reads, while an idle poll costs no more.
        let hot = match request.query_param("hot") {
            None | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                return Err(AppError::invalid_field(FieldError::new("hot", format!("must be 0 or 1, got {other:?}"))))
            }
        };
        // The daemon's report about itself, every few minutes (see `crate::hosts`).
        let mut ops = match hosts::report_in(request, &servers, self.clock.now())? {
            Some(report) => hosts::record(&self.buffer.kv, &report).await,
            None => 0,
        };
        let mut interval =
            if hot { HOT_BELL_CHECK_MS.min(self.config.bell_check_ms) } else { self.config.bell_check_ms };
        let deadline = self.clock.now().plus_millis(wait_ms);
        // Each check reads every server's bell, and the answer lists every server's prefix;
        // the poll answers (unchanged) before a check would leave no room for that listing.
        let per_check = servers.len().max(1) as u64;
        loop {
            let bell = self.bells(&servers).await?;
            ops += per_check;
            let changed = since != Some(bell.as_str());
            let now = self.clock.now();
            let out_of_budget = ops + 2 * per_check > POLL_OP_BUDGET;
            if changed || now >= deadline || out_of_budget {
                let (tasks, list_complete) =
                    if changed { self.list_ready(&servers, limit).await? } else { (Vec::new(), true) };
                return Ok(Response::json(
                    200,
                    &ReadyTasksResponse { success: true, count: tasks.len(), tasks, bell, list_complete },
                ));
            }
            self.clock.sleep_ms(interval.max(10).min(deadline.millis_since(now))).await;
            interval = (interval * 2).min(self.config.bell_check_ms);
        }
    }

    async fn bells(&self, servers: &[String]) -> Result<String, AppError> {
        let mut parts = Vec::with_capacity(servers.len());
        for server in servers {
            parts.push(self.buffer.bell(server).await?);
        }
        Ok(parts.join("."))
    }

    /// Buffered tasks of `servers` (all servers when empty), oldest first.
    async fn list_ready(&self, servers: &[String], limit: usize) -> Result<(Vec<BufferedTask>, bool), AppError> {
        let prefixes: Vec<String> = if servers.is_empty() {
            vec![keys::READY_PREFIX.to_owned()]
        } else {
            servers.iter().map(|s| keys::ready_prefix(s)).collect()
        };
        let mut all = Vec::new();
        let mut complete = true;
        for prefix in prefixes {
            let (tasks, page) = self.buffer.list(&prefix, limit, None).await?;
            complete &= page.list_complete;
            all.extend(tasks);
        }
        all.sort_by_key(|t| t.task_id);
        if all.len() > limit {
            all.truncate(limit);
            complete = false;
        }
        Ok((all, complete))
    }

    pub(super) async fn all(&self, request: &Request) -> Result<Response, AppError> {
        let limit = parse_bounded(request, "limit", 1000, 1, 1000)? as usize;
        let (tasks, complete) = self.list_ready(&[], limit).await?;
        Ok(Response::json(
            200,
            &AllBufferedResponse { success: true, count: tasks.len(), tasks, list_complete: complete },
        ))
    }

    /// Removes a finished task's entry. A task that is not finished keeps its entry: without
    /// it, no daemon would find the task again (the sweep would have to buffer it anew).
    pub(super) async fn delete(&self, raw_id: &str, request: &Request, caller: &Caller) -> Result<Response, AppError> {
        let id = parse_task_id("id", raw_id)?;
        let requested = match request.query_param("server") {
            Some(server) => {
                validate::check_server_name("server", server)?;
                Some(server.to_owned())
            }
            None => None,
        };
        let server = match self.tasks.load(id).await? {
            Some(task) if !task.status.is_terminal() => {
                return Err(AppError::conflict(
                    format!("task {id} is {}; only a finished task's entry can be removed", task.status),
                    task.status,
                ))
            }
            Some(task) => requested.unwrap_or(task.target_server),
            // An entry left by a task that no longer exists: removable when its server is named.
            None => requested.ok_or_else(|| AppError::NotFound(format!("task {id} not found")))?,
        };
        caller.check_server(&server)?;
        self.unbuffer(&server, id).await?;
        Ok(Response::json(
            200,
            &serde_json::json!({"success": true, "taskId": id, "message": "removed from the buffer"}),
        ))
    }

    pub(super) async fn stats(&self) -> Result<Response, AppError> {
        let mut by_server: BTreeMap<String, usize> = BTreeMap::new();
        let mut cursor = None;
        for _ in 0..MAX_SCAN_PAGES {
            let page = self.buffer.kv.list(keys::READY_PREFIX, 1000, cursor.as_deref()).await?;
            for key in &page.keys {
                if let Some(server) = keys::server_of_ready(&key.name) {
                    *by_server.entry(server.to_owned()).or_default() += 1;
                }
            }
            if page.list_complete {
                break;
            }
            cursor = page.cursor;
        }
        let total = by_server.values().sum();
        Ok(Response::json(
            200,
            &StatsResponse {
                success: true,
                worker: "vm-consumer-worker".into(),
                since: self.config.started_at,
                ops: self.counters.snapshot(),
                buffered_by_server: Some(by_server),
                buffered_total: Some(total),
            },
        ))
    }
}

fn parse_servers(raw: Option<&str>) -> Result<Vec<String>, AppError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else { return Ok(Vec::new()) };
    let servers: Vec<String> = raw.split(',').map(|s| s.trim().to_owned()).collect();
    if servers.len() > Limits::SERVERS_PER_POLL_MAX {
        return Err(AppError::invalid_field(FieldError::new(
            "server",
            format!("at most {} servers per request", Limits::SERVERS_PER_POLL_MAX),
        )));
    }
    for s in &servers {
        validate::check_server_name("server", s)?;
    }
    Ok(servers)
}
