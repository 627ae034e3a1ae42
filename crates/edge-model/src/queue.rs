//! Cloudflare Queues as production delivers: at least once, in batches, sometimes twice,
//! sometimes out of order, retried with a delay, dead-lettered after its retries.
//!
//! - **At least once, occasionally more.** "Delivery guarantees"
//!   (<https://developers.cloudflare.com/queues/reference/delivery-guarantees/>): messages are
//!   delivered at least once and, on rare occasions, more than once. Modelled by
//!   [`QueueConfig::duplicate_rate`]: an acked message is delivered once more.
//! - **Batches, retries and delays.** "Batching, Retries and Delays"
//!   (<https://developers.cloudflare.com/queues/configuration/batching-retries/>): a consumer
//!   receives up to `max_batch_size` messages per invocation; a message marked for retry comes
//!   back after its delay; after `max_retries` retries it goes to the dead letter queue.
//!   Delivery order is not guaranteed: each message gets its own delivery delay
//!   ([`QueueConfig::delivery_ms`]), so messages overtake each other.
//! - **Dead letter queues.** "Dead Letter Queues"
//!   (<https://developers.cloudflare.com/queues/configuration/dead-letter-queues/>): messages
//!   that exhaust their retries are sent there instead of being deleted.

use serde_json::Value;
use vm_task_edge::consumer::Delivery;

use crate::rng::Rng;

#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// `max_batch_size` of the consumer (wrangler-consumer.toml: 100).
    pub max_batch: usize,
    /// `max_retries` (wrangler-consumer.toml: 3): deliveries after the first.
    pub max_retries: u32,
    /// Send to first delivery: uniform in this range.
    pub delivery_ms: (u64, u64),
    /// Probability that an acked message is delivered again.
    pub duplicate_rate: f64,
}

impl QueueConfig {
    pub fn production() -> Self {
        Self { max_batch: 100, max_retries: 3, delivery_ms: (5, 1_500), duplicate_rate: 0.01 }
    }
}

/// A message waiting for delivery.
#[derive(Debug, Clone)]
pub struct Message {
    pub seq: u64,
    pub body: Value,
    /// Deliveries so far.
    pub attempts: u32,
    pub available_at: u64,
}

/// What became of a settled batch: messages to hand to the dead letter queue.
#[derive(Debug, Default)]
pub struct Settled {
    pub dead_lettered: Vec<Value>,
    pub retried: usize,
    pub duplicated: usize,
}

/// One queue. Deterministic given its seed.
#[derive(Debug)]
pub struct QueueModel {
    pub config: QueueConfig,
    rng: Rng,
    waiting: Vec<Message>,
    next_seq: u64,
}

impl QueueModel {
    pub fn new(config: QueueConfig, seed: u64) -> Self {
        Self { config, rng: Rng::new(seed), waiting: Vec::new(), next_seq: 0 }
    }

    /// Accepts a message at `now`; returns when it becomes deliverable.
    pub fn send(&mut self, now: u64, body: Value) -> u64 {
        let (lo, hi) = self.config.delivery_ms;
        let at = now + self.rng.range(lo, hi);
        self.push(body, 0, at);
        at
    }

    fn push(&mut self, body: Value, attempts: u32, available_at: u64) {
        self.next_seq += 1;
        self.waiting.push(Message { seq: self.next_seq, body, attempts, available_at });
    }

