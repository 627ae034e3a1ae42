//! The command line: every subcommand, flag and environment variable `vmctl` understands.
//!
//! Only commands whose endpoints exist are here. `ls` (`GET /vms`) and `hosts` join
//! [`Command`] when the API serves them; each is one more variant, one more function in
//! `commands`, and one more table in `render`.

use clap::{builder::PossibleValuesParser, builder::TypedValueParser, Args, Parser, Subcommand};
use vm_task_types::{OperationKind, TaskStatus};

/// Where the local stack (`cargo xtask dev`) serves the API.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8787";

const EXIT_CODES: &str = "\
Settings come from flags, then the environment, then a .env file in this directory or a parent.

Exit codes: 0 done; 1 the task failed or was cancelled; 2 bad usage or a request the API
rejected (400, 413, 415, 422); 3 the API could not be reached or failed (5xx); 4 the token was
refused (401); 5 not found (404); 6 conflict (409). `exec` exits with the command's own code.";

#[derive(Debug, Parser)]
#[command(name = "vmctl", version, about = "Drive VMs through the VM task API", after_long_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Base URL of the API worker.
    #[arg(long, env = "API_URL", default_value = DEFAULT_API_URL, global = true)]
    pub api_url: String,
    /// Client bearer token (one of the API worker's `API_TOKENS`).
    #[arg(long, env = "API_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Launch a VM (boots fresh, or restores a snapshot with --snapshot).
    Launch(LaunchArgs),
    /// Stop a VM.
    Stop(VmArgs),
    /// Pause a running VM.
    Pause(VmArgs),
    /// Resume a paused VM.
    Resume(VmArgs),
    /// Delete a VM.
    Delete(VmArgs),
    /// Snapshot a VM.
    Snapshot(SnapshotArgs),
    /// Run a command in a VM; prints its output and exits with its exit code.
    Exec(ExecArgs),
    /// Copy a text file into a VM (`cp LOCAL NAME:PATH`) or out of one (`cp NAME:PATH LOCAL`).
    Cp(CpArgs),
    /// List tasks, newest first.
    Tasks(TasksArgs),
    /// Show a task with its timeline.
    Task(TaskIdArg),
    /// Follow a task's timeline live until it finishes.
    Watch(TaskIdArg),
    /// Cancel a task.
    Cancel(TaskIdArg),
    /// Show what the VM registry knows about a VM.
    Vm(VmNameArg),
    /// List VMs in the registry by name (server, state, ip, last task).
    Ls(LsArgs),
    /// List the hosts serving each server name, and whether they are live.
    Hosts(HostsArgs),
    /// Print a shell completion script (e.g. `vmctl completions bash > ~/.local/share/bash-completion/completions/vmctl`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

impl Command {
    /// The operation a mutating command submits; `None` for commands that only read.
    pub fn operation_kind(&self) -> Option<OperationKind> {
        Some(match self {
            Self::Launch(_) => OperationKind::LaunchVm,
            Self::Stop(_) => OperationKind::StopVm,
            Self::Pause(_) => OperationKind::PauseVm,
            Self::Resume(_) => OperationKind::ResumeVm,
            Self::Delete(_) => OperationKind::DeleteVm,
            Self::Snapshot(_) => OperationKind::SnapshotVm,
            Self::Exec(_) => OperationKind::RunCommand,
            Self::Cp(args) => match args.direction() {
                Ok(CpDirection::Upload { .. }) => OperationKind::UploadFiles,
                Ok(CpDirection::Download { .. }) => OperationKind::DownloadFiles,
                Err(_) => return None,
            },
            _ => return None,
        })
    }
}

