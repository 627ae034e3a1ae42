//! Queue batches: each message becomes a buffer entry under its server, and dead-lettered
//! messages become failed tasks.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::join_all;
use serde_json::Value;
use vm_task_types::{wire::BufferedTask, TaskStatus, TimelineEvent, Timestamp};

use super::{decode_messages, ConsumerService, WORKER};
use crate::{store::paced, AppError, Clock, Ids, KvStore, QueueMessage};

/// What to do with one queue message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Ack,
    Retry { delay_secs: u32 },
}

impl<S: KvStore, B: KvStore, C: Clock, I: Ids> ConsumerService<'_, S, B, C, I> {
    /// Buffers one queue batch. Each message is acked once its buffer entry and its server's
    /// doorbell are written; otherwise it is retried, together with every later message for
    /// the same VM so the buffer never holds a VM's later task without its earlier one.
    pub async fn buffer_batch(&self, bodies: &[Value]) -> Vec<Delivery> {
        let now = self.clock.now();
        let retry = Delivery::Retry { delay_secs: self.config.retry_delay_secs };
        // Unreadable messages stay unreadable: retrying would only dead-letter them. Acked.
        let messages = decode_messages(bodies);
        // The KV writes of a batch go out together: one round trip of latency, not ten.
        let outcomes = join_all(messages.iter().map(|m| async move {
            match m {
                Some(message) => Some(self.buffer_one(message, now).await),
                None => None,
            }
        }))
        .await;
        let mut decisions = vec![Delivery::Ack; bodies.len()];
        let mut blocked_vms = BTreeSet::new();
        let mut by_server: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, (message, outcome)) in messages.iter().zip(outcomes).enumerate() {
            let (Some(message), Some(outcome)) = (message, outcome) else { continue };
            if blocked_vms.contains(&message.vm_name) {
                // An earlier task of this VM failed: redeliver this one too (its entry, if
                // written, is rewritten harmlessly), so neither is acked ahead of the other.
                decisions[i] = retry;
                continue;
            }
            match outcome {
                Ok(()) => by_server.entry(message.target_server.clone()).or_default().push(i),
                Err(_) => {
                    decisions[i] = retry;
                    blocked_vms.insert(message.vm_name.clone());
                }
            }
        }
        let rings = join_all(by_server.keys().map(|server| self.ring(server))).await;
        for ((_, indices), rung) in by_server.iter().zip(rings) {
            if rung.is_err() {
                for &i in indices {
                    decisions[i] = retry;
                }
            }
        }
        decisions
    }

    /// Writes the buffer entry; its server's doorbell rings after the batch.
    ///
    /// The task record is not read first: a task cancelled while queued is rare, and its
    /// entry is harmless, since a claim checks the record, refuses the task with 409 and drops
    /// the entry. Reading every record to catch that case cost each task a KV read.
    pub(super) async fn buffer_one(&self, message: &QueueMessage, now: Timestamp) -> Result<(), AppError> {
        if self.config.fault_fail_buffering_vm.as_deref() == Some(message.vm_name.as_str()) {
            return Err(AppError::Unavailable(format!("injected buffering fault for VM {}", message.vm_name)));
        }
        let entry = BufferedTask {
            task_id: message.task_id,
            kind: message.kind,
            vm_name: message.vm_name.clone(),
            target_server: message.target_server.clone(),
            previous_task_id: message.previous_task_id,
            created_at: message.created_at,
            buffered_at: now,
        };
        // Paced: a cancel racing the queue may have just deleted this key.
        paced(&self.clock, || self.buffer.put(&entry)).await
    }

    /// Handles messages that exhausted their deliveries: each task that is still pending and
    /// in no buffer becomes `failed` with the reason, so nothing the API accepted is ever
    /// silently lost; one that is buffered is left to its daemon (its doorbell rung again).
    pub async fn dead_letter_batch(&self, bodies: &[Value]) -> Vec<Delivery> {
        let mut decisions = Vec::with_capacity(bodies.len());
        for message in decode_messages(bodies) {
            let Some(message) = message else {
                decisions.push(Delivery::Ack);
                continue;
            };
            let outcome = async {
                let Some(mut task) = self.tasks.load(message.task_id).await? else { return Ok::<(), AppError>(()) };
                // A message can exhaust its deliveries after its entry was written (its doorbell
                // kept failing): the task is buffered and will be claimed, so it is not failed.
                if task.status == TaskStatus::Pending && self.buffer.get(&task.target_server, task.id).await?.is_some()
                {
                    self.ring(&task.target_server).await?;
                    return Ok(());
                }
                if task.status == TaskStatus::Pending {
                    let reason =
                        "could not be buffered for a host: the queue gave up after its retries (dead-lettered)";
                    task.error = Some(reason.into());
                    task.record(
                        self.clock.now(),
                        WORKER,
                        TimelineEvent::DeadLettered,
                        Some(TaskStatus::Failed),
                        reason,
                    );
                    self.save(&task).await?;
                }
                Ok(())
            }
            .await;
            decisions.push(match outcome {
                Ok(()) => Delivery::Ack,
                Err(_) => Delivery::Retry { delay_secs: 30 },
            });
        }
        decisions
    }
}
