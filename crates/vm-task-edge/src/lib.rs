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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
}

impl QueueMessage {
    pub(crate) fn of(task: &vm_task_types::Task) -> Self {
        Self {
            task_id: task.id,
            kind: task.kind(),
            vm_name: task.vm_name().to_owned(),
            target_server: task.target_server.clone(),
            previous_task_id: task.previous_task_id,
            created_at: task.created_at,
        }
    }
}
