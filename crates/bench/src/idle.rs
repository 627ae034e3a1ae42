//! Idle cost per daemon: the operations of an idle stack with its daemon, on the shipped worker
//! vars, extrapolated to an hour, a day and a month.

use std::time::{Duration, Instant};

use anyhow::Result;
use stack::Stack;
use vm_task_types::wire::OpCounts;

use crate::{
    cost::{Cost, HOURS_PER_MONTH},
    measure::{log_len, snapshot, DaemonProbe, Ops, Requests},
    report::{table, toml_value},
    Mode, DAEMON,
};

#[derive(Debug)]
pub(crate) struct IdleResult {
    window: Duration,
    polls: u64,
    ops: Ops,
    requests: Requests,
    bell_check_ms: String,
    sweep: Option<Ops>,
    mode: Mode,
}

pub(crate) async fn idle(stack: &Stack, daemon: &DaemonProbe, idle_secs: u64, mode: Mode) -> Result<IdleResult> {
    let api = stack.client();
    let log = stack.log_path("wrangler");
    let poll_timeout = Duration::from_secs(DAEMON.poll_wait_seconds + 20);
    let (before, log_from, polls_before, start) = match mode {
        Mode::Kv => {
            tracing::info!("idle: waiting for the daemon to finish a long poll, then measuring ≥ {idle_secs} s");
            // The window runs from the end of one long poll to the end of a later one, so it
            // holds whole polls: each poll's doorbell reads and its request.
            daemon.wait_next_poll(poll_timeout).await?;
            let before = snapshot(&api).await?;
            let (log_from, polls_before) = (log_len(&log), daemon.polls().await?);
            let start = Instant::now();
            loop {
                daemon.wait_next_poll(poll_timeout).await?;
                if start.elapsed() >= Duration::from_secs(idle_secs) {
                    break;
                }
            }
            (before, log_from, polls_before, start)
        }
        Mode::Durable => {
            // No polls while the push socket is open: a plain window, after the object's
            // last work (a finished task's KV write, its alarm) has settled.
            tracing::info!("idle: measuring {idle_secs} s of an idle daemon on its push socket");
            tokio::time::sleep(Duration::from_secs(2)).await;
            let before = snapshot(&api).await?;
            let (log_from, polls_before) = (log_len(&log), daemon.polls().await?);
            let start = Instant::now();
            tokio::time::sleep(Duration::from_secs(idle_secs)).await;
            (before, log_from, polls_before, start)
        }
    };
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
        mode,
    })
}

impl IdleResult {
    pub(crate) fn per_hour(&self) -> Cost {
        let scale = 3600.0 / self.window.as_secs_f64();
        let mut ops = self.ops.total();
        // The push socket's pings are answered by the runtime without waking the object, so
        // it cannot count them; priced here as received messages (an upper bound).
        ops.do_ws_messages += self.pings();
        Cost::of(&ops, self.requests.system()).scaled(scale)
    }

    /// Pings the daemon sent on its push socket in the window (durable mode).
    fn pings(&self) -> u64 {
        match self.mode {
            Mode::Durable => self.window.as_secs() / local_consumer::push::PING_EVERY.as_secs(),
            Mode::Kv => 0,
        }
    }

