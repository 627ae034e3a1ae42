//! The dispatch modes side by side: one row per figure, one column per mode, each figure as a
//! user meets it (client-observed latency, operations per task, dollars), with issue #12's
//! targets for the durable mode checked where both modes ran.

use crate::{
    after_idle::AfterIdleResult,
    cost::Cost,
    idle::IdleResult,
    lone::LoneResult,
    measure::{percentile, Ops, Requests},
    reconnect::ReconnectResult,
    report::table,
    throughput::ThroughputResult,
    BenchOptions, Mode,
};

/// Issue #12: a lone task after 6 s idle, POST→completed p50, durable mode.
const TARGET_AFTER_IDLE_P50_MS: u64 = 100;
/// Issue #12: durable throughput at least this many times the KV mode's.
const TARGET_THROUGHPUT_RATIO: f64 = 1.5;
/// Issue #12: the daemon back within this long of the runtime answering.
const TARGET_RECONNECT_MS: u128 = 2000;

/// Everything measured in one mode.
#[derive(Debug)]
pub(crate) struct ModeRun {
    pub(crate) mode: Mode,
    pub(crate) lone: Option<LoneResult>,
    pub(crate) back_to_back: Option<AfterIdleResult>,
    pub(crate) after_idle: Option<AfterIdleResult>,
    pub(crate) throughput: Vec<ThroughputResult>,
    pub(crate) idle: Option<IdleResult>,
    pub(crate) reconnect: Option<ReconnectResult>,
}

impl ModeRun {
    pub(crate) fn new(mode: Mode) -> Self {
        Self {
            mode,
            lone: None,
            back_to_back: None,
            after_idle: None,
            throughput: Vec::new(),
            idle: None,
            reconnect: None,
        }
    }

    /// The throughput run at the daemon's default concurrency, else the first.
    fn main_throughput(&self) -> Option<&ThroughputResult> {
        self.throughput.iter().find(|t| t.concurrency == crate::DAEMON.max_concurrency).or(self.throughput.first())
    }

    fn rate(&self) -> Option<f64> {
        self.main_throughput().and_then(|t| t.rate())
    }
}

fn per_task(ops: &Ops, requests: &Requests, n: usize) -> Cost {
    Cost::of(&ops.total(), requests.system()).scaled(1.0 / n.max(1) as f64)
}

fn p50_p90(v: &[u64]) -> String {
    if v.is_empty() {
        return "—".into();
    }
    format!("{} / {} ms", percentile(v, 50.0), percentile(v, 90.0))
}

