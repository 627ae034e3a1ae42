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

// Prices: Cloudflare Workers Paid list prices in USD per million operations, without the
// monthly allotments the plan includes (10 M KV reads, 1 M KV writes/deletes/lists each,
// 1 M queue operations, 10 M requests): the figures are marginal costs.

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
/// A month for the idle cost: 30 days.
pub(crate) const HOURS_PER_MONTH: f64 = 720.0;

/// Billable operations, per task or per hour.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cost {
    pub(crate) kv_reads: f64,
    kv_writes: f64,
    kv_deletes: f64,
    kv_lists: f64,
    pub(crate) kv_write_class: f64,
    queue_messages: f64,
    queue_ops: f64,
    pub(crate) requests: f64,
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
        }
    }

    /// USD for these operations.
    pub(crate) fn dollars(&self) -> f64 {
        (self.kv_reads * KV_READ_USD_PER_MILLION
            + self.kv_write_class * KV_WRITE_CLASS_USD_PER_MILLION
            + self.queue_ops * QUEUE_OP_USD_PER_MILLION
            + self.requests * REQUEST_USD_PER_MILLION)
            / 1e6
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
         predecessor checks, claims, heartbeats, reports). ARCHITECTURE.md's model: 8 write-class operations for \
         a task that arrives alone, approaching 6 under load.\n\n{}\n{detail}",
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
    }
}
