//! The executor against the in-process Arrakis simulator: failures the real server has
//! (zombie boots, transient 500s) and what the task's record says about them.

mod against_sim;

use std::time::Duration;

use against_sim::executor;
use arrakis_sim::{Failure, Op, SimConfig, INJECTED_FAULT};
use local_consumer::executor::{Attempts, Outcome};
use serde_json::json;
use vm_task_types::Task;

fn launch(vm: &str) -> Task {
    launch_with(vm, json!({}))
}

fn launch_with(vm: &str, vm_config: serde_json::Value) -> Task {
    serde_json::from_value(json!({
        "id": "01937a2e-7000-7000-8000-000000000001",
        "type": "launch_vm",
        "payload": {"vmName": vm, "vmConfig": vm_config},
        "status": "processing",
        "targetServer": "production",
        "createdAt": "2026-11-27T00:00:00.000Z",
        "updatedAt": "2026-11-27T00:00:00.000Z"
    }))
    .unwrap()
}

#[tokio::test]
async fn a_zombie_left_by_a_failed_boot_is_removed_even_when_the_check_fails_once() {
    // A slow boot leaves time to arm the failure between the launch's first look and the
    // look for the zombie.
    let config = SimConfig::for_tests().with_latency(Op::Start, Duration::from_millis(300));
    let handle = arrakis_sim::spawn(config).await;
    handle.sim.zombie_next();
    let url = handle.url();
    let run = tokio::spawn(async move {
        let mut attempts = Attempts::default();
        let outcome = executor(&url).execute(&launch("zombie-vm"), &mut attempts).await;
        (outcome, attempts)
    });
    while !handle.sim.log().iter().any(|e| e.op == Some(Op::Get)) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    handle.sim.fail_next(Op::Get, Failure::status(500, INJECTED_FAULT));
    let (outcome, attempts) = run.await.unwrap();

    let Outcome::Completed(result) = outcome else { panic!("launch failed: {outcome:?}") };
    assert!(result.ip.is_some(), "{result:?}");
    let vms = handle.sim.state().vms;
    assert_eq!(vms.len(), 1);
    assert_eq!((vms[0].vm_name.as_str(), vms[0].status.as_str()), ("zombie-vm", "RUNNING"));
    // Both failures are on the record: the look for the zombie (retried while handling the
    // failed boot), then the boot itself, retried once the zombie was gone.
    let calls: Vec<&str> = attempts.notes.iter().map(|n| n.error.split(':').next().unwrap()).collect();
    assert_eq!(calls, ["get", "start"], "{:?}", attempts.notes);
    let faults = handle.sim.log().iter().filter(|e| e.fault_injected).count();
    assert_eq!(faults, attempts.notes.len(), "every fault the task met is recorded");
}

#[tokio::test]
async fn issue_11_host_paths_are_refused_before_arrakis_sees_the_launch() {
    let handle = arrakis_sim::spawn(SimConfig::for_tests()).await;
    let executor = executor(&handle.url());
    for (field, path) in [
        ("rootfs", "/dev/sda"),
        ("kernel", "/etc/shadow"),
        ("initramfs", "/opt/arrakis/../../etc/shadow"),
        ("rootfs", "rootfs.ext4"),
    ] {
        let task = launch_with("host-paths", json!({ field: path }));
        let outcome = executor.execute(&task, &mut Attempts::default()).await;
        let Outcome::Failed(reason) = outcome else { panic!("{field}={path:?} was accepted: {outcome:?}") };
        assert!(reason.contains(&format!("vmConfig.{field}")) && reason.contains("/opt/arrakis"), "{reason}");
    }
    assert!(handle.sim.log().is_empty(), "Arrakis saw no request: {:?}", handle.sim.log());
    assert!(handle.sim.state().vms.is_empty());

    // A path under the allowed directory goes through.
    let task = launch_with("allowed", json!({"rootfs": "/opt/arrakis/custom-rootfs.ext4"}));
    let outcome = executor.execute(&task, &mut Attempts::default()).await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
}
