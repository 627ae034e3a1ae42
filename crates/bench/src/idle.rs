//! Idle cost per daemon: the operations of an idle stack with its daemon, on the shipped worker
//! vars, extrapolated to an hour, a day and a month.

use std::time::{Duration, Instant};

use anyhow::Result;
use stack::Stack;

use crate::{
    cost::{Cost, HOURS_PER_MONTH, KV_READ_USD_PER_MILLION, KV_WRITE_CLASS_USD_PER_MILLION, REQUEST_USD_PER_MILLION},
    measure::{log_len, snapshot, DaemonProbe, Ops, Requests},
    report::{table, toml_value},
    DAEMON,
};

#[derive(Debug)]
pub(crate) struct IdleResult {
    window: Duration,
    polls: u64,
    ops: Ops,
    requests: Requests,
    bell_check_ms: String,
    sweep: Option<Ops>,
}

pub(crate) async fn idle(stack: &Stack, daemon: &DaemonProbe, idle_secs: u64) -> Result<IdleResult> {
    let api = stack.client();
    let log = stack.log_path("wrangler");
    let poll_timeout = Duration::from_secs(DAEMON.poll_wait_seconds + 20);
    tracing::info!("idle: waiting for the daemon to finish a long poll, then measuring ≥ {idle_secs} s");
    // The window runs from the end of one long poll to the end of a later one, so it holds
    // whole polls: each poll's doorbell reads and its request.
    daemon.wait_next_poll(poll_timeout).await?;
    let before = snapshot(&api).await?;
    let log_from = log_len(&log);
    let polls_before = daemon.polls().await?;
    let start = Instant::now();
    loop {
        daemon.wait_next_poll(poll_timeout).await?;
        if start.elapsed() >= Duration::from_secs(idle_secs) {
            break;
        }
    }
    let after = snapshot(&api).await?;
    let window = start.elapsed();
    let log_to = log_len(&log);
    let polls = daemon.polls().await?.saturating_sub(polls_before);
    // One cron-triggered lease sweep on the empty buffer: a per-deployment cost, not per daemon.
    let sweep = async {
        let before = snapshot(&api).await?;
        stack.sweep_now().await?;
        let after = snapshot(&api).await?;
        Ok::<_, anyhow::Error>(Ops::between(&before, &after))
    }
    .await
    .map_err(|e| tracing::warn!("could not measure a sweep: {e:#}"))
    .ok();
    let bell_check_ms = toml_value(
        &std::fs::read_to_string(stack.dir().join("wrangler-consumer.toml")).unwrap_or_default(),
        "BELL_CHECK_MS",
    )
    .unwrap_or_else(|| "?".into());
    Ok(IdleResult {
        window,
        polls,
        ops: Ops::between(&before, &after),
        requests: Requests::read(&log, log_from, log_to),
        bell_check_ms,
        sweep,
    })
}

impl IdleResult {
    pub(crate) fn per_hour(&self) -> Cost {
        let scale = 3600.0 / self.window.as_secs_f64();
        Cost::of(&self.ops.total(), self.requests.system()).scaled(scale)
    }

    pub(crate) fn render(&self) -> String {
        let total = self.ops.total();
        let hour = self.per_hour();
        let day = hour.scaled(24.0);
        let rows = vec![
            vec![
                format!("measured, {:.1} s", self.window.as_secs_f64()),
                total.kv_reads.to_string(),
                total.kv_write_class().to_string(),
                self.requests.system().to_string(),
                self.polls.to_string(),
            ],
            vec![
                "per hour".into(),
                format!("{:.0}", hour.kv_reads),
                format!("{:.0}", hour.kv_write_class),
                format!("{:.0}", hour.requests),
                format!("{:.0}", self.polls as f64 * 3600.0 / self.window.as_secs_f64()),
            ],
            vec![
                "per day".into(),
                format!("{:.0}", day.kv_reads),
                format!("{:.0}", day.kv_write_class),
                format!("{:.0}", day.requests),
                format!("{:.0}", self.polls as f64 * 86_400.0 / self.window.as_secs_f64()),
            ],
        ];
        let relist_lists_per_hour = 3600 / DAEMON.relist_seconds;
        let sweep = match &self.sweep {
            Some(s) => {
                let t = s.total();
                format!(
                    "One cron lease sweep on an empty buffer costs {} KV reads and {} write-class operations \
                     (+1 request); the deployed cron runs it every minute, once per deployment, not per daemon: \
                     {:.0} write-class ops and 43,200 requests a month, ${:.3}/month.",
                    t.kv_reads,
                    t.kv_write_class(),
                    t.kv_write_class() as f64 * 60.0 * HOURS_PER_MONTH,
                    Cost::of(&t, 1).scaled(60.0 * HOURS_PER_MONTH).dollars()
                )
            }
            None => "The sweep could not be measured.".into(),
        };
        format!(
            "## Idle cost per daemon\n\n\
             An idle stack with its daemon (POLL_WAIT_SECONDS {poll}, shipped BELL_CHECK_MS {bell}); the window \
             runs from the end of one long poll to the end of the first poll ending after the requested time, \
             so it holds whole polls. Operations of both workers; requests from the wrangler log.\n\n{table}\n\
             Cost: **${month:.3} per idle host per month** (KV reads ${reads:.3}, write-class ${wc:.3}, requests \
             ${req:.3}). A full relisting every RELIST_SECONDS {relist} (1 list, 1 request; {relist_h}/hour) \
             falls outside a window this short unless it shows in the counts above: it would add \
             ${relist_month:.3}/month. {sweep}\n",
            poll = DAEMON.poll_wait_seconds,
            bell = self.bell_check_ms,
            table = table(&["idle daemon", "KV reads", "KV write-class", "worker requests", "long polls"], &rows),
            month = hour.dollars() * HOURS_PER_MONTH,
            reads = hour.kv_reads * KV_READ_USD_PER_MILLION / 1e6 * HOURS_PER_MONTH,
            wc = hour.kv_write_class * KV_WRITE_CLASS_USD_PER_MILLION / 1e6 * HOURS_PER_MONTH,
            req = hour.requests * REQUEST_USD_PER_MILLION / 1e6 * HOURS_PER_MONTH,
            relist = DAEMON.relist_seconds,
            relist_h = relist_lists_per_hour,
            relist_month = relist_lists_per_hour as f64
                * HOURS_PER_MONTH
                * (KV_WRITE_CLASS_USD_PER_MILLION + REQUEST_USD_PER_MILLION)
                / 1e6,
        )
    }
}
