//! The client against the simulator: every method, the classification of every kind of
//! failure, percent-encoding of odd names, and the exact bodies the client sends.

use std::time::Duration;

use arrakis_client::{ApiErrorKind, ArrakisClient, ArrakisError, FileUpload, StartVmRequest, Timeouts, VmStatus};
use arrakis_sim::{spawn, Failure, Op, SimConfig, SimHandle};

async fn setup(config: SimConfig) -> (SimHandle, ArrakisClient) {
    let handle = spawn(config).await;
    let client = ArrakisClient::new(&format!("{}/", handle.url())).unwrap();
    (handle, client)
}

async fn sim() -> (SimHandle, ArrakisClient) {
    setup(SimConfig::for_tests()).await
}

fn kind(err: &ArrakisError) -> Option<ApiErrorKind> {
    match err {
        ArrakisError::Api { kind, .. } => Some(*kind),
        _ => None,
    }
}

#[tokio::test]
async fn lifecycle_happy_path() {
    let (h, c) = sim().await;
    assert_eq!(c.base_url(), h.url());
    assert_eq!(c.health().await.unwrap().status, "healthy");
    assert_eq!(c.list_vms().await.unwrap(), vec![]);

    let vm = c.start_vm(&StartVmRequest::new("a")).await.unwrap();
    assert_eq!((vm.vm_name.as_str(), &vm.status), ("a", &VmStatus::Running));
    assert_eq!((vm.ip.as_str(), vm.ip_address()), ("10.20.1.2/24", "10.20.1.2"));
    assert_eq!(vm.tap_device_name, "tap0");
    assert_eq!(vm.port_forwards.len(), 6);
    assert_eq!((vm.port_forwards[0].host_port.as_str(), vm.port_forwards[0].guest_port.as_str()), ("3000", "5901"));
    assert_eq!(vm.port_forwards[1].description, "code (range 5736-5740)");
    assert_eq!(c.get_vm("a").await.unwrap(), vm);
    assert_eq!(c.list_vms().await.unwrap(), vec![vm.clone()]);

    c.pause_vm("a").await.unwrap();
    assert_eq!(c.get_vm("a").await.unwrap().status, VmStatus::Paused);
    c.resume_vm("a").await.unwrap();
    assert_eq!(c.get_vm("a").await.unwrap().status, VmStatus::Running);
    c.stop_vm("a").await.unwrap();
    assert_eq!(c.get_vm("a").await.unwrap().status, VmStatus::Stopped);
    // Re-boot of a stopped name keeps its resources.
    assert_eq!(c.start_vm(&StartVmRequest::new("a")).await.unwrap(), vm);

    c.delete_vm("a").await.unwrap();
    assert!(c.get_vm("a").await.unwrap_err().is_not_found());
    c.start_vm(&StartVmRequest::new("b")).await.unwrap();
    c.start_vm(&StartVmRequest::new("c")).await.unwrap();
    c.delete_all_vms().await.unwrap();
    assert_eq!(c.list_vms().await.unwrap(), vec![]);
}

