//! The VM registry: for each VM, the server that runs it, its last task, and its last known
//! state. Written once per submitted task (by the API), never by the daemon: the state is
//! folded in from finished lifecycle tasks when `GET /vm/:vmName/status` reads the registry
//! (and stored when a submission needs room in the list of unfolded tasks), so reporting a
//! result costs no extra KV write and a submission usually reads nothing but the registry.

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_task_types::{wire::VmSummary, OperationKind, PortForward, Task, TaskStatus, Timestamp, VmState};

/// Lifecycle tasks remembered while unfinished; beyond this the oldest are folded away.
const MAX_PENDING_LIFECYCLE: usize = 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VmRecord {
    pub(crate) vm_name: String,
    pub(crate) server: String,
    pub(crate) last_task_id: Uuid,
    pub(crate) last_task_kind: OperationKind,
    pub(crate) updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) known: Option<KnownState>,
    /// Lifecycle tasks submitted after `known` was established, oldest first.
    #[serde(default)]
    pub(crate) pending_lifecycle: Vec<Uuid>,
}

/// What a finished task established about the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct KnownState {
    pub(crate) state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) port_forwards: Option<Vec<PortForward>>,
    pub(crate) task_id: Uuid,
    pub(crate) at: Timestamp,
}

/// What folding one pending lifecycle task did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fold {
    /// The task is finished and has been taken into account.
    Done,
    /// The task is still running: stop folding to keep order.
    Stop,
}

impl VmRecord {
    /// Applies a finished lifecycle task to `known`. Unfinished tasks stop the fold.
    pub(crate) fn fold(&mut self, task: &Task) -> Fold {
        if !task.status.is_terminal() {
            return Fold::Stop;
        }
        if task.status == TaskStatus::Completed {
            let previous = self.known.take();
            let result = task.result.clone().unwrap_or_default();
            let state = result.vm_state.or_else(|| implied_state(task.kind())).unwrap_or(VmState::Running);
            let (ip, port_forwards) = match (task.kind(), state) {
                (_, VmState::Deleted) => (None, None),
                (OperationKind::LaunchVm, _) => (result.ip, result.port_forwards),
                _ => previous.map(|p| (p.ip, p.port_forwards)).unwrap_or((None, None)),
            };
            self.known = Some(KnownState { state, ip, port_forwards, task_id: task.id, at: task.updated_at });
        }
        Fold::Done
    }

    /// Whether noting a task of `kind` would push an unfolded lifecycle task out of the list.
    pub(crate) fn is_full_for(&self, kind: OperationKind) -> bool {
        kind.changes_vm_state() && self.pending_lifecycle.len() >= MAX_PENDING_LIFECYCLE
    }

    /// Notes a newly submitted task.
    pub(crate) fn push_task(&mut self, task: &Task) {
        self.last_task_id = task.id;
        self.last_task_kind = task.kind();
        self.updated_at = task.created_at;
        self.server = task.target_server.clone();
        if task.kind().changes_vm_state() {
            self.pending_lifecycle.push(task.id);
            let excess = self.pending_lifecycle.len().saturating_sub(MAX_PENDING_LIFECYCLE);
            self.pending_lifecycle.drain(..excess);
        }
    }

    /// The listing metadata of the entry (`GET /vms` filters and answers from it): well
    /// under KV's 1,024 bytes, since names are at most 63 bytes and port forwards stay out.
    pub(crate) fn summary(&self) -> VmSummary {
        VmSummary {
            vm_name: self.vm_name.clone(),
            server: self.server.clone(),
            state: self.known.as_ref().map(|k| k.state),
            ip: self.known.as_ref().and_then(|k| k.ip.clone()),
            last_task_id: self.last_task_id,
            last_task_kind: self.last_task_kind,
            updated_at: self.updated_at,
            unsettled: self.pending_lifecycle.len(),
            settled: self.pending_lifecycle.is_empty(),
        }
    }

    pub(crate) fn new_for(task: &Task) -> Self {
        let mut record = Self {
            vm_name: task.vm_name().to_owned(),
            server: task.target_server.clone(),
            last_task_id: task.id,
            last_task_kind: task.kind(),
            updated_at: task.created_at,
            known: None,
            pending_lifecycle: Vec::new(),
        };
        record.push_task(task);
        record
    }
}

fn implied_state(kind: OperationKind) -> Option<VmState> {
    match kind {
        OperationKind::LaunchVm | OperationKind::ResumeVm | OperationKind::SnapshotVm => Some(VmState::Running),
        OperationKind::StopVm => Some(VmState::Stopped),
        OperationKind::PauseVm => Some(VmState::Paused),
        OperationKind::DeleteVm => Some(VmState::Deleted),
        OperationKind::RunCommand | OperationKind::UploadFiles | OperationKind::DownloadFiles => None,
    }
}
