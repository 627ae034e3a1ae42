//! The logic of the API worker and the consumer worker, free of `worker` and of any runtime.
//!
//! Each worker is a thin adapter: it turns a `worker::Request` into an [`http::Request`],
//! wraps its bindings in the [`ports`] traits and calls [`api::ApiService`] or
//! [`consumer::ConsumerService`]. Everything that decides something (routing, auth,
//! validation, the state machine, the KV key layout, ack or retry) lives here and is tested
//! natively with the in-memory ports of [`memory`].
//!
//! **Architecture invariant:** only this crate knows the KV key layout ([`keys`]).

pub mod api;
pub mod auth;
#[cfg(any(test, feature = "memory"))]
pub mod bad_input;
pub mod consumer;
pub mod counting;
pub mod dashboard;
mod error;
mod hosts;
pub mod http;
mod intents;
mod keys;
mod listing;
#[cfg(any(test, feature = "memory"))]
pub mod memory;
pub mod ports;
mod registry;
pub mod routes;
pub mod store;
pub mod webhooks;

pub(crate) use error::AppError;
pub use hosts::{record_from_poll as record_host_report, HOST_LIVE_SECS_DEFAULT};
pub use ports::{Clock, Ids, KvKey, KvPage, KvStore, StoreError, TaskQueue};

/// How long a KV write can take to be seen at another location (Cloudflare: "up to 60
/// seconds or more"; reads are cached per location for `cacheTtl`, 60 s by default). A read
/// made this long after a write sees it; the sweep waits this long past a lease's end before
/// it acts on the lease (ARCHITECTURE.md, "Consistency Model").
pub const KV_PROPAGATION_SECS: u64 = 60;

/// The queue message: enough to buffer the task without reading it back from KV.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueMessage {
    pub task_id: uuid::Uuid,
    #[serde(rename = "type")]
    pub kind: vm_task_types::OperationKind,
    pub vm_name: String,
    pub target_server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_task_id: Option<uuid::Uuid>,
    pub created_at: vm_task_types::Timestamp,
    /// The durable mode's messages: the task record as the API stored it, so the hand-off
    /// to the server's object reads nothing from KV (and waits on no propagation). Absent in
    /// the KV mode, and when the message would reach [`QueueMessage::RECORD_MAX_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none", with = "record_as_text")]
    pub task: Option<Box<vm_task_types::Task>>,
}

/// The record in a queue message, as JSON text: workers-rs hands a map inside a message to
/// JavaScript as a `Map`, which arrives empty (the first e2e run of the durable mode with the
/// record as a value hung: every message failed to parse and was retried). Text that does
/// not parse reads as no record, so the hand-off reads KV instead of retrying the message.
mod record_as_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use vm_task_types::Task;

    pub fn serialize<S: Serializer>(task: &Option<Box<Task>>, serializer: S) -> Result<S::Ok, S::Error> {
        match task {
            Some(task) => {
                let text = serde_json::to_string(task).map_err(serde::ser::Error::custom)?;
                serializer.serialize_some(&text)
            }
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Box<Task>>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        Ok(text.and_then(|text| serde_json::from_str(&text).ok()))
    }
}

impl QueueMessage {
    /// A record this large or larger is left out: Queues bill a message per 64 KB, and a
    /// record near the 64 KiB body limit would make it two.
    pub const RECORD_MAX_BYTES: usize = 48 * 1024;

    pub(crate) fn of(task: &vm_task_types::Task) -> Self {
        Self {
            task_id: task.id,
            kind: task.kind(),
            vm_name: task.vm_name().to_owned(),
            target_server: task.target_server.clone(),
            previous_task_id: task.previous_task_id,
            created_at: task.created_at,
            task: None,
        }
    }

    /// [`QueueMessage::of`], carrying the record when the message stays under
    /// [`QueueMessage::RECORD_MAX_BYTES`].
    pub(crate) fn with_record(task: &vm_task_types::Task) -> Self {
        let message = Self { task: Some(Box::new(task.clone())), ..Self::of(task) };
        match serde_json::to_vec(&message) {
            Ok(json) if json.len() < Self::RECORD_MAX_BYTES => message,
            _ => Self::of(task),
        }
    }
}
