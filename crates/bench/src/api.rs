//! API latency under load: `POST /vm/tasks` from concurrent clients on a stack without a daemon.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::{stream, StreamExt};
use serde_json::json;
use stack::{Stack, StackOptions};

use crate::{measure::percentile, report::table, shut_down, with_vars, BenchOptions, Mode, UNSERVED};

#[derive(Debug)]
pub(crate) struct ApiResult {
    clients: usize,
    latencies: Vec<u64>,
    errors: usize,
    wall: Duration,
    first_error: Option<String>,
}

pub(crate) async fn api_latency(opts: &BenchOptions, mode: Mode) -> Result<ApiResult> {
    tracing::info!("api: starting a stack without the daemon");
    let stack_opts = with_vars(StackOptions::edge_only(), &opts.worker_vars).worker_var("DISPATCH_MODE", mode);
    let stack = Stack::start(stack_opts).await?;
    let api = stack.client();
    let (n, clients) = (opts.api_requests, opts.api_clients);
    let post = |name: String| {
        let api = &api;
        async move {
            let sent = Instant::now();
            let result = api.submit_op("launch_vm", json!({"vmName": name, "targetServer": UNSERVED})).await;
            result.map(|_| sent.elapsed().as_micros() as u64).map_err(|e| e.to_string())
        }
    };
    // `clients` requests in flight at any time, as many clients each sending one after another.
    let run = |names: Vec<String>| stream::iter(names).map(post).buffer_unordered(clients).collect::<Vec<_>>();
    // One request per client first, so every connection is open before the clock starts.
    run((0..clients).map(|i| format!("api-warm-{i}")).collect()).await;
    tracing::info!("api: {n} POST /vm/tasks from {clients} concurrent clients");
    let started = Instant::now();
    let results = run((0..n).map(|i| format!("api-bench-{i:05}")).collect()).await;
    let wall = started.elapsed();
    shut_down(stack).await;
    let first_error = results.iter().find_map(|r| r.as_ref().err().cloned());
    let latencies: Vec<u64> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    Ok(ApiResult { clients, errors: results.len() - latencies.len(), latencies, wall, first_error })
}

impl ApiResult {
    pub(crate) fn render(&self) -> String {
        let l = &self.latencies;
        let msf = |us: u64| format!("{:.1} ms", us as f64 / 1000.0);
        let rows = vec![vec![
            self.clients.to_string(),
            (l.len() + self.errors).to_string(),
            self.errors.to_string(),
            msf(percentile(l, 50.0)),
            msf(percentile(l, 90.0)),
            msf(percentile(l, 99.0)),
            msf(percentile(l, 100.0)),
            format!("{:.0}", l.len() as f64 / self.wall.as_secs_f64()),
        ]];
        let error = self.first_error.as_ref().map(|e| format!("First error: {e}\n")).unwrap_or_default();
        format!(
            "## API latency under load\n\n\
             `POST /vm/tasks` (`launch_vm` on a new VM each, targetServer `{UNSERVED}` which no daemon serves) from \
             concurrent clients on a stack without a daemon, after one warm-up request per client; the consumer \
             worker buffers the queued tasks meanwhile. Client-side latency.\n\n{}{error}",
            table(&["clients", "requests", "errors", "p50", "p90", "p99", "max", "requests/s"], &rows)
        )
    }
}
