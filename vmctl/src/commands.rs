//! What each subcommand does: build the request, call the API, wait when asked, print.
//!
//! Every command writes its result to `out` (stdout in the binary) and returns the exit code,
//! or an error the binary prints on stderr. Mutating commands print their task before
//! returning a failed task's error, so a script gets the record and the non-zero code.

use std::io::Write;

use clap::CommandFactory;
use serde_json::Value;
use uuid::Uuid;
use vm_task_types::{
    wire::TaskStatusResponse, DownloadFiles, FileContent, LaunchVm, Limits, Operation, RunCommand, SnapshotVm,
    TaskStatus, Timestamp, UploadFiles, VmConfig, VmRef,
};

use crate::{
    cli::{
        Cli, Command, CpArgs, CpDirection, ExecArgs, GlobalArgs, LaunchArgs, LsArgs, SnapshotArgs, SubmitArgs,
        TasksArgs, VmArgs,
    },
    client::{ApiClient, ListQuery, VmsQuery},
    error::{exit, CliError},
    render,
    spinner::Spinner,
};

/// Seconds each `?wait=` long poll may hold while vmctl waits for a task to finish.
const FINISH_POLL_SECS: u64 = 10;
/// Seconds each `?wait=` long poll may hold in `watch`: the longest a new event waits to show.
const WATCH_POLL_SECS: u64 = 1;
/// The least time between two polls of the same task.
const MIN_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs one command line. `Ok` carries the exit code (not always 0: `exec` passes the
/// command's through).
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<u8, CliError> {
    let Cli { global, command } = cli;
    if let Command::Completions { shell } = command {
        clap_complete::generate(shell, &mut Cli::command(), "vmctl", out);
        return Ok(exit::OK);
    }
    let mut session = Session { client: connect(&global)?, json: global.json, out };
    match command {
        Command::Launch(args) => session.lifecycle(launch_operation(&args), &args.submit).await,
        Command::Stop(args) => session.lifecycle(Operation::StopVm(vm_ref(&args)), &args.submit).await,
        Command::Pause(args) => session.lifecycle(Operation::PauseVm(vm_ref(&args)), &args.submit).await,
        Command::Resume(args) => session.lifecycle(Operation::ResumeVm(vm_ref(&args)), &args.submit).await,
        Command::Delete(args) => session.lifecycle(Operation::DeleteVm(vm_ref(&args)), &args.submit).await,
        Command::Snapshot(args) => session.lifecycle(snapshot_operation(&args), &args.submit).await,
        Command::Exec(args) => session.exec(&args).await,
        Command::Cp(args) => session.cp(&args).await,
        Command::Tasks(args) => session.tasks(&args).await,
        Command::Ls(args) => session.ls(&args).await,
        Command::Hosts(args) => session.hosts(args.server.as_deref()).await,
        Command::Task(args) => session.task(args.id).await,
        Command::Watch(args) => session.watch(args.id).await,
        Command::Cancel(args) => session.cancel(args.id).await,
        Command::Vm(args) => session.vm(&args.name).await,
        Command::Completions { .. } => unreachable!("answered above"),
    }
}

/// The client from the settings, or the setting that is missing.
pub fn connect(global: &GlobalArgs) -> Result<ApiClient, CliError> {
    let token = global.token.as_deref().map(str::trim).filter(|t| !t.is_empty()).ok_or(CliError::NoToken)?;
    ApiClient::new(&global.api_url, token)
}

fn launch_operation(args: &LaunchArgs) -> Operation {
    let mut config = VmConfig {
        kernel: args.kernel.clone(),
        rootfs: args.rootfs.clone(),
        initramfs: args.initramfs.clone(),
        entry_point: args.entry_point.clone(),
        snapshot_id: args.snapshot.clone(),
        ..VmConfig::default()
    };
    if let Some(memory) = &args.memory {
        config.extra.insert("memory".into(), Value::String(memory.clone()));
    }
    Operation::LaunchVm(LaunchVm {
        vm_name: args.name.clone(),
        vm_config: config,
        target_server: args.submit.server.clone(),
    })
}

fn vm_ref(args: &VmArgs) -> VmRef {
    VmRef { vm_name: args.name.clone(), target_server: args.submit.server.clone() }
}

fn snapshot_operation(args: &SnapshotArgs) -> Operation {
    Operation::SnapshotVm(SnapshotVm {
        vm_name: args.name.clone(),
        snapshot_id: args.id.clone(),
        target_server: args.submit.server.clone(),
    })
}

fn exec_operation(args: &ExecArgs) -> Operation {
    Operation::RunCommand(RunCommand {
        vm_name: args.name.clone(),
        command: args.command_line(),
        blocking: true,
        timeout_seconds: args.timeout,
        target_server: args.submit.server.clone(),
    })
}

/// A path in the VM: the local file's name when PATH is empty or a directory (`vm:` or
/// `vm:dir/`).
fn remote_path(path: &str, local: &str) -> String {
    if path.is_empty() || path.ends_with('/') {
        let name =
            std::path::Path::new(local).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        format!("{path}{name}")
    } else {
        path.to_owned()
    }
}

/// Where a download lands: LOCAL, or the remote file's name inside LOCAL when it is a
/// directory.
fn local_target(local: &str, remote: &str) -> std::path::PathBuf {
    let local = std::path::Path::new(local);
    match std::path::Path::new(remote).file_name() {
        Some(name) if local.is_dir() => local.join(name),
        _ => local.to_path_buf(),
    }
}

/// The task a `cp` submits. An upload reads the local file here: it must be UTF-8 text within
/// the API's limit, checked before anything is sent.
fn cp_operation(direction: &CpDirection, submit: &SubmitArgs) -> Result<Operation, CliError> {
    Ok(match direction {
        CpDirection::Upload { local, vm, path } => {
            let bytes = std::fs::read(local).map_err(|e| CliError::Local(format!("cannot read {local}: {e}")))?;
            let content = String::from_utf8(bytes).map_err(|_| {
                CliError::Local(format!(
                    "{local} is not UTF-8 text; a VM file's content travels as text: encode it first (e.g. `base64 {local} > {local}.b64`)"
                ))
            })?;
            if content.len() > Limits::UPLOAD_MAX_BYTES {
                return Err(CliError::Local(format!(
                    "{local} is {} bytes; a copy holds at most {} bytes: split it, or compress it and copy the base64",
                    content.len(),
                    Limits::UPLOAD_MAX_BYTES
                )));
            }
            Operation::UploadFiles(UploadFiles {
                vm_name: vm.clone(),
                files: vec![FileContent { path: remote_path(path, local), content }],
                target_server: submit.server.clone(),
            })
        }
        CpDirection::Download { vm, path, .. } => Operation::DownloadFiles(DownloadFiles {
            vm_name: vm.clone(),
            paths: vec![path.clone()],
            target_server: submit.server.clone(),
        }),
    })
}

/// The exit code `exec` returns for a finished command: its own, clamped to what a process
/// can return; 1 when the host reported an error without a code.
pub fn exec_exit_code(status: &TaskStatusResponse) -> u8 {
    let result = status.result.as_ref();
    match result.and_then(|r| r.exit_code) {
        Some(code) => code.clamp(0, 255) as u8,
        None if result.and_then(|r| r.error.as_ref()).is_some() => 1,
        None => exit::OK,
    }
}

/// Keeps polls at least [`MIN_POLL_INTERVAL`] apart, should an API answer a `?wait=` long
/// poll at once for a task that has not finished.
async fn pace(asked: tokio::time::Instant) {
    tokio::time::sleep_until(asked + MIN_POLL_INTERVAL).await;
}

fn failure(status: TaskStatus, task_id: Uuid, error: Option<String>) -> Result<(), CliError> {
    match status {
        TaskStatus::Failed | TaskStatus::Cancelled => Err(CliError::TaskFailed { task_id, status, error }),
        _ => Ok(()),
    }
}

struct Session<'a> {
    client: ApiClient,
    json: bool,
    out: &'a mut dyn Write,
}