    /// The earliest time a waiting message becomes deliverable.
    pub fn next_available(&self) -> Option<u64> {
        self.waiting.iter().map(|m| m.available_at).min()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Takes the next batch deliverable at `now` (oldest availability first), if any.
    pub fn take_batch(&mut self, now: u64) -> Vec<Message> {
        let mut ready: Vec<Message> = Vec::new();
        let mut rest = Vec::new();
        for m in self.waiting.drain(..) {
            if m.available_at <= now {
                ready.push(m);
            } else {
                rest.push(m);
            }
        }
        ready.sort_by_key(|m| (m.available_at, m.seq));
        let overflow = ready.split_off(ready.len().min(self.config.max_batch));
        rest.extend(overflow);
        self.waiting = rest;
        for m in &mut ready {
            m.attempts += 1;
        }
        ready
    }

    /// Applies the consumer's decisions; `None` means the invocation failed (every message is
    /// retried, as when a queue handler throws).
    pub fn settle(&mut self, now: u64, batch: Vec<Message>, decisions: Option<&[Delivery]>) -> Settled {
        let mut settled = Settled::default();
        for (i, m) in batch.into_iter().enumerate() {
            let decision = decisions.and_then(|d| d.get(i).copied()).unwrap_or(Delivery::Retry { delay_secs: 0 });
            match decision {
                Delivery::Ack => {
                    if self.rng.chance(self.config.duplicate_rate) {
                        let (lo, hi) = self.config.delivery_ms;
                        let at = now + self.rng.range(lo, hi);
                        self.push(m.body, m.attempts, at);
                        settled.duplicated += 1;
                    }
                }
                Delivery::Retry { delay_secs } => {
                    if m.attempts > self.config.max_retries {
                        settled.dead_lettered.push(m.body);
                    } else {
                        self.waiting.push(Message { available_at: now + delay_secs as u64 * 1000, ..m });
                        settled.retried += 1;
                    }
                }
            }
        }
        settled
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn queue(duplicate_rate: f64) -> QueueModel {
        let config = QueueConfig { max_batch: 3, max_retries: 2, delivery_ms: (0, 1_000), duplicate_rate };
        QueueModel::new(config, 42)
    }

    #[test]
    fn batches_hold_at_most_max_batch_deliverable_messages() {
        let mut q = queue(0.0);
        for i in 0..5 {
            q.send(0, json!(i));
        }
        assert!(q.take_batch(0).len() <= 3);
        let mut q = queue(0.0);
        for i in 0..5 {
            q.send(0, json!(i));
        }
        let first = q.take_batch(1_000);
        assert_eq!(first.len(), 3);
        let second = q.take_batch(1_000);
        assert_eq!(second.len(), 2);
        assert!(q.is_empty());
    }

    #[test]
    fn delivery_order_differs_from_send_order_for_some_seeds() {
        let reordered = (0..20).any(|seed| {
            let mut q = QueueModel::new(QueueConfig { max_batch: 100, ..QueueConfig::production() }, seed);
            for i in 0..10 {
                q.send(i * 10, json!(i));
            }
            let order: Vec<Value> = q.take_batch(10_000).into_iter().map(|m| m.body).collect();
            order != (0..10).map(|i| json!(i)).collect::<Vec<_>>()
        });
        assert!(reordered);
    }

    #[test]
    fn a_retried_message_returns_after_its_delay_and_is_dead_lettered_after_max_retries() {
        let mut q = queue(0.0);
        q.send(0, json!("m"));
        let retry = [Delivery::Retry { delay_secs: 5 }];
        let mut now = 1_000;
        for delivery in 1..=3 {
            let batch = q.take_batch(now);
            assert_eq!(batch.len(), 1, "delivery {delivery}");
            assert_eq!(batch[0].attempts, delivery);
            let settled = q.settle(now, batch, Some(&retry));
            if delivery < 3 {
                assert_eq!(settled.retried, 1);
                assert!(q.take_batch(now + 4_999).is_empty(), "not before its delay");
                now += 5_000;
            } else {
                assert_eq!(settled.dead_lettered, vec![json!("m")], "1 delivery + 2 retries, then the DLQ");
            }
        }
        assert!(q.is_empty());
    }

    #[test]
    fn a_failed_invocation_retries_the_whole_batch_and_acks_are_sometimes_redelivered() {
        let mut q = queue(0.0);
        q.send(0, json!(1));
        q.send(0, json!(2));
        let batch = q.take_batch(1_000);
        assert_eq!(q.settle(1_000, batch, None).retried, 2);
        assert_eq!(q.take_batch(1_000).len(), 2);

        let mut q = queue(1.0);
        q.send(0, json!(1));
        let batch = q.take_batch(1_000);
        assert_eq!(q.settle(1_000, batch, Some(&[Delivery::Ack])).duplicated, 1);
        assert_eq!(q.take_batch(10_000).len(), 1, "delivered twice");
    }
}