    pub(crate) fn render(&self) -> String {
        let total = self.ops.total();
        let hour = self.per_hour();
        let day = hour.scaled(24.0);
        let per = |c: &Cost, polls: f64, label: String| {
            vec![
                label,
                format!("{:.0}", c.kv_reads),
                format!("{:.0}", c.kv_write_class),
                format!("{:.0}", c.requests),
                format!("{:.0}", polls),
                format!("{:.0}", c.do_requests),
                format!("{:.4}", c.do_gb_s),
                format!("{:.0} / {:.0}", c.do_rows_read, c.do_rows_written),
            ]
        };
        let window = self.window.as_secs_f64();
        let rows = vec![
            per(&Cost::of(&total, self.requests.system()), self.polls as f64, format!("measured, {window:.1} s")),
            per(&hour, self.polls as f64 * 3600.0 / window, "per hour".into()),
            per(&day, self.polls as f64 * 86_400.0 / window, "per day".into()),
        ];
        let sweep = match &self.sweep {
            Some(s) => {
                let t = s.total();
                format!(
                    "One cron run ({what}) costs {} KV reads and {} write-class operations (+1 request); the \
                     deployed cron runs it every minute, once per deployment, not per daemon: ${:.3}/month.",
                    t.kv_reads,
                    t.kv_write_class(),
                    Cost::of(&t, 1).scaled(60.0 * HOURS_PER_MONTH).dollars(),
                    what = match self.mode {
                        Mode::Kv => "the lease sweep on an empty buffer",
                        Mode::Durable => "the reconcile listing of pending task records",
                    },
                )
            }
            None => "The cron run could not be measured.".into(),
        };
        let how = match self.mode {
            Mode::Kv => format!(
                "long polls of POLL_WAIT_SECONDS {poll} reading the doorbell every BELL_CHECK_MS {bell}; the window runs \
                 from the end of one long poll to the end of the first poll ending after the requested time, so it \
                 holds whole polls",
                poll = DAEMON.poll_wait_seconds,
                bell = self.bell_check_ms,
            ),
            Mode::Durable => format!(
                "the daemon on its push socket (no polls while it is open); its {pings} ping(s) in the window, one \
                 every {every} s, are answered by the runtime without waking the object and are priced as received \
                 WebSocket messages (1/20 request each), an upper bound",
                pings = self.pings(),
                every = local_consumer::push::PING_EVERY.as_secs(),
            ),
        };
        format!(
            "## Idle cost per daemon ({mode} mode)\n\n\
             An idle stack with its daemon: {how}. Operations of both workers and the host queue objects; \
             requests from the wrangler log.\n\n{table}\n\
             Measured: ${measured:.3} a month (KV ${kv:.3}, worker requests ${req:.3}, Durable Objects ${dobj:.3}). \
             The bench's daemons make no full listings (RELIST_SECONDS) and no host reports (HOST_REPORT_SECONDS) \
             in the window, since a short window catches one of those by chance or not; at the shipped \
             {relist} s and {report} s they add ${periodic:.3} a month ({periodic_what}). \
             **Idle host: ${month:.3} a month.** {sweep}\n",
            mode = self.mode,
            table = table(
                &[
                    "idle daemon",
                    "KV reads",
                    "KV write-class",
                    "worker requests",
                    "long polls",
                    "DO requests",
                    "DO GB-s",
                    "DO rows r / w"
                ],
                &rows
            ),
            measured = hour.dollars() * HOURS_PER_MONTH,
            kv = hour.kv_dollars() * HOURS_PER_MONTH,
            req = hour.request_dollars() * HOURS_PER_MONTH,
            dobj = hour.do_dollars() * HOURS_PER_MONTH,
            relist = DAEMON.relist_seconds,
            report = DAEMON.host_report_seconds,
            periodic = self.periodic_month().dollars(),
            periodic_what = match self.mode {
                Mode::Kv =>
                    "a listing is 1 KV list and 1 request; a report rides a long poll and writes 2 KV keys \
                             per server name",
                Mode::Durable =>
                    "a listing is 1 request and 1 object request; a report rides a listing of its own \
                                  and writes 2 KV keys per server name",
            },
            month = self.month_dollars(),
        )
    }

    /// The idle host's cost per 30-day month: as measured, plus its full listings and host
    /// reports at the shipped intervals (the cron is per deployment, not per host).
    pub(crate) fn month_dollars(&self) -> f64 {
        self.per_hour().dollars() * HOURS_PER_MONTH + self.periodic_month().dollars()
    }

    /// A month of full listings every RELIST_SECONDS and host reports (one server name) every
    /// HOST_REPORT_SECONDS, at the daemon's shipped defaults, from the operations each makes
    /// (the host report's two writes are asserted in vm-task-edge's tests/hosts.rs).
    pub(crate) fn periodic_month(&self) -> Cost {
        let month_secs = HOURS_PER_MONTH as u64 * 3600;
        let relists = month_secs / DAEMON.relist_seconds.max(1);
        let reports = month_secs.checked_div(DAEMON.host_report_seconds).unwrap_or(0);
        let (ops, requests) = match self.mode {
            Mode::Kv => (OpCounts { kv_lists: relists, kv_writes: 2 * reports, ..OpCounts::default() }, relists),
            Mode::Durable => (
                OpCounts { kv_writes: 2 * reports, do_requests: relists + reports, ..OpCounts::default() },
                relists + reports,
            ),
        };
        Cost::of(&ops, requests)
    }
}