#[tokio::test]
async fn commands_and_files() {
    let (h, c) = sim().await;
    c.start_vm(&StartVmRequest::new("v")).await.unwrap();
    let out = c.run_command("v", "echo hi", true).await.unwrap();
    assert_eq!((out.output.as_str(), out.error.as_deref(), out.exit_code), ("hi\n", None, Some(0)));
    let out = c.run_command("v", "echo oops; exit 7", true).await.unwrap();
    assert_eq!((out.error.as_deref(), out.exit_code), (Some("exit status 7"), Some(7)));
    let out = c.run_command("v", "nosuch", true).await.unwrap();
    assert_eq!(out.exit_code, Some(127));
    let out = c.run_command("v", "echo bg > bg.txt", false).await.unwrap();
    assert!(out.output.ends_with("started in background"), "{}", out.output);

    c.run_command("v", "mkdir -p sub", true).await.unwrap();
    let files = [FileUpload::new("sub/a.txt", "A <&> ü"), FileUpload::new("/root/b.txt", "B")];
    c.upload_files("v", &files).await.unwrap();
    assert_eq!(h.sim.vm_file("v", "/root/b.txt").as_deref(), Some("B"));
    let got = c.download_files("v", &["sub/a.txt".into(), "missing".into(), "sub/a.txt".into()]).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(
        (got[0].path.as_str(), got[0].content.as_str(), got[0].error.as_deref()),
        ("sub/a.txt", "A <&> ü", None)
    );
    assert_eq!(
        got[1].error.as_deref(),
        Some("Failed to read file: open /tmp/server_files/missing: no such file or directory")
    );
    // Missing parent directories are a server-side 500.
    let err = c.upload_files("v", &[FileUpload::new("no/dir/f", "x")]).await.unwrap_err();
    assert_eq!(kind(&err), Some(ApiErrorKind::Unavailable));
    // Paths the server cannot forward are refused before sending.
    for bad in ["a,b", "a b", "a&b", "a#b", "100%"] {
        let err = c.download_files("v", &[bad.to_string()]).await.unwrap_err();
        assert_eq!(err, ArrakisError::InvalidName { name: bad.into() });
    }
    let err = c.download_files("v", &[]).await.unwrap_err();
    assert_eq!(kind(&err), Some(ApiErrorKind::InvalidRequest));
    let err = c.upload_files("v", &[]).await.unwrap_err();
    assert_eq!(kind(&err), Some(ApiErrorKind::InvalidRequest));
}