/// Flags every mutating command shares.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Server whose daemon runs the task (default: where the VM registry has the VM, else the
    /// API's DEFAULT_TARGET_SERVER).
    #[arg(long, short = 's')]
    pub server: Option<String>,
    /// Print the task id at once instead of waiting for the task to finish.
    #[arg(long)]
    pub no_wait: bool,
    /// POST the task's terminal event here, signed (an https URL; README "Webhooks").
    #[arg(long, value_name = "URL")]
    pub callback_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct VmArgs {
    /// The VM's name.
    pub name: String,
    #[command(flatten)]
    pub submit: SubmitArgs,
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// The VM's name: 1-63 of [A-Za-z0-9._-], not starting with '.' or '-'.
    pub name: String,
    #[command(flatten)]
    pub submit: SubmitArgs,
    /// Memory for the VM, e.g. 2G (kept in vmConfig.memory).
    #[arg(long)]
    pub memory: Option<String>,
    /// Kernel image path on the host (default: the daemon's DEFAULT_KERNEL).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Root filesystem path on the host (default: the daemon's DEFAULT_ROOTFS).
    #[arg(long)]
    pub rootfs: Option<String>,
    /// Initramfs path on the host (default: the daemon's DEFAULT_INITRAMFS).
    #[arg(long)]
    pub initramfs: Option<String>,
    /// Entry point to run at boot.
    #[arg(long)]
    pub entry_point: Option<String>,
    /// Restore this snapshot instead of booting fresh.
    #[arg(long, value_name = "ID")]
    pub snapshot: Option<String>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The VM's name.
    pub name: String,
    /// Snapshot id (default: one generated by the API; Arrakis ids are single-use).
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub submit: SubmitArgs,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The VM's name.
    pub name: String,
    #[command(flatten)]
    pub submit: SubmitArgs,
    /// How long the command may run, 1-3600 s (default 30, Arrakis's own limit). Over 30 it
    /// runs detached in the guest and `vmctl cancel` can stop it while it runs.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: Option<u64>,
    /// The command, after `--`. Several words are joined with spaces (as ssh does), so quote
    /// shell syntax: `vmctl exec vm -- 'cd /tmp && ls'`.
    #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
#[command(after_long_help = "\
Exactly one side is NAME:PATH. Content is text (UTF-8), copied byte for byte; at most 48 KiB
per file (a task's message and report must hold it). In a VM, a relative PATH is under
/tmp/server_files; uploads may also name an absolute path, downloads always read under
/tmp/server_files. Parent directories in the VM are not created (`vmctl exec NAME -- mkdir -p DIR`).")]
pub struct CpArgs {
    /// `LOCAL` or `NAME:PATH`.
    pub source: String,
    /// `NAME:PATH` or `LOCAL`.
    pub destination: String,
    #[command(flatten)]
    pub submit: SubmitArgs,
}

/// Which way a `cp` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpDirection {
    Upload { local: String, vm: String, path: String },
    Download { vm: String, path: String, local: String },
}

/// `NAME:PATH` when the part before the first `:` is a valid VM name.
fn remote(arg: &str) -> Option<(String, String)> {
    let (name, path) = arg.split_once(':')?;
    vm_task_types::validate::check_vm_name("NAME", name).ok()?;
    Some((name.to_owned(), path.to_owned()))
}

impl CpArgs {
    pub fn direction(&self) -> Result<CpDirection, String> {
        match (remote(&self.source), remote(&self.destination)) {
            (None, Some((vm, path))) => Ok(CpDirection::Upload { local: self.source.clone(), vm, path }),
            (Some((vm, path)), None) => Ok(CpDirection::Download { vm, path, local: self.destination.clone() }),
            (Some(_), Some(_)) => Err("both sides name a VM (NAME:PATH); copy through a local file".into()),
            (None, None) => Err("neither side names a VM; write one side as NAME:PATH, e.g. my-vm:notes.txt".into()),
        }
    }
}

impl ExecArgs {
    /// The command line sent to the guest.
    pub fn command_line(&self) -> String {
        self.command.join(" ")
    }
}

#[derive(Debug, Clone, Args)]
#[command(after_long_help = "\
Filters are sent to the API as the query parameters status, type, vmName and targetServer. The
API examines at most 5,000 tasks per page, so a rare filter may print a short (even empty)
page marked partial with a cursor: --cursor continues from it.")]
pub struct TasksArgs {
    /// Tasks per page (1-1000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Continue from the cursor a previous listing printed.
    #[arg(long)]
    pub cursor: Option<String>,
    /// Only tasks in this status.
    #[arg(long, value_parser = status_parser())]
    pub status: Option<TaskStatus>,
    /// Only tasks of this operation type.
    #[arg(long = "type", value_parser = kind_parser())]
    pub kind: Option<OperationKind>,
    /// Only tasks on this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only tasks aimed at this server.
    #[arg(long)]
    pub server: Option<String>,
}

impl TasksArgs {
    pub fn has_filters(&self) -> bool {
        self.status.is_some() || self.kind.is_some() || self.vm.is_some() || self.server.is_some()
    }
}

#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// VMs per page (1-200).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=200))]
    pub limit: u16,
    /// Continue from the cursor a previous listing printed.
    #[arg(long)]
    pub cursor: Option<String>,
    /// Only VMs on this server.
    #[arg(long)]
    pub server: Option<String>,
    /// Only VMs in this state (running, paused, stopped, deleted).
    #[arg(long, value_parser = ["running", "paused", "stopped", "deleted", "RUNNING", "PAUSED", "STOPPED", "DELETED"])]
    pub state: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct HostsArgs {
    /// Only hosts serving this server name.
    #[arg(long)]
    pub server: Option<String>,
}

#[derive(Debug, Args)]
pub struct TaskIdArg {
    /// The task id (a UUID, as `launch --no-wait` or `tasks` print it).
    pub id: uuid::Uuid,
}

#[derive(Debug, Args)]
pub struct VmNameArg {
    /// The VM's name.
    pub name: String,
}

fn status_parser() -> impl TypedValueParser<Value = TaskStatus> {
    PossibleValuesParser::new(TaskStatus::ALL.map(TaskStatus::as_str))
        .map(|s| TaskStatus::parse(&s).expect("clap admits only listed values"))
}

fn kind_parser() -> impl TypedValueParser<Value = OperationKind> {
    PossibleValuesParser::new(OperationKind::ALL.map(OperationKind::as_str))
        .map(|s| OperationKind::parse(&s).expect("clap admits only listed values"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cp_goes_whichever_way_names_a_vm() {
        let direction = |a: &str, b: &str| {
            let Command::Cp(args) = parse(&["cp", a, b]).unwrap().command else { panic!() };
            args.direction()
        };
        assert_eq!(
            direction("./notes.txt", "vm-1:dir/notes.txt"),
            Ok(CpDirection::Upload { local: "./notes.txt".into(), vm: "vm-1".into(), path: "dir/notes.txt".into() })
        );
        assert_eq!(
            direction("vm-1:/tmp/server_files/out.log", "out.log"),
            Ok(CpDirection::Download {
                vm: "vm-1".into(),
                path: "/tmp/server_files/out.log".into(),
                local: "out.log".into()
            })
        );
        // A local path with a colon is not a VM unless the part before it is a VM name.
        assert!(matches!(direction("./a:b", "vm-1:x"), Ok(CpDirection::Upload { .. })));
        assert!(direction("vm-1:a", "vm-2:b").unwrap_err().contains("both sides"));
        assert!(direction("a", "b").unwrap_err().contains("NAME:PATH"));
    }

    #[test]
    fn exec_takes_a_timeout_within_the_apis_range() {
        let Command::Exec(args) = parse(&["exec", "vm-1", "--timeout", "90", "--", "sleep", "80"]).unwrap().command
        else {
            panic!()
        };
        assert_eq!(args.timeout, Some(90));
        assert!(parse(&["exec", "vm-1", "--timeout", "3601", "--", "true"]).is_err());
        assert!(parse(&["exec", "vm-1", "--timeout", "0", "--", "true"]).is_err());
    }

    #[test]
    fn launch_takes_its_config_flags_and_global_flags_anywhere() {
        let cli = parse(&[
            "launch",
            "vm-1",
            "--server",
            "production",
            "--memory",
            "2G",
            "--kernel",
            "/k",
            "--snapshot",
            "snap-1",
            "--json",
            "--no-wait",
            "--token",
            "t",
        ])
        .unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.token.as_deref(), Some("t"));
        let Command::Launch(args) = cli.command else { panic!() };
        assert_eq!(args.name, "vm-1");
        assert_eq!(args.submit.server.as_deref(), Some("production"));
        assert!(args.submit.no_wait);
        assert_eq!(args.memory.as_deref(), Some("2G"));
        assert_eq!(args.kernel.as_deref(), Some("/k"));
        assert_eq!(args.snapshot.as_deref(), Some("snap-1"));
    }

    #[test]
    fn exec_takes_the_command_after_a_double_dash_with_its_own_flags() {
        let cli = parse(&["exec", "vm-1", "--", "ls", "-la", "--json"]).unwrap();
        assert!(!cli.global.json, "flags after -- belong to the command");
        let Command::Exec(args) = cli.command else { panic!() };
        assert_eq!(args.command_line(), "ls -la --json");
        let err = parse(&["exec", "vm-1"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn tasks_filters_accept_only_known_statuses_and_types() {
        let cli =
            parse(&["tasks", "--status", "failed", "--type", "run_command", "--vm", "v", "--limit", "5"]).unwrap();
        let Command::Tasks(args) = cli.command else { panic!() };
        assert_eq!(args.status, Some(TaskStatus::Failed));
        assert_eq!(args.kind, Some(OperationKind::RunCommand));
        assert_eq!(args.limit, 5);
        assert!(args.has_filters());
        let err = parse(&["tasks", "--status", "done"]).unwrap_err().to_string();
        assert!(err.contains("pending") && err.contains("cancelled"), "{err}");
        assert!(parse(&["tasks", "--limit", "0"]).is_err());
        assert!(parse(&["tasks", "--limit", "1001"]).is_err());
    }

    #[test]
    fn task_ids_must_be_uuids() {
        let err = parse(&["task", "not-a-uuid"]).unwrap_err().to_string();
        assert!(err.contains("invalid value 'not-a-uuid'"), "{err}");
        assert!(parse(&["watch", "0190b5a4-3b7c-7def-8abc-0123456789ab"]).is_ok());
    }

    #[test]
    fn mutating_commands_name_their_operation() {
        let kinds: Vec<_> = [
            &["launch", "v"][..],
            &["delete", "v"],
            &["stop", "v"],
            &["pause", "v"],
            &["resume", "v"],
            &["snapshot", "v", "--id", "s"],
            &["exec", "v", "--", "true"],
            &["cp", "local.txt", "v:remote.txt"],
            &["cp", "v:remote.txt", "local.txt"],
        ]
        .iter()
        .map(|args| parse(args).unwrap().command.operation_kind().unwrap())
        .collect();
        assert_eq!(kinds, OperationKind::ALL.to_vec());
        assert_eq!(parse(&["vm", "v"]).unwrap().command.operation_kind(), None);
    }
}
