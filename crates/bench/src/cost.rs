//! Cost: billable operations per task and per idle hour, priced at Cloudflare's list prices.

use std::fmt::Write as _;

use vm_task_types::wire::OpCounts;

use crate::{
    idle::IdleResult,
    lone::LoneResult,
    measure::{Ops, Requests},
    report::table,
    throughput::ThroughputResult,
};

// Prices: Cloudflare Workers Paid list prices in USD, without the monthly allotments the
// plan includes (10 M KV reads, 1 M KV writes/deletes/lists each, 1 M queue operations,
// 10 M requests, 1 M Durable Object requests, 400,000 GB-s): the figures are marginal costs.
// Checked on 2026-11-29 against https://developers.cloudflare.com/workers/platform/pricing/,
// https://developers.cloudflare.com/kv/platform/pricing/,
// https://developers.cloudflare.com/queues/platform/pricing/ and
// https://developers.cloudflare.com/durable-objects/platform/pricing/ (compute: requests
// including WebSocket messages received, billed 20:1, and alarms; duration in GB-s of the
// 128 MB an active object is allocated; SQLite storage: rows read and rows written).

/// Workers KV: reads.
pub(crate) const KV_READ_USD_PER_MILLION: f64 = 0.50;
/// Workers KV: writes, deletes and lists, each billed at this price.
pub(crate) const KV_WRITE_CLASS_USD_PER_MILLION: f64 = 5.00;
/// Queues: per operation (a 64 KB chunk written, read or deleted).
pub(crate) const QUEUE_OP_USD_PER_MILLION: f64 = 0.40;
/// Queue operations per message delivered once: write, read, delete. A retry adds a read.
pub(crate) const QUEUE_OPS_PER_MESSAGE: u64 = 3;
/// Workers requests (HTTP requests and, counted here too, queue consumer invocations).
pub(crate) const REQUEST_USD_PER_MILLION: f64 = 0.30;
/// Durable Objects: requests (HTTP, RPC, alarms; WebSocket messages received at 20:1).
pub(crate) const DO_REQUEST_USD_PER_MILLION: f64 = 0.15;
/// WebSocket messages received per billed Durable Object request.
pub(crate) const DO_WS_MESSAGES_PER_REQUEST: f64 = 20.0;
/// Durable Objects: duration, per million GB-s.
pub(crate) const DO_GB_S_USD_PER_MILLION: f64 = 12.50;
/// Memory an active Durable Object is billed for, in GB (128 MB).
pub(crate) const DO_MEMORY_GB: f64 = 0.128;
/// SQLite-backed Durable Object storage: rows read, rows written.
pub(crate) const DO_ROW_READ_USD_PER_MILLION: f64 = 0.001;
pub(crate) const DO_ROW_WRITTEN_USD_PER_MILLION: f64 = 1.00;
/// A month for the idle cost: 30 days.
pub(crate) const HOURS_PER_MONTH: f64 = 720.0;

/// Billable operations, per task or per hour.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cost {
    pub(crate) kv_reads: f64,
    pub(crate) kv_writes: f64,
    pub(crate) kv_deletes: f64,
    pub(crate) kv_lists: f64,
    pub(crate) kv_write_class: f64,
    pub(crate) queue_messages: f64,
    queue_ops: f64,
    pub(crate) requests: f64,
    /// Durable Object requests as billed: requests plus WebSocket messages / 20.
    pub(crate) do_requests: f64,
    pub(crate) do_ws_messages: f64,
    pub(crate) do_gb_s: f64,
    pub(crate) do_rows_read: f64,
    pub(crate) do_rows_written: f64,
}

