//! Typed access to both KV namespaces, over the key layout in [`crate::keys`].

use serde::{de::DeserializeOwned, Serialize};
use uuid::Uuid;
use vm_task_types::{wire::BufferedTask, Task, TaskStatus, TimelineEvent};

use crate::{
    intents::{CancelIntent, CancelSettlement, ClaimIntent},
    keys,
    registry::VmRecord,
    webhooks::{just_finished, FinishedHook},
    AppError, Clock, KvPage, KvStore,
};

/// Tries of a write that KV keeps refusing as a second write to its key within a second.
const PACED_TRIES: u32 = 3;
/// How long a refused write waits before its next try: the one-second window and a margin
/// for clocks that differ between the caller and KV.
pub(crate) const KEY_WINDOW_WAIT_MS: u64 = 1_100;

/// Runs a write; when KV refuses it because the key was written less than a second ago (429),
/// waits the window out on `clock` and tries again, [`PACED_TRIES`] times in all. Every key
/// of a task has one writer at a time (the API, then the claimer, then the reporter), so a
/// 429 means a hand-off came fast, and one wait clears it.
pub(crate) async fn paced<T, F, Fut>(clock: &impl Clock, mut write: F) -> Result<T, AppError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AppError>>,
{
    let mut tries = 1;
    loop {
        match write().await {
            Err(AppError::RateLimited(_)) if tries < PACED_TRIES => {
                tries += 1;
                clock.sleep_ms(KEY_WINDOW_WAIT_MS).await;
            }
            outcome => return outcome,
        }
    }
}

/// Carries out a cancel that [`settle_cancel`](crate::intents::settle_cancel) found certain
/// (`Cancel` or `FailUnknown`): the record becomes terminal at `now` (the moment it became
/// certain) and the buffer entry goes. Anything else leaves the task as it is.
pub(crate) async fn apply_cancel_settlement<S: KvStore, B: KvStore>(
    tasks: &TaskStore<S>,
    buffer: &BufferStore<B>,
    clock: &impl Clock,
    mut task: Task,
    intent: &CancelIntent,
    settlement: CancelSettlement,
) -> Result<Task, AppError> {
    let now = clock.now();
    match settlement {
        CancelSettlement::Cancel => {
            let note = format!("{} (requested at {}; no claim took the task)", intent.message, intent.at);
            task.claim = None;
            task.error = Some(intent.message.clone());
            task.record(now, "client", TimelineEvent::Cancelled, Some(TaskStatus::Cancelled), note);
        }
        CancelSettlement::FailUnknown => {
            let reason = format!(
                "cancel requested at {} after attempt {} of the task, whose lease ended without a report: \
                 it will not run again, and whether that attempt reached Arrakis is unknown",
                intent.at, task.attempts
            );
            task.claim = None;
            task.error = Some(reason.clone());
            task.record(now, "client", TimelineEvent::Failed, Some(TaskStatus::Failed), reason);
        }
        CancelSettlement::Wait { .. } | CancelSettlement::ClaimWon(_) => return Ok(task),
    }
    paced(clock, || tasks.save(&task)).await?;
    paced(clock, || buffer.remove(&task.target_server, task.id)).await?;
    Ok(task)
}

/// `TASK_STORAGE`: task records, the VM registry and idempotency records.
pub struct TaskStore<S> {
    pub(crate) kv: S,
    /// Told of every write that makes a task terminal (the webhooks' producer).
    finished: Option<Box<dyn FinishedHook>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for TaskStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskStore").field("kv", &self.kv).field("webhooks", &self.finished.is_some()).finish()
    }
}

impl<S: KvStore> TaskStore<S> {
    pub fn new(kv: S) -> Self {
        Self { kv, finished: None }
    }

    /// A store whose writes that make a task terminal call `hook` afterwards: the one place
    /// every terminal writer (API, consumer, sweep, dead letters, the host queue object) goes
    /// through, so none can forget the task's webhook.
    pub fn with_webhooks(kv: S, hook: Box<dyn FinishedHook>) -> Self {
        Self { kv, finished: Some(hook) }
    }

    /// The task with this id; `None` for unknown ids, including UUIDs that are not v7.
    pub async fn load(&self, id: Uuid) -> Result<Option<Task>, AppError> {
        let Some(key) = keys::task(id) else { return Ok(None) };
        self.get_json(&key).await
    }

    /// Like [`load`](Self::load), but a missing task is a 404.
    pub(crate) async fn require(&self, id: Uuid) -> Result<Task, AppError> {
        self.load(id).await?.ok_or_else(|| AppError::NotFound(format!("task {id} not found")))
    }

    /// Writes the record with its summary as metadata: one KV write. When this write made the
    /// task terminal, the webhook hook runs after it (never before: the event must not delay
    /// or risk the task's own write).
    pub async fn save(&self, task: &Task) -> Result<(), AppError> {
        self.write(task).await?;
        if let Some(hook) = &self.finished {
            if just_finished(task) {
                hook.task_finished(self, task).await;
            }
        }
        Ok(())
    }

    /// [`save`](Self::save) without the hook: one KV write.
    pub(crate) async fn write(&self, task: &Task) -> Result<(), AppError> {
        let key = keys::task(task.id)
            .ok_or_else(|| AppError::Unavailable(format!("task id {} is not a v7 UUID", task.id)))?;
        let metadata = serde_json::to_value(task.summary()).map_err(|e| AppError::Unavailable(e.to_string()))?;
        let value = serde_json::to_string(task).map_err(|e| AppError::Unavailable(e.to_string()))?;
        self.kv.put(&key, &value, Some(&metadata)).await?;
        Ok(())
    }

