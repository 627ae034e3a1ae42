//! Runs one task's operation against Arrakis and says how it ended.
//!
//! Every operation is an `ensure_*`: it first looks at the VM, so repeating an operation whose
//! effect is already there (a redelivered task, a retry after a daemon crash) succeeds with a
//! note instead of failing. Transient failures are retried with jittered exponential backoff
//! ([`crate::retry`]); each retry is recorded for the task's timeline. A command is never
//! re-sent once it may have reached the guest. What an error means comes from
//! `arrakis-client`'s typed errors, never from their wording here.

use std::{future::Future, time::Duration};

use arrakis_client::{ArrakisClient, ArrakisError, CommandOutput, FileUpload, StartVmRequest, VmInfo, VmStatus};
use tokio_util::sync::CancellationToken;
use vm_task_types::{
    wire::RetryNote, DownloadFiles, FileContent, LaunchVm, Limits, Operation, PortForward, RunCommand, SnapshotVm,
    Task, TaskResult, TimelineEvent, Timestamp, UploadFiles, VmState,
};

pub use crate::retry::RetryPolicy;
use crate::{
    guest_job::{parse_number, GuestJob},
    images::ImagePolicy,
    metrics::Metrics,
    retry::Jitter,
};

/// How often a long command's exit file is polled.
pub const LONG_COMMAND_POLL: Duration = Duration::from_secs(2);
/// How long a stopped command is given to record its exit before its output is read.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Exit code of a command stopped at its `timeoutSeconds` (as `timeout(1)` reports it).
pub const TIMED_OUT_EXIT_CODE: i32 = 124;
/// Largest serialized `files` result: the report's 64 KiB less room for the rest.
const DOWNLOAD_RESULT_MAX_BYTES: usize = 56 * 1024;

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
    /// A long command its client cancelled while it ran, stopped in the guest; the result
    /// holds the output so far.
    Cancelled(TaskResult),
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