impl Session<'_> {
    fn print_json(&mut self, value: &Value) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Output(e.to_string()))?;
        writeln!(self.out, "{text}")?;
        Ok(())
    }

    /// Submits and, unless `--no-wait`, waits for the task to finish.
    async fn submit(
        &mut self,
        operation: Operation,
        submit: &SubmitArgs,
    ) -> Result<Option<TaskStatusResponse>, CliError> {
        let label = format!("{} {}", operation.kind(), operation.vm_name());
        let created = self.client.submit(&operation, submit.callback_url.as_deref()).await?;
        let task_id = created.body.task_id;
        if submit.no_wait {
            if self.json {
                self.print_json(&created.json)?;
            } else {
                writeln!(self.out, "{task_id}")?;
            }
            return Ok(None);
        }
        let spinner = Spinner::start(format!("{label} (task {task_id})"), created.body.status.as_str());
        let finished = tokio::select! {
            finished = self.wait_until_finished(task_id, &spinner) => finished,
            _ = tokio::signal::ctrl_c() => Err(CliError::Interrupted { task_id }),
        };
        drop(spinner);
        let status = finished.map_err(|e| match e {
            CliError::Interrupted { .. } => e,
            other => CliError::WhileWaiting { task_id, source: Box::new(other) },
        })?;
        if self.json {
            self.print_json(&status.json)?;
        }
        Ok(Some(status.body))
    }

    async fn wait_until_finished(
        &self,
        task_id: Uuid,
        spinner: &Spinner,
    ) -> Result<crate::client::Answer<TaskStatusResponse>, CliError> {
        loop {
            let asked = tokio::time::Instant::now();
            let status = self.client.status(task_id, FINISH_POLL_SECS).await?;
            if status.body.status.is_terminal() {
                return Ok(status);
            }
            spinner.set(status.body.status.as_str());
            pace(asked).await;
        }
    }

    /// launch, stop, pause, resume, delete, snapshot.
    async fn lifecycle(&mut self, operation: Operation, submit: &SubmitArgs) -> Result<u8, CliError> {
        let Some(status) = self.submit(operation, submit).await? else { return Ok(exit::OK) };
        if !self.json {
            write!(self.out, "{}", render::task_status(&status))?;
        }
        failure(status.status, status.task_id, status.error)?;
        Ok(exit::OK)
    }

    async fn exec(&mut self, args: &ExecArgs) -> Result<u8, CliError> {
        let Some(status) = self.submit(exec_operation(args), &args.submit).await? else { return Ok(exit::OK) };
        if !self.json {
            if let Some(output) = status.result.as_ref().and_then(|r| r.output.as_ref()) {
                self.out.write_all(output.as_bytes())?;
            }
        }
        failure(status.status, status.task_id, status.error.clone())?;
        Ok(exec_exit_code(&status))
    }

    /// `cp LOCAL NAME:PATH` uploads, `cp NAME:PATH LOCAL` downloads; content byte for byte.
    async fn cp(&mut self, args: &CpArgs) -> Result<u8, CliError> {
        let direction = args.direction().map_err(CliError::Local)?;
        let operation = cp_operation(&direction, &args.submit)?;
        let Some(status) = self.submit(operation, &args.submit).await? else { return Ok(exit::OK) };
        failure(status.status, status.task_id, status.error.clone())?;
        match direction {
            CpDirection::Upload { local, vm, path } => {
                if !self.json {
                    writeln!(self.out, "{local} -> {vm}:{}", remote_path(&path, &local))?;
                }
            }
            CpDirection::Download { vm, path, local } => {
                let files = status.result.as_ref().and_then(|r| r.files.as_ref());
                let content =
                    files.and_then(|f| f.first()).map(|f| f.content.as_str()).ok_or_else(|| CliError::Protocol {
                        url: format!("task {}", status.task_id),
                        reason: "the result holds no file".into(),
                    })?;
                let target = local_target(&local, &path);
                std::fs::write(&target, content)
                    .map_err(|e| CliError::Local(format!("cannot write {}: {e}", target.display())))?;
                if !self.json {
                    writeln!(self.out, "{vm}:{path} -> {} ({} bytes)", target.display(), content.len())?;
                }
            }
        }
        Ok(exit::OK)
    }

    async fn tasks(&mut self, args: &TasksArgs) -> Result<u8, CliError> {
        let query = ListQuery {
            limit: args.limit,
            cursor: args.cursor.clone(),
            status: args.status,
            kind: args.kind,
            vm_name: args.vm.clone(),
            target_server: args.server.clone(),
        };
        let page = self.client.list(&query).await?;
        if self.json {
            return self.print_json(&page.json).map(|()| exit::OK);
        }
        write!(self.out, "{}", render::task_list(&page.body.tasks))?;
        if let Some(hint) = render::next_page_hint(&page.body, args.has_filters()) {
            eprintln!("{hint}");
        }
        Ok(exit::OK)
    }

    async fn ls(&mut self, args: &LsArgs) -> Result<u8, CliError> {
        let query = VmsQuery {
            limit: args.limit,
            cursor: args.cursor.clone(),
            server: args.server.clone(),
            state: args.state.clone(),
        };
        let page = self.client.vms(&query).await?;
        if self.json {
            return self.print_json(&page.json).map(|()| exit::OK);
        }
        write!(self.out, "{}", render::vm_list(&page.body.vms))?;
        if let Some(c) = &page.body.cursor {
            let partial = if page.body.partial { "this page is partial (scan budget); " } else { "" };
            eprintln!("{partial}more: vmctl ls --cursor {c} (with the same filters)");
        }
        Ok(exit::OK)
    }

    async fn hosts(&mut self, server: Option<&str>) -> Result<u8, CliError> {
        let page = self.client.hosts(server).await?;
        if self.json {
            return self.print_json(&page.json).map(|()| exit::OK);
        }
        write!(self.out, "{}", render::host_list(&page.body.hosts))?;
        Ok(exit::OK)
    }

    async fn task(&mut self, id: Uuid) -> Result<u8, CliError> {
        let answer = self.client.task(id, 0).await?;
        if self.json {
            self.print_json(&answer.json)?;
        } else {
            write!(self.out, "{}", render::task_detail(&answer.body.task))?;
        }
        Ok(exit::OK)
    }

    async fn watch(&mut self, id: Uuid) -> Result<u8, CliError> {
        tokio::select! {
            watched = self.follow(id) => watched,
            _ = tokio::signal::ctrl_c() => Err(CliError::Interrupted { task_id: id }),
        }
    }

    /// Prints timeline entries as they appear, then the finished task.
    async fn follow(&mut self, id: Uuid) -> Result<u8, CliError> {
        let (mut shown, mut previous): (usize, Option<Timestamp>) = (0, None);
        let mut first = true;
        loop {
            // The first read answers at once, so the history shows without waiting.
            let wait = if first { 0 } else { WATCH_POLL_SECS };
            let asked = tokio::time::Instant::now();
            let task = self.client.task(id, wait).await?.body.task;
            if first && !self.json {
                write!(self.out, "{}", render::watch_header(&task))?;
            }
            first = false;
            for entry in task.timeline.iter().skip(shown) {
                if self.json {
                    writeln!(
                        self.out,
                        "{}",
                        serde_json::to_string(entry).map_err(|e| CliError::Output(e.to_string()))?
                    )?;
                } else {
                    writeln!(self.out, "{}", render::watch_row(entry, previous))?;
                }
                previous = Some(entry.at);
            }
            shown = shown.max(task.timeline.len());
            self.out.flush()?;
            if !task.status.is_terminal() && wait > 0 {
                pace(asked).await;
            }
            if task.status.is_terminal() {
                let status = TaskStatusResponse::of(&task);
                if self.json {
                    self.print_json(&serde_json::to_value(&status).map_err(|e| CliError::Output(e.to_string()))?)?;
                } else {
                    writeln!(self.out)?;
                    write!(self.out, "{}", render::task_status(&status))?;
                }
                failure(task.status, task.id, task.error)?;
                return Ok(exit::OK);
            }
        }
    }

    async fn cancel(&mut self, id: Uuid) -> Result<u8, CliError> {
        let answer = self.client.cancel(id).await?;
        if self.json {
            return self.print_json(&answer.json).map(|()| exit::OK);
        }
        if answer.requested {
            writeln!(
                self.out,
                "cancel requested for task {id}: {}\nthe task's record tells how it ends: `vmctl watch {id}`",
                answer.message
            )?;
        } else {
            writeln!(self.out, "task {id} {}: {}", answer.status, answer.message)?;
        }
        Ok(exit::OK)
    }

    async fn vm(&mut self, name: &str) -> Result<u8, CliError> {
        let answer = self.client.vm_status(name).await?;
        if self.json {
            self.print_json(&answer.json)?;
        } else {
            write!(self.out, "{}", render::vm_status(&answer.body))?;
        }
        Ok(exit::OK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;
    use vm_task_types::{OperationKind, TaskResult};

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("vmctl").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn launch_builds_the_documented_payload() {
        let Command::Launch(args) =
            cli(&["launch", "vm-1", "--memory", "2G", "--server", "production", "--rootfs", "/r.img"]).command
        else {
            panic!()
        };
        let body = serde_json::to_value(launch_operation(&args)).unwrap();
        assert_eq!(
            body,
            json!({"type": "launch_vm", "payload": {"vmName": "vm-1", "targetServer": "production",
                   "vmConfig": {"rootfs": "/r.img", "memory": "2G"}}})
        );
        // What vmctl sends, the API's own parser accepts.
        assert_eq!(Operation::parse(&body).unwrap(), launch_operation(&args));
    }

    #[test]
    fn exec_and_snapshot_build_the_documented_payloads() {
        let Command::Exec(args) = cli(&["exec", "vm-1", "--", "echo", "hi;", "exit 3"]).command else { panic!() };
        assert_eq!(
            serde_json::to_value(exec_operation(&args)).unwrap(),
            json!({"type": "run_command", "payload": {"vmName": "vm-1", "command": "echo hi; exit 3", "blocking": true}})
        );
        let Command::Snapshot(args) = cli(&["snapshot", "vm-1", "--id", "s-1"]).command else { panic!() };
        assert_eq!(
            serde_json::to_value(snapshot_operation(&args)).unwrap(),
            json!({"type": "snapshot_vm", "payload": {"vmName": "vm-1", "snapshotId": "s-1"}})
        );
    }

    #[test]
    fn exec_exits_with_the_commands_code() {
        let mut status = TaskStatusResponse {
            success: true,
            task_id: Uuid::nil(),
            kind: OperationKind::RunCommand,
            status: TaskStatus::Completed,
            vm_name: "v".into(),
            target_server: "s".into(),
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            attempts: 1,
            previous_task_id: None,
            result: Some(TaskResult { exit_code: Some(3), error: Some("exit status 3".into()), ..Default::default() }),
            error: None,
        };
        assert_eq!(exec_exit_code(&status), 3);
        status.result = Some(TaskResult { exit_code: Some(300), ..Default::default() });
        assert_eq!(exec_exit_code(&status), 255);
        status.result = Some(TaskResult { error: Some("signal: killed".into()), ..Default::default() });
        assert_eq!(exec_exit_code(&status), 1);
        status.result = Some(TaskResult { output: Some("ok\n".into()), exit_code: Some(0), ..Default::default() });
        assert_eq!(exec_exit_code(&status), 0);
    }

    #[test]
    fn a_missing_or_blank_token_is_named_before_any_request() {
        let mut global = cli(&["vm", "v", "--token", " "]).global;
        assert!(matches!(connect(&global), Err(CliError::NoToken)));
        global.token = None;
        assert!(matches!(connect(&global), Err(CliError::NoToken)));
    }
}
