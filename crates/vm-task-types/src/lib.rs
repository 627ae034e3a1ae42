//! The task model and the wire contract of every HTTP endpoint.
//!
//! Every serde type here crosses a process boundary (edge ↔ daemon ↔ user), so changes must be
//! additive. This crate depends on neither `worker` nor `tokio`: it builds for wasm32 and
//! native alike.

pub mod operation;
pub mod status;
pub mod task;
pub mod time;
pub mod validate;
pub mod wire;

pub use operation::{
    DownloadFiles, FileContent, LaunchVm, Operation, OperationKind, RunCommand, SnapshotVm, UploadFiles, VmConfig,
    VmRef,
};
pub use status::{TaskStatus, TransitionError};
pub use task::{Claim, PortForward, Task, TaskResult, TaskSummary, TimelineEntry, TimelineEvent, VmState};
pub use time::Timestamp;
pub use validate::{FieldError, Limits};
