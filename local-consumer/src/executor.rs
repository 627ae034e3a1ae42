//! Runs one task's operation against Arrakis and says how it ended.
//!
//! Every operation is an `ensure_*`: it first looks at the VM, so repeating an operation whose
//! effect is already there (a redelivered task, a retry after a daemon crash) succeeds with a
//! note instead of failing. Transient failures are retried with jittered exponential backoff
//! ([`crate::retry`]); each retry is recorded for the task's timeline. A command is never
//! re-sent once it may have reached the guest. What an error means comes from
//! `arrakis-client`'s typed errors, never from their wording here.

use std::future::Future;

use arrakis_client::{ArrakisClient, ArrakisError, StartVmRequest, VmInfo, VmStatus};
use vm_task_types::{
    wire::RetryNote, LaunchVm, Operation, PortForward, RunCommand, SnapshotVm, Task, TaskResult, Timestamp, VmState,
};

pub use crate::retry::RetryPolicy;
use crate::{images::ImagePolicy, metrics::Metrics, retry::Jitter};

/// Runs a claimed task to an [`Outcome`]. The daemon's loop runs over this trait so its
/// scheduling can be tested (and simulated) with a fake executor.
pub trait Execute: Send + Sync + 'static {
    fn execute(&self, task: &Task, attempts: &mut Attempts) -> impl Future<Output = Outcome> + Send;
}

/// How a task ended on this host.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed(TaskResult),
    /// Arrakis's message, or ours when we refused to call it.
    Failed(String),
}

/// Kernel, rootfs and initramfs for launches that name none.
#[derive(Debug, Clone)]
pub struct BootDefaults {
    pub kernel: String,
    pub rootfs: String,
    pub initramfs: String,
}

#[derive(Debug, Clone)]
pub struct Executor {
    pub arrakis: ArrakisClient,
    pub defaults: BootDefaults,
    /// Where a task's own kernel, rootfs and initramfs may come from.
    pub images: ImagePolicy,
    pub retry: RetryPolicy,
    pub jitter: Jitter,
    pub metrics: Metrics,
}

/// A shared executor is an executor, so tests can keep a handle on the one the daemon uses.
impl<T: Execute> Execute for std::sync::Arc<T> {
    fn execute(&self, task: &Task, attempts: &mut Attempts) -> impl Future<Output = Outcome> + Send {
        T::execute(self, task, attempts)
    }
}

impl Execute for Executor {
    fn execute(&self, task: &Task, attempts: &mut Attempts) -> impl Future<Output = Outcome> + Send {
        Executor::execute(self, task, attempts)
    }
}

/// Retry bookkeeping for one task.
#[derive(Debug, Default)]
pub struct Attempts {
    pub notes: Vec<RetryNote>,
}

impl Executor {
    pub async fn execute(&self, task: &Task, attempts: &mut Attempts) -> Outcome {
        let server = task.target_server.as_str();
        let result = match &task.operation {
            Operation::LaunchVm(launch) => self.ensure_launched(launch, attempts).await,
            Operation::DeleteVm(vm) => self.ensure_deleted(&vm.vm_name, attempts).await,
            Operation::StopVm(vm) => self.ensure_stopped(&vm.vm_name, attempts).await,
            Operation::PauseVm(vm) => self.ensure_paused(&vm.vm_name, attempts).await,
            Operation::ResumeVm(vm) => self.ensure_resumed(&vm.vm_name, attempts).await,
            Operation::SnapshotVm(snapshot) => self.ensure_snapshot(snapshot, attempts).await,
            Operation::RunCommand(cmd) => self.run_command(cmd, attempts).await,
        };
        match result {
            Ok(result) => Outcome::Completed(result),
            Err(Failure::Arrakis(ArrakisError::NotFound { vm_name, .. })) => {
                Outcome::Failed(format!("VM {vm_name:?} does not exist on server {server:?}"))
            }
            Err(Failure::Arrakis(e)) => Outcome::Failed(arrakis_message(&e)),
            Err(Failure::Refused(message)) => Outcome::Failed(message),
        }
    }