    /// One page of task summaries (key metadata), newest first.
    pub async fn list(&self, limit: usize, cursor: Option<&str>) -> Result<KvPage, AppError> {
        Ok(self.kv.list(keys::TASK_PREFIX, limit, cursor).await?)
    }

    pub(crate) async fn vm(&self, vm_name: &str) -> Result<Option<VmRecord>, AppError> {
        self.get_json(&keys::vm(vm_name)).await
    }

    /// Writes the registry entry with its summary as listing metadata: one KV write.
    pub(crate) async fn save_vm(&self, record: &VmRecord) -> Result<(), AppError> {
        let metadata = serde_json::to_value(record.summary()).map_err(|e| AppError::Unavailable(e.to_string()))?;
        let value = serde_json::to_string(record).map_err(|e| AppError::Unavailable(e.to_string()))?;
        Ok(self.kv.put(&keys::vm(&record.vm_name), &value, Some(&metadata)).await?)
    }

    pub(crate) async fn cancel_intent(&self, id: Uuid) -> Result<Option<CancelIntent>, AppError> {
        self.get_json(&keys::cancel_intent(id)).await
    }

    /// The intent, with its time as listing metadata so the sweep finds intents due for
    /// settling without reading each ([`CancelIntent::listed_at`]).
    pub(crate) async fn put_cancel_intent(&self, id: Uuid, intent: &CancelIntent) -> Result<(), AppError> {
        let text = serde_json::to_string(intent).map_err(|e| AppError::Unavailable(e.to_string()))?;
        let metadata = serde_json::json!({ "at": intent.at });
        Ok(self.kv.put(&keys::cancel_intent(id), &text, Some(&metadata)).await?)
    }

    /// One page of standing cancel intents: task id and the intent's time when listed with it.
    pub(crate) async fn list_cancel_intents(
        &self,
        cursor: Option<&str>,
    ) -> Result<(Vec<(Uuid, Option<vm_task_types::Timestamp>)>, KvPage), AppError> {
        let page = self.kv.list(keys::CANCEL_PREFIX, 1000, cursor).await?;
        let intents = page
            .keys
            .iter()
            .filter_map(|k| {
                let id = k.name.strip_prefix(keys::CANCEL_PREFIX)?.parse().ok()?;
                Some((id, CancelIntent::listed_at(k.metadata.as_ref())))
            })
            .collect();
        Ok((intents, page))
    }

    pub(crate) async fn drop_cancel_intent(&self, id: Uuid) -> Result<(), AppError> {
        Ok(self.kv.delete(&keys::cancel_intent(id)).await?)
    }

    pub(crate) async fn claim_intent(&self, id: Uuid) -> Result<Option<ClaimIntent>, AppError> {
        self.get_json(&keys::claim_intent(id)).await
    }

    pub(crate) async fn put_claim_intent(&self, id: Uuid, intent: &ClaimIntent) -> Result<(), AppError> {
        self.put_json(&keys::claim_intent(id), intent).await
    }

    pub(crate) async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AppError> {
        match self.kv.get(key).await? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| AppError::Unavailable(format!("stored record {key} is unreadable: {e}"))),
        }
    }

    pub(crate) async fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), AppError> {
        let text = serde_json::to_string(value).map_err(|e| AppError::Unavailable(e.to_string()))?;
        Ok(self.kv.put(key, &text, None).await?)
    }
}

/// `TASK_BUFFER`: per-server ready entries and doorbells.
#[derive(Debug)]
pub struct BufferStore<B> {
    pub(crate) kv: B,
}

impl<B: KvStore> BufferStore<B> {
    pub fn new(kv: B) -> Self {
        Self { kv }
    }

    pub(crate) async fn put(&self, entry: &BufferedTask) -> Result<(), AppError> {
        let metadata = serde_json::to_value(entry).map_err(|e| AppError::Unavailable(e.to_string()))?;
        self.kv.put(&keys::ready(&entry.target_server, entry.task_id), "", Some(&metadata)).await?;
        Ok(())
    }

    pub(crate) async fn get(&self, server: &str, id: Uuid) -> Result<Option<BufferedTask>, AppError> {
        let found = self.kv.get_with_metadata(&keys::ready(server, id)).await?;
        Ok(found.and_then(|(_, metadata)| metadata).and_then(|m| serde_json::from_value(m).ok()))
    }

    pub(crate) async fn remove(&self, server: &str, id: Uuid) -> Result<(), AppError> {
        Ok(self.kv.delete(&keys::ready(server, id)).await?)
    }

    /// One page of buffered entries under `prefix`, oldest first, decoded from metadata only.
    pub(crate) async fn list(
        &self,
        prefix: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<BufferedTask>, KvPage), AppError> {
        let page = self.kv.list(prefix, limit, cursor).await?;
        let tasks =
            page.keys.iter().filter_map(|k| k.metadata.clone().and_then(|m| serde_json::from_value(m).ok())).collect();
        Ok((tasks, page))
    }

    /// The server's doorbell; `"0"` before the first ring, so it is never empty.
    pub(crate) async fn bell(&self, server: &str) -> Result<String, AppError> {
        Ok(self.kv.get(&keys::bell(server)).await?.filter(|b| !b.is_empty()).unwrap_or_else(|| "0".into()))
    }

    pub(crate) async fn ring(&self, server: &str, value: &str) -> Result<(), AppError> {
        Ok(self.kv.put(&keys::bell(server), value, None).await?)
    }
}