#[tokio::test]
async fn sends_exactly_the_documented_keys() {
    let (h, c) = sim().await;
    let req = StartVmRequest { kernel: Some("/k".into()), ..StartVmRequest::new("v") };
    c.start_vm(&req).await.unwrap();
    c.run_command("v", "true", true).await.unwrap();
    c.upload_files("v", &[FileUpload::new("p", "c")]).await.unwrap();
    c.pause_vm("v").await.unwrap();
    c.resume_vm("v").await.unwrap();
    c.snapshot_vm("v", "s1").await.unwrap();
    c.download_files("v", &["p".into(), "dir/q".into()]).await.unwrap();
    let bodies: Vec<(Option<Op>, String)> = h.sim.log().into_iter().map(|e| (e.op, e.request_body)).collect();
    let expected = [
        (Some(Op::Start), r#"{"vmName":"v","kernel":"/k"}"#),
        (Some(Op::Cmd), r#"{"cmd":"true","blocking":true}"#),
        (Some(Op::Upload), r#"{"files":[{"path":"p","content":"c"}]}"#),
        (Some(Op::Pause), r#"{"status":"paused"}"#),
        (Some(Op::Resume), r#"{"status":"resume"}"#),
        (Some(Op::Snapshot), r#"{"snapshotId":"s1"}"#),
        (Some(Op::Download), ""),
    ];
    let expected: Vec<(Option<Op>, String)> = expected.into_iter().map(|(op, b)| (op, b.to_string())).collect();
    assert_eq!(bodies, expected);
    assert_eq!(h.sim.log()[6].query.as_deref(), Some("paths=p,dir/q"));
}

#[tokio::test]
async fn snapshot_and_restore() {
    let (_h, c) = sim().await;
    c.start_vm(&StartVmRequest::new("src")).await.unwrap();
    c.run_command("src", "echo saved > f", true).await.unwrap();
    assert_eq!(c.snapshot_vm("src", "snap-1").await.unwrap(), "snap-1");

    let err = c.snapshot_vm("src", "snap-1").await.unwrap_err();
    assert_eq!(kind(&err), Some(ApiErrorKind::Conflict), "{err}");
    let err = c.start_vm(&StartVmRequest::restore("src", "snap-1")).await.unwrap_err();
    assert_eq!(kind(&err), Some(ApiErrorKind::Conflict), "tap held: {err}");
    let err = c.start_vm(&StartVmRequest::restore("src", "nope")).await.unwrap_err();
    assert_eq!(kind(&err), Some(ApiErrorKind::InvalidRequest), "{err}");

    c.delete_vm("src").await.unwrap();
    let vm = c.start_vm(&StartVmRequest::restore("src", "snap-1")).await.unwrap();
    assert_eq!((vm.ip_address(), vm.tap_device_name.as_str()), ("10.20.1.2", "tap0"));
    assert_eq!(c.run_command("src", "cat f", true).await.unwrap().output, "saved\n");
    let err = c.snapshot_vm("src", "snap-2").await.unwrap_err();
    assert_eq!(kind(&err), Some(ApiErrorKind::Conflict), "restored VM: {err}");
    assert!(!err.is_transient());
    assert!(matches!(c.snapshot_vm("src", "").await, Err(ArrakisError::InvalidName { .. })));
}

#[tokio::test]
async fn not_found_on_every_endpoint() {
    let (_h, c) = sim().await;
    let n = "ghost";
    let errors = [
        c.get_vm(n).await.unwrap_err(),
        c.stop_vm(n).await.unwrap_err(),
        c.pause_vm(n).await.unwrap_err(),
        c.resume_vm(n).await.unwrap_err(),
        c.delete_vm(n).await.unwrap_err(),
        c.snapshot_vm(n, "s").await.unwrap_err(),
        c.run_command(n, "ls", true).await.unwrap_err(),
        c.upload_files(n, &[FileUpload::new("a", "b")]).await.unwrap_err(),
        c.download_files(n, &["a".into()]).await.unwrap_err(),
    ];
    for err in errors {
        assert!(err.is_not_found(), "{err:?}");
        assert!(!err.is_transient());
        assert!(matches!(&err, ArrakisError::NotFound { vm_name, .. } if vm_name == n));
    }
}

#[tokio::test]
async fn state_conflicts_and_exhaustion() {
    let (_h, c) = setup(SimConfig::for_tests().with_port_range(3000, 3005)).await;
    c.start_vm(&StartVmRequest::new("v")).await.unwrap();
    let conflict = |r: Result<_, ArrakisError>| {
        let err = r.unwrap_err();
        assert_eq!(kind(&err), Some(ApiErrorKind::Conflict), "{err}");
        assert!(!err.is_transient());
    };
    conflict(c.start_vm(&StartVmRequest::new("v")).await.map(drop));
    conflict(c.resume_vm("v").await);
    c.pause_vm("v").await.unwrap();
    conflict(c.pause_vm("v").await);
    conflict(c.snapshot_vm("v", "s").await.map(drop));
    c.stop_vm("v").await.unwrap();
    conflict(c.stop_vm("v").await);
    conflict(c.resume_vm("v").await);
    let err = c.start_vm(&StartVmRequest::new("w")).await.unwrap_err();
    assert_eq!(kind(&err), Some(ApiErrorKind::Exhausted), "{err}");
    assert!(!err.is_transient());
    // A command the guest agent refuses to parse is a bad request, not a transient 500.
    c.start_vm(&StartVmRequest::new("v")).await.unwrap();
    let err = c.run_command("v", "echo 'unbalanced", true).await.unwrap_err();
    assert!(matches!(err, ArrakisError::Api { status: 500, kind: ApiErrorKind::InvalidRequest, .. }), "{err}");
}

#[tokio::test]
async fn injected_faults_are_transient() {
    let (h, c) = sim().await;
    h.sim.set_error_rate(1.0, 5);
    let err = c.health().await.unwrap_err();
    assert!(matches!(err, ArrakisError::Api { status: 500, kind: ApiErrorKind::Unavailable, .. }), "{err}");
    assert!(err.is_transient());
    let err = c.start_vm(&StartVmRequest::new("v")).await.unwrap_err();
    assert!(err.is_transient());
    h.sim.set_error_rate(0.0, 5);
    assert!(c.get_vm("v").await.unwrap_err().is_not_found(), "the fault came before the effect");

    h.sim.fail_next(Op::List, Failure::status(503, "Service Unavailable"));
    let err = c.list_vms().await.unwrap_err();
    assert!(matches!(err, ArrakisError::Api { status: 503, .. }) && err.is_transient(), "{err}");

    h.sim.fail_next(Op::Get, Failure::Drop);
    let err = c.get_vm("v").await.unwrap_err();
    assert!(matches!(err, ArrakisError::Dropped { .. }), "{err:?}");
    assert!(err.is_transient());

    // A zombie boot: a transient error, yet the VM exists.
    h.sim.zombie_next();
    let err = c.start_vm(&StartVmRequest::new("z")).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(c.get_vm("z").await.unwrap().status, VmStatus::Running);

    // The guest proxy timing out on a paused VM is transient too.
    c.pause_vm("z").await.unwrap();
    let err = c.run_command("z", "true", true).await.unwrap_err();
    assert!(matches!(err, ArrakisError::Api { kind: ApiErrorKind::Unavailable, .. }), "{err}");
}

#[tokio::test]
async fn hangs_time_out_with_the_operations_timeout() {
    let (h, c) = sim().await;
    h.sim.set_hang([Op::Cmd, Op::Health], Duration::from_secs(30));
    let timeouts =
        Timeouts { cmd: Duration::from_millis(100), default: Duration::from_millis(150), ..Timeouts::default() };
    let c = c.with_timeouts(timeouts);
    assert_eq!(c.timeouts().cmd, Duration::from_millis(100));
    let err = c.health().await.unwrap_err();
    assert_eq!(err, ArrakisError::Timeout { operation: "health", after: Duration::from_millis(150) });
    let err = c.run_command("v", "true", true).await.unwrap_err();
    assert_eq!(err, ArrakisError::Timeout { operation: "run_command", after: Duration::from_millis(100) });
    assert!(err.is_transient());
    // The server is not wedged by the abandoned requests.
    h.sim.set_hang([], Duration::ZERO);
    assert!(c.list_vms().await.is_ok());
}

#[tokio::test]
async fn connection_refused_is_connect() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let c = ArrakisClient::new(&format!("http://{addr}")).unwrap();
    let err = c.health().await.unwrap_err();
    assert!(matches!(err, ArrakisError::Connect { .. }), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn odd_names_are_percent_encoded_and_bad_ones_refused() {
    let (h, c) = sim().await;
    let name = "odd name?#%ü";
    let vm = c.start_vm(&StartVmRequest::new(name)).await.unwrap();
    assert_eq!(vm.vm_name, name);
    assert_eq!(c.get_vm(name).await.unwrap().vm_name, name);
    assert_eq!(c.run_command(name, "hostname", true).await.unwrap().output, format!("{name}\n"));
    c.pause_vm(name).await.unwrap();
    c.delete_vm(name).await.unwrap();
    assert!(h.sim.log().iter().any(|e| e.path == "/v1/vms/odd%20name%3F%23%25%C3%BC"));
    assert!(c.get_vm(name).await.unwrap_err().is_not_found());

    h.sim.clear_log();
    for bad in ["", ".", "..", "a/b", "tab\there"] {
        assert_eq!(c.get_vm(bad).await.unwrap_err(), ArrakisError::InvalidName { name: bad.into() });
        assert!(matches!(c.start_vm(&StartVmRequest::new(bad)).await, Err(ArrakisError::InvalidName { .. })));
    }
    assert!(h.sim.log().is_empty(), "no request may be sent for an invalid name");
}

#[tokio::test]
async fn router_answers_are_protocol_errors() {
    let (h, _) = sim().await;
    let c = ArrakisClient::new(&format!("{}/prefix", h.url())).unwrap();
    let err = c.health().await.unwrap_err();
    assert_eq!(err, ArrakisError::Protocol { status: 404, message: "404 page not found".into() });
    assert!(!err.is_transient());
    let c = ArrakisClient::new(&format!("{}/v1/vms/x", h.url())).unwrap();
    // Lands on /v1/vms/x/v1/vms: a 404 as well, never a redirect followed.
    assert!(matches!(c.list_vms().await, Err(ArrakisError::Protocol { status: 404, .. })));
    let c = ArrakisClient::new(&format!("{}/v1/.", h.url())).unwrap();
    assert_eq!(c.base_url(), format!("{}/v1", h.url()));
}

#[tokio::test]
async fn issue_11_an_answer_over_the_size_cap_is_not_read() {
    let (h, c) = sim().await;
    let c = c.with_max_response_bytes(10_000);
    c.start_vm(&StartVmRequest::new("v")).await.unwrap();
    let out = c.run_command("v", "echo small", true).await.unwrap();
    assert_eq!(out.output, "small\n");
    let big = format!("echo {}", "a".repeat(12_000));
    let err = c.run_command("v", &big, true).await.unwrap_err();
    assert!(
        matches!(&err, ArrakisError::Protocol { status: 200, message } if message.contains("larger than 10000 bytes")),
        "{err:?}"
    );
    assert!(!err.command_not_delivered(), "it ran: never sent again");
    drop(h);
}