/// Retry bookkeeping for one task, and the signal that its client cancelled it.
#[derive(Debug, Default)]
pub struct Attempts {
    pub notes: Vec<RetryNote>,
    /// Fired by the daemon when a heartbeat's answer says the client asked to cancel; a long
    /// command then stops in the guest.
    pub cancel: CancellationToken,
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
            Operation::RunCommand(cmd) if cmd.is_long() => self.run_long_command(task, cmd, attempts).await,
            Operation::RunCommand(cmd) => self.run_command(cmd, attempts).await,
            Operation::UploadFiles(upload) => self.upload(upload, attempts).await,
            Operation::DownloadFiles(download) => self.download(download, attempts).await,
        };
        match result {
            Ok(result) => Outcome::Completed(result),
            Err(Failure::Cancelled(result)) => Outcome::Cancelled(result),
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

    /// A running VM, or why the guest cannot be reached (Arrakis would hang 30 s and fail).
    async fn require_running(&self, name: &str, what: &str, attempts: &mut Attempts) -> Result<VmInfo, Failure> {
        let vm = self.require(name, attempts).await?;
        if vm.status != VmStatus::Running {
            return Err(Failure::Refused(format!(
                "VM {name:?} is {}; {what} only on a running VM",
                vm.status.as_str()
            )));
        }
        Ok(vm)
    }

    /// Writes every file, in order. Repeating it writes the same content again, so a retry
    /// (here, or of the whole task after a lost report) is harmless.
    async fn upload(&self, upload: &UploadFiles, attempts: &mut Attempts) -> Result<TaskResult, Failure> {
        let name = upload.vm_name.as_str();
        self.require_running(name, "files are written", attempts).await?;
        let files: Vec<FileUpload> = upload.files.iter().map(|f| FileUpload::new(&f.path, &f.content)).collect();
        match self.retrying(attempts, "upload", || self.arrakis.upload_files(name, &files)).await {
            Ok(()) => Ok(TaskResult { vm_state: Some(VmState::Running), ..TaskResult::default() }),
            // The guest agent's own 500 (BEHAVIOR §2.10), not a transport failure.
            Err(Failure::Arrakis(e)) if arrakis_message(&e).contains("request failed with status") => {
                Err(Failure::Refused(format!(
                    "the guest could not write one of the files (a missing parent directory? Arrakis creates none); \
                 the upload stopped there and files before it were written: {}",
                    arrakis_message(&e)
                )))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads every file whole, or fails saying which could not be read or that they do not
    /// fit the report: a copy arrives whole or not at all, never truncated.
    async fn download(&self, download: &DownloadFiles, attempts: &mut Attempts) -> Result<TaskResult, Failure> {
        let name = download.vm_name.as_str();
        self.require_running(name, "files are read", attempts).await?;
        let entries =
            self.retrying(attempts, "download", || self.arrakis.download_files(name, &download.paths)).await?;
        let unreadable: Vec<String> =
            entries.iter().filter_map(|e| e.error.as_ref().map(|error| format!("{}: {error}", e.path))).collect();
        if !unreadable.is_empty() {
            return Err(Failure::Refused(format!("could not read {}", unreadable.join("; "))));
        }
        let files: Vec<FileContent> =
            entries.into_iter().map(|e| FileContent { path: e.path, content: e.content }).collect();
        let content_bytes: usize = files.iter().map(|f| f.content.len()).sum();
        let json_bytes = serde_json::to_vec(&files).map(|v| v.len()).unwrap_or(usize::MAX);
        if content_bytes > Limits::DOWNLOAD_MAX_BYTES || json_bytes > DOWNLOAD_RESULT_MAX_BYTES {
            return Err(Failure::Refused(format!(
                "the files hold {content_bytes} bytes ({json_bytes} as JSON); a download brings back at most {} \
                 bytes ({DOWNLOAD_RESULT_MAX_BYTES} as JSON) so that its result fits the task's report; \
                 download fewer files, or split the file in the guest first",
                Limits::DOWNLOAD_MAX_BYTES
            )));
        }
        Ok(TaskResult { files: Some(files), vm_state: Some(VmState::Running), ..TaskResult::default() })
    }

    /// A command allowed longer than Arrakis's 30 s: started detached (or found already
    /// started by an earlier attempt of this task, whose daemon died), polled until it ends,
    /// its time limit passes, or its client cancels it ([`GuestJob`]).
    async fn run_long_command(
        &self,
        task: &Task,
        cmd: &RunCommand,
        attempts: &mut Attempts,
    ) -> Result<TaskResult, Failure> {
        let name = cmd.vm_name.as_str();
        self.require_running(name, "commands run", attempts).await?;
        let job = GuestJob::for_task(task.id);
        let (pid, resumed) = match self.job_pid(name, &job, attempts).await? {
            Some(pid) => {
                tracing::info!(pid, "an earlier attempt started this command; watching it instead of running it again");
                (pid, true)
            }
            None => (self.start_job(name, cmd, &job, attempts).await?, false),
        };
        // The limit counts from the task's first claim, so a resumed watch does not extend it.
        let started = task.timeline.iter().find(|e| e.kind() == Some(TimelineEvent::Claimed)).map(|e| e.at);
        let limit = Duration::from_secs(cmd.timeout());
        let elapsed = started.map(|at| Duration::from_millis(now().millis_since(at))).unwrap_or_default();
        let deadline = tokio::time::Instant::now() + limit.saturating_sub(elapsed);
        let ended = loop {
            if let Some(code) = self.job_exit(name, &job, attempts).await? {
                break Ending::Exited(code);
            }
            tokio::select! {
                () = attempts.cancel.cancelled() => break Ending::Cancelled,
                () = tokio::time::sleep_until(deadline) => break Ending::TimedOut,
                () = tokio::time::sleep(LONG_COMMAND_POLL) => {}
            }
        };
        let exit_code = match ended {
            Ending::Exited(code) => Some(code),
            Ending::Cancelled | Ending::TimedOut => {
                tracing::info!(pid, reason = ?ended, "stopping the command in the guest");
                self.guest_cmd(name, &GuestJob::stop_command(pid), attempts).await?;
                self.wait_for_exit(name, &job, attempts).await?
            }
        };
        let output = self.guest_cmd(name, &job.read_output_command(), attempts).await?;
        // Missing output means an earlier attempt reported and cleaned up already.
        let output = if output.exit_code == Some(0) { output.output } else { String::new() };
        let note = resumed.then(|| "watched a command an earlier attempt of this task had started".to_owned());
        let result = |exit_code: Option<i32>, error: Option<String>, note: Option<String>| TaskResult {
            output: Some(output.clone()),
            exit_code,
            error,
            note,
            vm_state: Some(VmState::Running),
            ..TaskResult::default()
        };
        let outcome = match ended {
            Ending::Exited(code) => Ok(result(Some(code), (code != 0).then(|| format!("exit status {code}")), note)),
            Ending::TimedOut => Ok(result(
                Some(TIMED_OUT_EXIT_CODE),
                Some(format!("timed out after {} s (timeoutSeconds); stopped in the guest", cmd.timeout())),
                note,
            )),
            Ending::Cancelled => Err(Failure::Cancelled(result(
                exit_code,
                None,
                Some("cancelled by its client while running; stopped in the guest".to_owned()),
            ))),
        };
        if let Err(e) = self.arrakis.run_command(name, &job.cleanup_command(), true).await {
            tracing::warn!(error = %e, "could not remove the command's files from the guest");
        }
        outcome
    }

    /// A short blocking guest command (reading or signalling a job), retried when transient:
    /// each is harmless to repeat.
    async fn guest_cmd(&self, name: &str, command: &str, attempts: &mut Attempts) -> Result<CommandOutput, Failure> {
        self.retrying(attempts, "cmd", || self.arrakis.run_command(name, command, true)).await
    }

    /// The pid of this task's job if an earlier attempt started it.
    async fn job_pid(&self, name: &str, job: &GuestJob, attempts: &mut Attempts) -> Result<Option<u32>, Failure> {
        let read = self.guest_cmd(name, &job.read_pid_command(), attempts).await?;
        Ok(if read.exit_code == Some(0) { parse_number(&read.output) } else { None })
    }

    /// The job's exit status once it has ended.
    async fn job_exit(&self, name: &str, job: &GuestJob, attempts: &mut Attempts) -> Result<Option<i32>, Failure> {
        let read = self.guest_cmd(name, &job.read_exit_command(), attempts).await?;
        Ok(if read.exit_code == Some(0) { parse_number(&read.output) } else { None })
    }

    /// Polls for the exit of a job just signalled, for up to [`STOP_GRACE`].
    async fn wait_for_exit(&self, name: &str, job: &GuestJob, attempts: &mut Attempts) -> Result<Option<i32>, Failure> {
        let until = tokio::time::Instant::now() + STOP_GRACE;
        loop {
            if let Some(code) = self.job_exit(name, job, attempts).await? {
                return Ok(Some(code));
            }
            if tokio::time::Instant::now() >= until {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Uploads the command and starts it detached; returns its pid.
    async fn start_job(
        &self,
        name: &str,
        cmd: &RunCommand,
        job: &GuestJob,
        attempts: &mut Attempts,
    ) -> Result<u32, Failure> {
        let script = [FileUpload::new(job.script_path(), &cmd.command)];
        self.retrying(attempts, "upload", || self.arrakis.upload_files(name, &script)).await?;
        let start = job.start_command();
        let started = self
            .retrying_when(attempts, "cmd", ArrakisError::command_not_delivered, || {
                self.arrakis.run_command(name, &start, false)
            })
            .await;
        // The pid file is written as the job starts; a start whose answer was lost may have
        // started it all the same.
        for _ in 0..20 {
            if let Some(pid) = self.job_pid(name, job, attempts).await? {
                return Ok(pid);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match started {
            Err(e) => Err(e),
            Ok(_) => Err(Failure::Refused("the command was started in the guest but never recorded its pid".into())),
        }
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
    /// Not a failure: the client cancelled a long command, stopped with this result.
    Cancelled(TaskResult),
}

/// How a long command's watch ended.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Exited(i32),
    Cancelled,
    TimedOut,
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
