//! Files and long commands through `vmctl` on the local stack (#14): a file copied into a VM
//! and back out arrives byte for byte; a 90 s command (three times Arrakis's 30 s limit)
//! completes with its output; a running long command cancelled with `vmctl cancel` ends
//! `cancelled` with what it printed so far, and the simulator shows its process gone.

use std::time::{Duration, Instant};

use reqwest::Method;
use stack::StackOptions;
use uuid::Uuid;
use vm_task_types::TaskStatus;

use crate::{
    support::*,
    vmctl::{task_id, vmctl},
};

/// The command lines of the guest processes of `vm` the simulator shows running.
async fn guest_processes(stack: &stack::Stack, vm: &str) -> Vec<String> {
    let state = sim(stack, Method::GET, "/_sim/state", None).await;
    let vms = state["vms"].as_array().cloned().unwrap_or_default();
    let vm = vms.iter().find(|v| v["vmName"] == vm).expect("the VM is in the simulator");
    vm["processes"].as_array().unwrap().iter().map(|p| p["command"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn files_go_in_and_out_unchanged_and_long_commands_complete_or_cancel() {
    let stack = start(StackOptions::default()).await;
    for vm in ["files-vm", "long-vm"] {
        vmctl(&stack, &["launch", vm, "--server", "production"]).await.expect_code(0);
    }

    // The 90 s command runs meanwhile, on its own VM.
    let started = Instant::now();
    let long = {
        let (url, token) = (stack.api_url(), stack.client_token().to_owned());
        tokio::spawn(async move {
            let output = tokio::process::Command::new(crate::vmctl::binary())
                .args(["exec", "long-vm", "--timeout", "120", "--", "echo start; sleep 90; echo end"])
                .env_clear()
                .env("API_URL", url)
                .env("API_TOKEN", token)
                .output()
                .await
                .expect("vmctl runs");
            (output, started.elapsed())
        })
    };

    // cp in and back out: text with quotes, backslashes, tabs, a control character, non-ASCII
    // and no final newline arrives byte for byte.
    let dir = std::env::temp_dir().join(format!("vmctl-cp-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let original: String = (0..300)
        .map(|i| format!("line {i}: \"quoted\" \\back\\slash\ttab ünïcödé \u{1} {{}}<>&\n"))
        .collect::<String>()
        + "no newline at the end";
    let local = dir.join("in.txt");
    std::fs::write(&local, &original).unwrap();
    let local = local.to_str().unwrap();
    let run = vmctl(&stack, &["cp", local, "files-vm:notes.txt"]).await.expect_code(0);
    assert!(run.stdout.contains("files-vm:notes.txt"), "{run:#?}");
    let back = dir.join("out.txt");
    let back = back.to_str().unwrap();
    vmctl(&stack, &["cp", "files-vm:notes.txt", back]).await.expect_code(0);
    assert_eq!(std::fs::read_to_string(back).unwrap(), original, "the copy round-trips unchanged");
    // A missing file: the task fails saying which, and nothing is written.
    let missing = dir.join("missing.txt");
    let run = vmctl(&stack, &["cp", "files-vm:nope.txt", missing.to_str().unwrap()]).await.expect_code(1);
    assert!(run.stderr.contains("nope.txt") && run.stderr.contains("no such file"), "{run:#?}");
    assert!(!missing.exists());

    // Cancel a running long command: it stops in the guest with what it printed so far.
    let id = task_id(
        &vmctl(&stack, &["exec", "files-vm", "--no-wait", "--timeout", "600", "--", "echo begun; sleep 500"]).await,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !guest_processes(&stack, "files-vm").await.iter().any(|c| c.contains("vmtask-")) {
        assert!(Instant::now() < deadline, "the command never started in the guest");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Both dispatch modes carry the cancel to the daemon through the heartbeat's answer.
    let asked = Instant::now();
    let run = vmctl(&stack, &["cancel", &id]).await.expect_code(0);
    assert!(run.stdout.contains("cancel requested"), "{run:#?}");
    wait_for_status(&stack, id.parse::<Uuid>().unwrap(), TaskStatus::Cancelled).await;
    let took = asked.elapsed();
    let task = vmctl(&stack, &["--json", "task", &id]).await.expect_code(0).json();
    let task = if task["task"].is_object() { task["task"].clone() } else { task };
    assert_eq!(task["result"]["output"], "begun\n", "{task}");
    assert_eq!(task["error"], "cancelled by client while running", "{task}");
    assert_eq!(guest_processes(&stack, "files-vm").await, Vec::<String>::new(), "nothing left running in the guest");
    eprintln!("cancel of a running long command: cancelled {took:?} after the request");

    // The 90 s command completed with its output and exit code.
    let (output, took) = long.await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout, "start\nend\n");
    assert!(took >= Duration::from_secs(90), "{took:?}");
    eprintln!("90 s command: vmctl exec returned after {took:?}");

    let _ = std::fs::remove_dir_all(&dir);
    stack.shutdown().await.expect("the stack stops");
}