impl Cost {
    pub(crate) fn of(ops: &OpCounts, requests: u64) -> Self {
        Cost {
            kv_reads: ops.kv_reads as f64,
            kv_writes: ops.kv_writes as f64,
            kv_deletes: ops.kv_deletes as f64,
            kv_lists: ops.kv_lists as f64,
            kv_write_class: ops.kv_write_class() as f64,
            queue_messages: ops.queue_sends as f64,
            queue_ops: (ops.queue_sends * QUEUE_OPS_PER_MESSAGE + ops.queue_retries) as f64,
            requests: requests as f64,
            do_requests: ops.do_requests as f64 + ops.do_ws_messages as f64 / DO_WS_MESSAGES_PER_REQUEST,
            do_ws_messages: ops.do_ws_messages as f64,
            do_gb_s: ops.do_active_ms as f64 / 1000.0 * DO_MEMORY_GB,
            do_rows_read: ops.do_rows_read as f64,
            do_rows_written: ops.do_rows_written as f64,
        }
    }

    pub(crate) fn scaled(self, k: f64) -> Self {
        Cost {
            kv_reads: self.kv_reads * k,
            kv_writes: self.kv_writes * k,
            kv_deletes: self.kv_deletes * k,
            kv_lists: self.kv_lists * k,
            kv_write_class: self.kv_write_class * k,
            queue_messages: self.queue_messages * k,
            queue_ops: self.queue_ops * k,
            requests: self.requests * k,
            do_requests: self.do_requests * k,
            do_ws_messages: self.do_ws_messages * k,
            do_gb_s: self.do_gb_s * k,
            do_rows_read: self.do_rows_read * k,
            do_rows_written: self.do_rows_written * k,
        }
    }

    /// USD for KV.
    pub(crate) fn kv_dollars(&self) -> f64 {
        (self.kv_reads * KV_READ_USD_PER_MILLION + self.kv_write_class * KV_WRITE_CLASS_USD_PER_MILLION) / 1e6
    }

    /// USD for Queues.
    pub(crate) fn queue_dollars(&self) -> f64 {
        self.queue_ops * QUEUE_OP_USD_PER_MILLION / 1e6
    }

    /// USD for worker requests.
    pub(crate) fn request_dollars(&self) -> f64 {
        self.requests * REQUEST_USD_PER_MILLION / 1e6
    }

    /// USD for Durable Objects: requests, duration, rows.
    pub(crate) fn do_dollars(&self) -> f64 {
        (self.do_requests * DO_REQUEST_USD_PER_MILLION
            + self.do_gb_s * DO_GB_S_USD_PER_MILLION
            + self.do_rows_read * DO_ROW_READ_USD_PER_MILLION
            + self.do_rows_written * DO_ROW_WRITTEN_USD_PER_MILLION)
            / 1e6
    }

    /// USD for these operations.
    pub(crate) fn dollars(&self) -> f64 {
        self.kv_dollars() + self.queue_dollars() + self.request_dollars() + self.do_dollars()
    }

    pub(crate) fn row(&self, name: String, dollars: String) -> Vec<String> {
        vec![
            name,
            format!("{:.2}", self.kv_reads),
            format!("{:.2}", self.kv_writes),
            format!("{:.2}", self.kv_deletes),
            format!("{:.2}", self.kv_lists),
            format!("**{:.2}**", self.kv_write_class),
            format!("{:.2}", self.queue_messages),
            format!("{:.2}", self.queue_ops),
            format!("{:.2}", self.requests),
            format!("{:.2}", self.do_requests),
            format!("{:.5}", self.do_gb_s),
            format!("{:.2} / {:.2}", self.do_rows_read, self.do_rows_written),
            dollars,
        ]
    }
}