pub(crate) fn render_comparison(opts: &BenchOptions, runs: &[ModeRun], targets: &mut Vec<(String, bool)>) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |label: String, cell: &dyn Fn(&ModeRun) -> String| {
        let mut r = vec![label];
        r.extend(runs.iter().map(cell));
        rows.push(r);
    };
    let gap = opts.idle_gap_secs;
    row(format!("lone task after {gap} s idle, client POST→completed (`?wait`), p50 / p90"), &|r| {
        r.after_idle
            .as_ref()
            .map_or("—".into(), |a| format!("**{}** (n {})", p50_p90(&a.client_ms), a.client_ms.len()))
    });
    row("  of which queue delivery / push or poll + claim / run + report (timeline p50)".into(), &|r| {
        r.after_idle.as_ref().map_or("—".into(), |a| {
            format!(
                "{} / {} / {} ms",
                percentile(&a.created_buffered, 50.0),
                percentile(&a.buffered_claimed, 50.0),
                percentile(&a.claimed_completed, 50.0)
            )
        })
    });
    row("  of which `?wait` answered after completed, p50".into(), &|r| {
        r.after_idle.as_ref().map_or("—".into(), |a| format!("{} ms", percentile(&a.wait_lag, 50.0)))
    });
    row("back-to-back tasks, client POST→completed (`?wait`), p50 / p90".into(), &|r| {
        r.back_to_back.as_ref().map_or("—".into(), |a| format!("{} (n {})", p50_p90(&a.client_ms), a.client_ms.len()))
    });
    row(
        format!(
            "throughput, {} tasks over {} VMs, MAX_CONCURRENCY {}",
            opts.tasks,
            opts.vms,
            crate::DAEMON.max_concurrency
        ),
        &|r| {
            r.main_throughput().map_or("—".into(), |t| {
                format!(
                    "**{}** ({} of {} completed)",
                    t.rate().map_or("did not finish".into(), |x| format!("{x:.1} tasks/s")),
                    t.completed,
                    t.submitted
                )
            })
        },
    );
    let lone_cost = |r: &ModeRun| r.lone.as_ref().map(|l| per_task(&l.ops, &l.requests, l.n));
    let load_cost = |r: &ModeRun| r.main_throughput().map(|t| per_task(&t.ops, &t.requests, t.submitted));
    let kv = |c: Option<Cost>| {
        c.map_or("—".into(), |c| {
            format!("{:.2} / {:.2} / {:.2} / {:.2}", c.kv_reads, c.kv_writes, c.kv_deletes, c.kv_lists)
        })
    };
    row("KV reads / writes / deletes / lists per task, lone".into(), &|r| kv(lone_cost(r)));
    row("KV reads / writes / deletes / lists per task, under load".into(), &|r| kv(load_cost(r)));
    let other = |c: Option<Cost>| {
        c.map_or("—".into(), |c| format!("{:.2} queue msgs, {:.2} worker requests", c.queue_messages, c.requests))
    };
    row("queue messages, worker requests per task, lone".into(), &|r| other(lone_cost(r)));
    row("queue messages, worker requests per task, under load".into(), &|r| other(load_cost(r)));
    let dobj = |c: Option<Cost>| {
        c.map_or("—".into(), |c| {
            format!(
                "{:.2} req ({:.2} WS msgs) / {:.5} GB-s / {:.1} / {:.1}",
                c.do_requests, c.do_ws_messages, c.do_gb_s, c.do_rows_read, c.do_rows_written
            )
        })
    };
    row("Durable Object requests / GB-s / rows read / rows written per task, lone".into(), &|r| dobj(lone_cost(r)));
    row("Durable Object requests / GB-s / rows read / rows written per task, under load".into(), &|r| {
        dobj(load_cost(r))
    });
    let dollars = |c: Option<Cost>| {
        c.map_or("—".into(), |c| {
            format!(
                "**${:.2}** (KV {:.2}, Queues {:.2}, Workers {:.2}, DO {:.2})",
                c.dollars() * 1e6,
                c.kv_dollars() * 1e6,
                c.queue_dollars() * 1e6,
                c.request_dollars() * 1e6,
                c.do_dollars() * 1e6
            )
        })
    };
    row("cost per million tasks, lone".into(), &|r| dollars(lone_cost(r)));
    row("cost per million tasks, under load".into(), &|r| dollars(load_cost(r)));
    row("idle host, per month".into(), &|r| {
        r.idle.as_ref().map_or("—".into(), |i| {
            let h = i.per_hour();
            format!(
                "**${:.3}** ({:.0} KV reads, {:.0} worker requests, {:.0} DO requests a month)",
                i.month_dollars(),
                h.kv_reads * crate::cost::HOURS_PER_MONTH,
                h.requests * crate::cost::HOURS_PER_MONTH,
                h.do_requests * crate::cost::HOURS_PER_MONTH
            )
        })
    });
    row("worker restart: daemon back after the workers answer".into(), &|r| {
        r.reconnect.as_ref().map_or("—".into(), |c| {
            c.daemon_back.map_or(format!("not within the timeout (\"{}\")", c.daemon_line), |d| {
                format!("{} ms (\"{}\")", d.as_millis(), c.daemon_line)
            })
        })
    });
    row("worker restart: task submitted as they answer, POST→completed".into(), &|r| {
        r.reconnect.as_ref().map_or("—".into(), |c| {
            c.first_task.map_or(format!("ended {}", c.first_task_status), |d| format!("{} ms", d.as_millis()))
        })
    });
    row("worker restart: stop and start of `wrangler dev`".into(), &|r| {
        r.reconnect.as_ref().map_or("—".into(), |c| format!("{:.1} s", c.restart.as_secs_f64()))
    });

    check_targets(runs, targets);
    let mut headers = vec![""];
    let names: Vec<String> = runs.iter().map(|r| r.mode.to_string()).collect();
    headers.extend(names.iter().map(String::as_str));
    format!(
        "## Dispatch modes side by side\n\n\
         Each mode on its own stack, one after the other. Latency is client-observed: from sending the POST until \
         `GET /vm/tasks/{{id}}?wait=30` answered completed. Operations per task are the workers' and host queue \
         objects' own counts (`/stats` deltas) over the back-to-back lone run without `?wait` (\"lone\") and the \
         throughput run (\"under load\"); Durable Object requests count WebSocket messages received at 1/20. \
         Prices as in the header.\n\n{}",
        table(&headers, &rows)
    )
}

fn check_targets(runs: &[ModeRun], targets: &mut Vec<(String, bool)>) {
    let durable = runs.iter().find(|r| r.mode == Mode::Durable);
    let kv = runs.iter().find(|r| r.mode == Mode::Kv);
    let Some(durable) = durable else { return };
    if let Some(a) = &durable.after_idle {
        let p50 = percentile(&a.client_ms, 50.0);
        let ok = !a.client_ms.is_empty() && a.completed == a.n && p50 < TARGET_AFTER_IDLE_P50_MS;
        targets.push((
            format!(
                "durable: lone task after {} s idle, client POST→completed p50 {p50} ms (target < {TARGET_AFTER_IDLE_P50_MS} ms)",
                a.gap.as_secs()
            ),
            ok,
        ));
    }
    if let (Some(d), Some(k)) = (durable.rate(), kv.and_then(ModeRun::rate)) {
        let ratio = d / k;
        targets.push((
            format!("durable throughput {d:.1} tasks/s = {ratio:.2}× the KV mode's {k:.1} (target ≥ {TARGET_THROUGHPUT_RATIO}×)"),
            ratio >= TARGET_THROUGHPUT_RATIO,
        ));
    }
    if let Some(i) = &durable.idle {
        let reads = i.per_hour().kv_reads;
        targets.push((format!("durable: idle host KV reads {reads:.0} per hour (target 0)"), reads == 0.0));
    }
    if let Some(c) = &durable.reconnect {
        let back = c.daemon_back.map(|d| d.as_millis());
        targets.push((
            format!(
                "durable: daemon reconnected {} after the restarted workers answered (target ≤ 2 s); the task \
                 submitted then {}",
                back.map_or("never".into(), |ms| format!("{ms} ms")),
                c.first_task
                    .map_or(format!("ended {}", c.first_task_status), |d| format!("completed in {} ms", d.as_millis())),
            ),
            back.is_some_and(|ms| ms <= TARGET_RECONNECT_MS) && c.first_task.is_some(),
        ));
    }
}