    async fn ensure_launched(&self, launch: &LaunchVm, attempts: &mut Attempts) -> Result<TaskResult, Failure> {
        let name = launch.vm_name.as_str();
        let config = &launch.vm_config;
        // Before Arrakis sees anything: a client's path must not name a host device or secret.
        for (field, path) in [("kernel", &config.kernel), ("rootfs", &config.rootfs), ("initramfs", &config.initramfs)]
        {
            if let Some(path) = path {
                self.images.check(field, path).map_err(Failure::Refused)?;
            }
        }
        let existing = self.lookup(name, attempts).await?;
        if let Some(snapshot_id) = &config.snapshot_id {
            if let Some(vm) = existing {
                return Err(Failure::Refused(format!(
                    "cannot restore snapshot {snapshot_id:?} onto {name:?}: the VM exists ({}); delete it first",
                    vm.status.as_str()
                )));
            }
            let vm = self.start(&StartVmRequest::restore(name, snapshot_id), false, attempts).await?;
            return Ok(vm_result(&vm, Some(format!("restored from snapshot {snapshot_id}"))));
        }
        match existing {
            Some(vm) if vm.status == VmStatus::Running => Ok(vm_result(&vm, Some("VM was already running".into()))),
            // Arrakis boots a stopped VM and resumes a paused one when POSTed again.
            Some(vm) => {
                let note = format!("VM existed ({}); booted it", vm.status.as_str());
                let vm = self.start(&StartVmRequest::new(name), true, attempts).await?;
                Ok(vm_result(&vm, Some(note)))
            }
            None => {
                let request = StartVmRequest {
                    vm_name: name.to_owned(),
                    kernel: Some(config.kernel.clone().unwrap_or_else(|| self.defaults.kernel.clone())),
                    rootfs: Some(config.rootfs.clone().unwrap_or_else(|| self.defaults.rootfs.clone())),
                    initramfs: Some(config.initramfs.clone().unwrap_or_else(|| self.defaults.initramfs.clone())),
                    entry_point: config.entry_point.clone(),
                    snapshot_id: None,
                };
                let vm = self.start(&request, false, attempts).await?;
                Ok(vm_result(&vm, None))
            }
        }
    }