pub(crate) fn render_cost(
    lone: Option<&LoneResult>,
    throughput: &[ThroughputResult],
    idle: Option<&IdleResult>,
) -> String {
    let mut rows = Vec::new();
    let mut detail = String::new();
    let mut per_task = |name: String, ops: &Ops, requests: &Requests, n: usize| {
        let cost = Cost::of(&ops.total(), requests.system()).scaled(1.0 / n.max(1) as f64);
        rows.push(cost.row(name.clone(), format!("${:.2} per million tasks", cost.dollars() * 1e6)));
        let (a, c) = (&ops.api, &ops.consumer);
        let _ = writeln!(
            detail,
            "- {name}: API worker {}r/{}w/{}d/{}l, {} queue sends; consumer worker {}r/{}w/{}d/{}l, {} acks, {} \
             retries; requests: {}",
            a.kv_reads,
            a.kv_writes,
            a.kv_deletes,
            a.kv_lists,
            a.queue_sends,
            c.kv_reads,
            c.kv_writes,
            c.kv_deletes,
            c.kv_lists,
            c.queue_acks,
            c.queue_retries,
            requests
                .by_kind
                .iter()
                .filter(|(k, _)| **k != "other")
                .map(|(k, v)| format!("{} {k}", v.len()))
                .collect::<Vec<_>>()
                .join(", "),
        );
    };
    if let Some(l) = lone {
        per_task(format!("lone task (per task, {} tasks)", l.n), &l.ops, &l.requests, l.n);
    }
    for t in throughput {
        per_task(
            format!("throughput, MAX_CONCURRENCY {} (per task, {} tasks)", t.concurrency, t.submitted),
            &t.ops,
            &t.requests,
            t.submitted,
        );
    }
    if let Some(i) = idle {
        let hour = i.per_hour();
        rows.push(hour.row("idle daemon, per hour".into(), format!("${:.4} per hour", hour.dollars())));
        let day = hour.scaled(24.0);
        rows.push(day.row("idle daemon, per day".into(), format!("${:.3} per day", day.dollars())));
        let month = hour.scaled(HOURS_PER_MONTH);
        rows.push(month.row(
            "idle daemon, per month (30 days)".into(),
            format!("**${:.2} per idle host per month**", month.dollars()),
        ));
    }
    format!(
        "## Cost\n\n\
         Billable operations of both workers from `/stats` deltas; write-class = writes + deletes + lists (all \
         billed at the write price); queue operations = {QUEUE_OPS_PER_MESSAGE} per message + 1 per retry; \
         requests = worker requests from the wrangler log (client POSTs, queue batches, the daemon's polls, \
         predecessor checks, claims, heartbeats, reports); Durable Object requests = the host queue objects' \
         requests + WebSocket messages received / {DO_WS_MESSAGES_PER_REQUEST}, GB-s = active time × {DO_MEMORY_GB} GB, \
         rows = SQLite rows read / written (durable mode).\n\n{}\n{detail}",
        table(
            &[
                "",
                "KV reads",
                "writes",
                "deletes",
                "lists",
                "write-class",
                "queue msgs",
                "queue ops",
                "requests",
                "DO requests",
                "DO GB-s",
                "DO rows r / w",
                "USD"
            ],
            &rows
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs() {
        let ops = OpCounts { kv_reads: 2_000_000, kv_writes: 1_000_000, queue_sends: 1_000_000, ..OpCounts::default() };
        let cost = Cost::of(&ops, 1_000_000);
        // $1.00 reads + $5.00 writes + $1.20 queue (3 ops a message) + $0.30 requests.
        assert!((cost.dollars() - 7.5).abs() < 1e-9, "{}", cost.dollars());
        let ops = OpCounts {
            do_requests: 1_000_000,
            do_ws_messages: 2_000_000,
            do_active_ms: 1_000_000_000,
            do_rows_read: 1_000_000,
            do_rows_written: 1_000_000,
            ..OpCounts::default()
        };
        // 1.1 M requests × $0.15 + 128,000 GB-s × $12.50/M + $0.001 + $1.00.
        let want = 1.1 * 0.15 + 0.128 * 1e6 * 12.5 / 1e6 + 0.001 + 1.0;
        assert!((Cost::of(&ops, 0).dollars() - want).abs() < 1e-9, "{}", Cost::of(&ops, 0).dollars());
    }
}
