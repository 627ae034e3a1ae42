//! Files and long commands against the in-process simulator: a file uploaded and read back
//! unchanged, limits that end a download `failed` saying why, a long command watched to its
//! end, stopped at its limit or by its client's cancel (and gone from the guest), and a
//! daemon that restarts mid-command watching the job the previous one started instead of
//! running it again.

mod against_sim;

use std::time::Duration;

use against_sim::executor;
use arrakis_sim::SimConfig;
use local_consumer::executor::{Attempts, Outcome, TIMED_OUT_EXIT_CODE};
use serde_json::{json, Value};
use vm_task_types::Task;

const TASK_ID: &str = "01937a2e-7000-7000-8000-0000000000aa";

/// A claimed task; the long command's limit counts from its `claimed` entry (now).
fn task(kind: &str, payload: Value) -> Task {
    let now = local_consumer::executor::now().to_string();
    serde_json::from_value(json!({
        "id": TASK_ID,
        "type": kind,
        "payload": payload,
        "status": "processing",
        "targetServer": "production",
        "createdAt": now,
        "updatedAt": now,
        "timeline": [{"at": now, "actor": "host-a", "event": "claimed", "from": "pending", "to": "processing"}]
    }))
    .unwrap()
}

/// A simulator whose guest time runs at `scale` of real time, with a running VM `vm`.
async fn sim_with_vm(scale: f64) -> arrakis_sim::SimHandle {
    let handle = arrakis_sim::spawn(SimConfig::for_tests().with_time_scale(scale)).await;
    let launch = task("launch_vm", json!({"vmName": "vm"}));
    let outcome = executor(&handle.url()).execute(&launch, &mut Attempts::default()).await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
    handle
}

fn guest_processes(handle: &arrakis_sim::SimHandle) -> Vec<String> {
    handle.sim.state().vms[0].processes.iter().map(|p| p.command.clone()).collect()
}

#[tokio::test]
async fn a_file_goes_in_and_comes_back_unchanged_and_the_limits_fail_clearly() {
    let handle = sim_with_vm(0.001).await;
    let executor = executor(&handle.url());
    let content = "line one\n\ttabbed \"quoted\" ünïcödé \\ backslash\n\u{1}control\nno newline at end";
    let upload = task(
        "upload_files",
        json!({"vmName": "vm", "files": [{"path": "notes.txt", "content": content}, {"path": "/tmp/abs.txt", "content": "abs"}]}),
    );
    let outcome = executor.execute(&upload, &mut Attempts::default()).await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
    assert_eq!(handle.sim.vm_file("vm", "/tmp/server_files/notes.txt").as_deref(), Some(content));
    assert_eq!(handle.sim.vm_file("vm", "/tmp/abs.txt").as_deref(), Some("abs"), "absolute paths are used as given");
    // Repeating the upload (a retried task) writes the same content again.
    assert!(matches!(executor.execute(&upload, &mut Attempts::default()).await, Outcome::Completed(_)));

    let download = task("download_files", json!({"vmName": "vm", "paths": ["notes.txt"]}));
    let Outcome::Completed(result) = executor.execute(&download, &mut Attempts::default()).await else { panic!() };
    let files = result.files.expect("files");
    assert_eq!((files[0].path.as_str(), files[0].content.as_str()), ("notes.txt", content));

    let missing = task("download_files", json!({"vmName": "vm", "paths": ["notes.txt", "nope.txt"]}));
    let Outcome::Failed(reason) = executor.execute(&missing, &mut Attempts::default()).await else { panic!() };
    assert!(reason.contains("nope.txt") && reason.contains("no such file"), "{reason}");

    // A missing parent directory stops the upload at that file; earlier files stay written.
    let upload = task(
        "upload_files",
        json!({"vmName": "vm", "files": [{"path": "first.txt", "content": "1"}, {"path": "no/such/dir.txt", "content": "2"}]}),
    );
    let Outcome::Failed(reason) = executor.execute(&upload, &mut Attempts::default()).await else { panic!() };
    assert!(reason.contains("parent directory"), "{reason}");
    assert_eq!(handle.sim.vm_file("vm", "first.txt").as_deref(), Some("1"));

    // 40 KiB twice is within the upload limit each time, over the download limit together.
    let big = "x".repeat(40 * 1024);
    for name in ["big1", "big2"] {
        let upload = task("upload_files", json!({"vmName": "vm", "files": [{"path": name, "content": big}]}));
        assert!(matches!(executor.execute(&upload, &mut Attempts::default()).await, Outcome::Completed(_)));
    }
    let download = task("download_files", json!({"vmName": "vm", "paths": ["big1", "big2"]}));
    let Outcome::Failed(reason) = executor.execute(&download, &mut Attempts::default()).await else { panic!() };
    assert!(reason.contains("81920 bytes") && reason.contains("at most 49152"), "{reason}");
}

