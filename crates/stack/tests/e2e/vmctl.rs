//! `vmctl` as a user runs it against the local stack: launch, exec with a non-zero exit code,
//! tasks with filters, task, watch, and cancelling a task aimed at a server no daemon serves
//! (once submitted with `--no-wait`, once while another `vmctl` waits on it).
//!
//! Drives the release binary `cargo xtask build` makes (`target/release/vmctl`).

use std::path::PathBuf;

use serde_json::Value;
use stack::{repo_root, Stack, StackOptions};

use crate::support::*;

#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    pub(crate) fn expect_code(self, code: i32) -> Self {
        assert_eq!(self.code, code, "{self:#?}");
        self
    }
}

pub(crate) fn binary() -> PathBuf {
    let path = StackOptions::default().resolved_bin_dir(&repo_root()).join("vmctl");
    assert!(path.exists(), "{} is missing: run `cargo xtask build`", path.display());
    path
}

/// `vmctl ARGS` with the stack's URL and token in an otherwise empty environment.
pub(crate) async fn vmctl(stack: &Stack, args: &[&str]) -> Run {
    run_vmctl(stack.api_url(), stack.client_token().to_owned(), args.iter().map(|a| a.to_string()).collect()).await
}

async fn vmctl_with_token(stack: &Stack, token: &str, args: &[&str]) -> Run {
    run_vmctl(stack.api_url(), token.to_owned(), args.iter().map(|a| a.to_string()).collect()).await
}

async fn run_vmctl(api_url: String, token: String, args: Vec<String>) -> Run {
    let output = tokio::process::Command::new(binary())
        .args(args)
        .env_clear()
        .env("API_URL", api_url)
        .env("API_TOKEN", token)
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .expect("vmctl runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub(crate) fn task_id(run: &Run) -> String {
    let id = run.stdout.trim();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "a task id: {run:#?}");
    id.to_owned()
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn vmctl_drives_the_stack_as_a_user_would() {
    let stack = start(StackOptions::default()).await;

    // Launch waits for the task and shows the VM's address.
    let launch = vmctl(&stack, &["--json", "launch", "cli-vm", "--server", "production", "--memory", "2G"]).await;
    let launch = launch.expect_code(0).json();
    assert_eq!(launch["status"], "completed", "{launch}");
    assert_eq!(launch["result"]["vmState"], "RUNNING", "{launch}");
    let launch_id = launch["taskId"].as_str().unwrap().to_owned();

    // exec prints the output and exits with the command's code.
    let run = vmctl(&stack, &["exec", "cli-vm", "--", "echo Hello from VM; exit 3"]).await.expect_code(3);
    assert_eq!(run.stdout, "Hello from VM\n", "{run:#?}");
    let run = vmctl(&stack, &["exec", "cli-vm", "--", "echo", "fine"]).await.expect_code(0);
    assert_eq!(run.stdout, "fine\n");

    // task shows the record and its timeline.
    let run = vmctl(&stack, &["task", &launch_id]).await.expect_code(0);
    for needle in ["launch_vm", "cli-vm", "RUNNING", "created", "claimed", "pending→processing", "processing→completed"]
    {
        assert!(run.stdout.contains(needle), "{needle}: {run:#?}");
    }

    // watch follows a running command to its end, event by event.
    let sleeper = task_id(&vmctl(&stack, &["exec", "cli-vm", "--no-wait", "--", "sleep 2; echo woke"]).await);
    let run = vmctl(&stack, &["watch", &sleeper]).await.expect_code(0);
    let claimed = run.stdout.find("pending→processing").expect("the claim is shown");
    let completed = run.stdout.find("processing→completed").expect("the completion is shown");
    assert!(claimed < completed, "{run:#?}");
    assert!(run.stdout.contains("status"), "{run:#?}");

    // tasks with filters: the VM's commands, and nothing of another type.
    let listed =
        vmctl(&stack, &["--json", "tasks", "--vm", "cli-vm", "--type", "run_command"]).await.expect_code(0).json();
    let tasks = listed["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3, "{listed}");
    assert!(tasks.iter().all(|t| t["vmName"] == "cli-vm" && t["type"] == "run_command"), "{listed}");
    let run = vmctl(&stack, &["tasks", "--status", "completed", "--limit", "2"]).await.expect_code(0);
    assert_eq!(run.stdout.lines().count(), 3, "a header and two rows: {run:#?}");

    // The registry's view of the VM.
    let run = vmctl(&stack, &["vm", "cli-vm"]).await.expect_code(0);
    assert!(run.stdout.contains("RUNNING") && run.stdout.contains("production"), "{run:#?}");

    // ls: the VM list, filtered by server and state on the API's side.
    let listed =
        vmctl(&stack, &["--json", "ls", "--server", "production", "--state", "running"]).await.expect_code(0).json();
    let vms = listed["vms"].as_array().unwrap();
    assert!(vms.iter().any(|v| v["vmName"] == "cli-vm"), "{listed}");
    assert!(vms.iter().all(|v| v["server"] == "production" && v["state"] == "RUNNING"), "{listed}");
    let listed = vmctl(&stack, &["--json", "ls", "--state", "stopped"]).await.expect_code(0).json();
    assert!(listed["vms"].as_array().unwrap().iter().all(|v| v["vmName"] != "cli-vm"), "{listed}");
    let run = vmctl(&stack, &["ls"]).await.expect_code(0);
    assert!(run.stdout.lines().any(|l| l.contains("cli-vm") && l.contains("production")), "{run:#?}");

    // A task aimed at a server no daemon serves stays pending until cancelled.
    let orphan = task_id(&vmctl(&stack, &["launch", "cli-orphan", "--server", "nowhere", "--no-wait"]).await);
    let run = vmctl(&stack, &["cancel", &orphan]).await.expect_code(0);
    assert_eq!(run.stdout, format!("task {orphan} cancelled: task cancelled\n"));
    let run = vmctl(&stack, &["task", &orphan]).await.expect_code(0);
    assert!(run.stdout.contains("pending→cancelled"), "{run:#?}");

    // Cancelling while another vmctl waits on the task: the waiting one exits 1 with the reason.
    let waiting = {
        let args = ["stop", "cli-orphan-2", "--server", "nowhere"].map(String::from).to_vec();
        tokio::spawn(run_vmctl(stack.api_url(), stack.client_token().to_owned(), args))
    };
    let waited_on = loop {
        let listed = vmctl(&stack, &["--json", "tasks", "--vm", "cli-orphan-2"]).await.expect_code(0).json();
        if let Some(id) = listed["tasks"][0]["id"].as_str() {
            break id.to_owned();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    vmctl(&stack, &["cancel", &waited_on]).await.expect_code(0);
    let run = waiting.await.unwrap().expect_code(1);
    assert!(run.stderr.contains(&format!("task {waited_on} cancelled: cancelled by client")), "{run:#?}");

    // A finished task cannot be cancelled: 409 with its status; a wrong token: 401.
    let run = vmctl(&stack, &["cancel", &launch_id]).await.expect_code(6);
    assert!(run.stderr.contains("conflict (409)") && run.stderr.contains("completed"), "{run:#?}");
    let run = vmctl_with_token(&stack, "wrong-token", &["tasks"]).await.expect_code(4);
    assert!(run.stderr.contains("check API_TOKEN or --token"), "{run:#?}");

    stack.shutdown().await.expect("the stack stops");
}