    /// POST /v1/vms with retries. A failed boot of a new VM can leave a registered zombie
    /// (BEHAVIOR §2.3): before retrying, and before reporting the failure, it is deleted.
    async fn start(&self, request: &StartVmRequest, existed: bool, attempts: &mut Attempts) -> Result<VmInfo, Failure> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.arrakis.start_vm(request).await {
                Ok(vm) => return Ok(vm),
                Err(e) => e,
            };
            self.metrics.arrakis_error(&error);
            if !existed {
                self.remove_zombie(&request.vm_name, attempts).await;
            }
            if !error.is_transient() || !self.retry.allows_retry_after(attempt) {
                return Err(Failure::Arrakis(error));
            }
            self.note_retry(attempts, attempt, "start", &error).await;
        }
    }

    /// Deletes the VM a failed boot left registered, if there is one. The check and the delete
    /// are retried (and recorded) like any call: a transient failure of the check must not
    /// leave the zombie in the way of the next start.
    async fn remove_zombie(&self, name: &str, attempts: &mut Attempts) {
        let zombie = match self.retrying(attempts, "get", || self.arrakis.get_vm(name)).await {
            Ok(zombie) => zombie,
            Err(Failure::Arrakis(e)) if e.is_not_found() => return,
            Err(e) => {
                tracing::warn!(vm = %name, error = ?e, "cannot tell whether the failed start left a VM behind");
                return;
            }
        };
        tracing::warn!(vm = %name, status = zombie.status.as_str(), "removing the VM a failed start left behind");
        if let Err(e) = self.retrying(attempts, "delete", || self.arrakis.delete_vm(name)).await {
            tracing::warn!(vm = %name, error = ?e, "could not remove the VM a failed start left behind");
        }
    }

    async fn ensure_deleted(&self, name: &str, attempts: &mut Attempts) -> Result<TaskResult, Failure> {
        let outcome = self.retrying(attempts, "delete", || self.arrakis.delete_vm(name)).await;
        let note = match outcome {
            Ok(()) => None,
            Err(Failure::Arrakis(e)) if e.is_not_found() => Some("VM was already gone".to_owned()),
            Err(e) => return Err(e),
        };
        Ok(TaskResult { vm_state: Some(VmState::Deleted), note, ..TaskResult::default() })
    }

    async fn ensure_stopped(&self, name: &str, attempts: &mut Attempts) -> Result<TaskResult, Failure> {
        let vm = self.require(name, attempts).await?;
        if vm.status == VmStatus::Stopped {
            return Ok(state_result(VmState::Stopped, Some("VM was already stopped")));
        }
        self.retrying(attempts, "stop", || self.arrakis.stop_vm(name)).await?;
        Ok(state_result(VmState::Stopped, None))
    }

    async fn ensure_paused(&self, name: &str, attempts: &mut Attempts) -> Result<TaskResult, Failure> {
        let vm = self.require(name, attempts).await?;
        match vm.status {
            VmStatus::Paused => return Ok(state_result(VmState::Paused, Some("VM was already paused"))),
            VmStatus::Stopped => {
                return Err(Failure::Refused(format!("VM {name:?} is STOPPED; only a running VM can be paused")))
            }
            _ => {}
        }
        self.retrying(attempts, "pause", || self.arrakis.pause_vm(name)).await?;
        Ok(state_result(VmState::Paused, None))
    }

    async fn ensure_resumed(&self, name: &str, attempts: &mut Attempts) -> Result<TaskResult, Failure> {
        let vm = self.require(name, attempts).await?;
        match vm.status {
            VmStatus::Running => return Ok(state_result(VmState::Running, Some("VM was already running"))),
            VmStatus::Stopped => {
                return Err(Failure::Refused(format!(
                    "VM {name:?} is STOPPED; resume_vm continues a paused VM, launch_vm boots a stopped one"
                )))
            }
            _ => {}
        }
        self.retrying(attempts, "resume", || self.arrakis.resume_vm(name)).await?;
        Ok(state_result(VmState::Running, None))
    }

    async fn ensure_snapshot(&self, snapshot: &SnapshotVm, attempts: &mut Attempts) -> Result<TaskResult, Failure> {
        let name = snapshot.vm_name.as_str();
        // The API assigns an id when the client gives none; a task without one is malformed.
        let id = snapshot
            .snapshot_id
            .clone()
            .ok_or_else(|| Failure::Refused("snapshot_vm task has no snapshotId".into()))?;
        let vm = self.require(name, attempts).await?;
        if vm.status != VmStatus::Running {
            return Err(Failure::Refused(format!(
                "VM {name:?} is {}; only a running VM can be snapshotted",
                vm.status.as_str()
            )));
        }
        let retries_before = attempts.notes.len();
        match self.retrying(attempts, "snapshot", || self.arrakis.snapshot_vm(name, &id)).await {
            Ok(created) => {
                Ok(TaskResult { snapshot_id: Some(created), vm_state: Some(VmState::Running), ..TaskResult::default() })
            }
            // An earlier attempt of this task may have created it before its answer was lost.
            Err(Failure::Arrakis(e)) if attempts.notes.len() > retries_before && e.is_already_exists() => {
                Ok(TaskResult {
                    snapshot_id: Some(id),
                    vm_state: Some(VmState::Running),
                    note: Some("snapshot was created by an earlier attempt".into()),
                    ..TaskResult::default()
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn run_command(&self, cmd: &RunCommand, attempts: &mut Attempts) -> Result<TaskResult, Failure> {
        let name = cmd.vm_name.as_str();
        let vm = self.require(name, attempts).await?;
        if vm.status != VmStatus::Running {
            // Arrakis would hang for 30 s and then fail; say why now.
            return Err(Failure::Refused(format!(
                "VM {name:?} is {}; commands run only on a running VM",
                vm.status.as_str()
            )));
        }
        let out = self
            .retrying_when(attempts, "cmd", ArrakisError::command_not_delivered, || {
                self.arrakis.run_command(name, &cmd.command, cmd.blocking)
            })
            .await?;
        Ok(TaskResult {
            output: Some(out.output),
            error: out.error,
            exit_code: out.exit_code,
            vm_state: Some(VmState::Running),
            ..TaskResult::default()
        })
    }

    /// The VM, or `None` when Arrakis does not know it.
    async fn lookup(&self, name: &str, attempts: &mut Attempts) -> Result<Option<VmInfo>, Failure> {
        match self.retrying(attempts, "get", || self.arrakis.get_vm(name)).await {
            Ok(vm) => Ok(Some(vm)),
            Err(Failure::Arrakis(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn require(&self, name: &str, attempts: &mut Attempts) -> Result<VmInfo, Failure> {
        self.retrying(attempts, "get", || self.arrakis.get_vm(name)).await
    }

    /// Calls `f` until it succeeds, fails for good, or runs out of retries.
    async fn retrying<T, F, Fut>(&self, attempts: &mut Attempts, call: &'static str, f: F) -> Result<T, Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ArrakisError>>,
    {
        self.retrying_when(attempts, call, ArrakisError::is_transient, f).await
    }

    /// [`retrying`](Self::retrying) with the rule for which failures may be retried.
    async fn retrying_when<T, F, Fut>(
        &self,
        attempts: &mut Attempts,
        call: &'static str,
        may_retry: fn(&ArrakisError) -> bool,
        f: F,
    ) -> Result<T, Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ArrakisError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if !e.is_not_found() {
                        self.metrics.arrakis_error(&e);
                    }
                    if !may_retry(&e) || !self.retry.allows_retry_after(attempt) {
                        return Err(Failure::Arrakis(e));
                    }
                    self.note_retry(attempts, attempt, call, &e).await;
                }
            }
        }
    }

    /// Records the failed call (`call` names the Arrakis operation) and waits before the retry.
    async fn note_retry(&self, attempts: &mut Attempts, attempt: u32, call: &str, error: &ArrakisError) {
        let delay = self.retry.delay(attempt, &self.jitter);
        tracing::warn!(attempt, call, delay_ms = delay.as_millis() as u64, error = %error, "transient Arrakis failure; retrying");
        attempts.notes.push(RetryNote { at: now(), attempt, error: format!("{call}: {error}") });
        tokio::time::sleep(delay).await;
    }
}

#[derive(Debug)]
enum Failure {
    Arrakis(ArrakisError),
    Refused(String),
}

impl From<ArrakisError> for Failure {
    fn from(e: ArrakisError) -> Self {
        Self::Arrakis(e)
    }
}

fn arrakis_message(e: &ArrakisError) -> String {
    match e {
        ArrakisError::Api { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn vm_result(vm: &VmInfo, note: Option<String>) -> TaskResult {
    TaskResult {
        vm_state: VmState::from_arrakis(vm.status.as_str()),
        ip: Some(vm.ip_address().to_owned()).filter(|ip| !ip.is_empty()),
        tap_device_name: Some(vm.tap_device_name.clone()).filter(|t| !t.is_empty()),
        port_forwards: Some(
            vm.port_forwards
                .iter()
                .filter_map(|p| {
                    Some(PortForward {
                        host_port: p.host_port_number()?,
                        guest_port: p.guest_port_number()?,
                        description: p.description.clone(),
                    })
                })
                .collect(),
        ),
        note,
        ..TaskResult::default()
    }
}

fn state_result(state: VmState, note: Option<&str>) -> TaskResult {
    TaskResult { vm_state: Some(state), note: note.map(str::to_owned), ..TaskResult::default() }
}

pub fn now() -> Timestamp {
    let ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Timestamp(ms)
}