#[tokio::test]
async fn a_long_command_runs_detached_and_reports_its_output_and_exit_code() {
    // 1 guest second = 10 ms: the 60 s command takes 0.6 s, past the proxy's 50 ms.
    let handle = sim_with_vm(0.01).await;
    let command = task(
        "run_command",
        json!({"vmName": "vm", "command": "echo start; sleep 60; echo end; exit 7", "timeoutSeconds": 120}),
    );
    let Outcome::Completed(result) = executor(&handle.url()).execute(&command, &mut Attempts::default()).await else {
        panic!()
    };
    assert_eq!(result.output.as_deref(), Some("start\nend\n"));
    assert_eq!(result.exit_code, Some(7));
    assert_eq!(result.error.as_deref(), Some("exit status 7"));
    assert!(guest_processes(&handle).is_empty(), "{:?}", guest_processes(&handle));
    let files = handle.sim.state().vms[0].files.clone();
    assert!(!files.iter().any(|f| f.ends_with(".sh") || f.ends_with(".out")), "script and output removed: {files:?}");
}

#[tokio::test]
async fn a_cancelled_long_command_stops_in_the_guest_with_its_output_so_far() {
    let handle = sim_with_vm(1.0).await;
    let command =
        task("run_command", json!({"vmName": "vm", "command": "echo begun; sleep 600", "timeoutSeconds": 900}));
    let executor = executor(&handle.url());
    let mut attempts = Attempts::default();
    let cancel = attempts.cancel.clone();
    let run = tokio::spawn(async move { executor.execute(&command, &mut attempts).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(guest_processes(&handle).iter().any(|c| c.contains("vmtask-")), "{:?}", guest_processes(&handle));
    cancel.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(10), run).await.expect("stops promptly").unwrap();
    let Outcome::Cancelled(result) = outcome else { panic!("{outcome:?}") };
    assert_eq!(result.output.as_deref(), Some("begun\n"));
    assert_eq!(result.exit_code, Some(143), "killed by SIGTERM");
    assert!(guest_processes(&handle).is_empty(), "nothing left running: {:?}", guest_processes(&handle));
}

#[tokio::test]
async fn a_long_command_past_its_limit_is_stopped_and_says_so() {
    let handle = sim_with_vm(1.0).await;
    let mut command =
        task("run_command", json!({"vmName": "vm", "command": "echo tick; sleep 600", "timeoutSeconds": 40}));
    // Claimed 38 s ago: 2 s of its limit remain.
    let claimed = local_consumer::executor::now().0 - 38_000;
    command.timeline[0].at = vm_task_types::Timestamp(claimed);
    let started = std::time::Instant::now();
    let outcome = executor(&handle.url()).execute(&command, &mut Attempts::default()).await;
    let Outcome::Completed(result) = outcome else { panic!("{outcome:?}") };
    assert_eq!(result.exit_code, Some(TIMED_OUT_EXIT_CODE));
    assert!(result.error.as_deref().unwrap().contains("timed out after 40 s"), "{result:?}");
    assert_eq!(result.output.as_deref(), Some("tick\n"));
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(guest_processes(&handle).is_empty());
}

#[tokio::test]
async fn a_restarted_daemon_watches_the_command_instead_of_running_it_again() {
    let handle = sim_with_vm(0.01).await;
    let command = task(
        "run_command",
        json!({"vmName": "vm", "command": "echo run >> /tmp/runs; sleep 100; echo done", "timeoutSeconds": 600}),
    );
    // The first daemon starts the job and dies (its future is dropped) a moment later.
    let first = executor(&handle.url());
    let first_command = command.clone();
    let dying = tokio::spawn(async move { first.execute(&first_command, &mut Attempts::default()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    dying.abort();
    assert_eq!(handle.sim.vm_file("vm", "/tmp/runs").as_deref(), Some("run\n"), "the job started");

    let Outcome::Completed(result) = executor(&handle.url()).execute(&command, &mut Attempts::default()).await else {
        panic!()
    };
    assert_eq!(handle.sim.vm_file("vm", "/tmp/runs").as_deref(), Some("run\n"), "ran once");
    assert_eq!(result.output.as_deref(), Some("done\n"));
    assert_eq!(result.exit_code, Some(0));
    assert!(result.note.unwrap().contains("earlier attempt"));
}
