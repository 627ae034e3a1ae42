//! Fault injection, the request log, the `/_sim/` control API and the `arrakis-sim` binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arrakis_sim::{Failure, Op, SimConfig, INJECTED_FAULT};
use common::{error_body, Sim};

#[tokio::test]
async fn injected_faults_happen_before_the_effect_and_are_logged() {
    let s = Sim::new().await;
    s.h.sim.set_error_rate(1.0, 1);
    s.start("a").await.assert_error(500, INJECTED_FAULT);
    s.h.sim.set_error_rate(0.0, 1);
    assert_eq!(s.status_of("a").await, None, "a faulted start must not create the VM");
    let log = s.h.sim.log();
    assert_eq!(log[0].op, Some(Op::Start));
    assert_eq!(log[0].vm_name.as_deref(), Some("a"));
    assert!(log[0].fault_injected);
    assert_eq!(log[0].status, Some(500));
    assert!(!log[1].fault_injected);
    assert!(log[0].end_ms >= log[0].start_ms && log[1].seq == log[0].seq + 1);
}

#[tokio::test]
async fn same_seed_same_fault_sequence_over_http() {
    async fn pattern(seed: u64) -> Vec<bool> {
        let s = Sim::with(SimConfig::for_tests().with_error_rate(0.5, seed)).await;
        let mut out = Vec::new();
        for _ in 0..40 {
            out.push(s.get("/v1/health").await.status == 500);
        }
        let logged: Vec<bool> = s.h.sim.log().iter().map(|e| e.fault_injected).collect();
        assert_eq!(logged, out);
        out
    }
    let a = pattern(42).await;
    assert_eq!(a, pattern(42).await);
    assert_ne!(a, pattern(43).await);
    assert!(a.iter().any(|f| *f) && a.iter().any(|f| !*f));
}

#[tokio::test]
async fn fail_next_drop_hang_latency_and_zombie() {
    let s = Sim::new().await;
    s.h.sim.fail_next(Op::Get, Failure::status(503, "try later"));
    s.get("/v1/vms/x").await.assert_error(503, "try later");
    s.get("/v1/vms/x").await.assert_error(500, "Failed to list VM: rpc error: code = NotFound desc = vm not found: x");

    // A dropped connection: no status line at all.
    s.h.sim.fail_next(Op::Health, Failure::Drop);
    let err = reqwest::get(format!("{}/v1/health", s.h.url())).await.unwrap_err();
    assert!(!err.is_connect() && !err.is_timeout(), "{err:?}");
    assert!(s.h.sim.log().last().unwrap().dropped);
    assert_eq!(s.get("/v1/health").await.status, 200);

    // Hangs and latencies delay the answer.
    s.h.sim.set_hang([Op::List], Duration::from_millis(120));
    let t = Instant::now();
    assert_eq!(s.get("/v1/vms").await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(120));
    s.h.sim.set_hang([], Duration::ZERO);
    s.h.sim.set_latency(Op::Health, Duration::from_millis(60));
    let t = Instant::now();
    s.get("/v1/health").await;
    assert!(t.elapsed() >= Duration::from_millis(60));

    // A zombie: the start fails but the VM is registered RUNNING and holds its resources.
    s.h.sim.zombie_next();
    let r = s.start("z").await;
    r.assert_error(500, "Failed to start VM: failed to boot VM resp.Body: {0xc0001b4000}: 500 Internal Server Error");
    assert_eq!(s.status_of("z").await.as_deref(), Some("RUNNING"));
    assert_eq!(s.get("/v1/vms").await.json()["vms"][0]["vmName"], "z");
    assert_eq!(s.start("z").await.status, 500, "a zombie is RUNNING, so a re-boot is refused");
    assert!(s.h.sim.log_for(Op::Start)[0].fault_injected);
    assert_eq!(s.start("y").await.json()["ip"], "10.20.1.3/24");
}

#[tokio::test]
async fn start_latency_shows_the_vm_before_the_answer() {
    let s = Sim::with(SimConfig::for_tests().with_latency(Op::Start, Duration::from_millis(150))).await;
    let url = s.h.url();
    let pending = tokio::spawn(async move {
        reqwest::Client::new().post(format!("{url}/v1/vms")).body(r#"{"vmName":"slow"}"#).send().await.unwrap().status()
    });
    let mut listed = false;
    while !pending.is_finished() && !listed {
        listed = s.status_of("slow").await.as_deref() == Some("RUNNING");
    }
    assert!(listed, "the booting VM was never visible before the answer");
    assert_eq!(pending.await.unwrap(), 200);
}

#[tokio::test]
async fn control_api_over_http() {
    let s = Sim::new().await;
    let r = s.get("/_sim/config").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["proxyTimeoutMs"], 50);
    let r = s
        .req("PUT", "/_sim/config", Some(r#"{"latencyMs":{"cmd":5},"errorRate":0.25,"seed":9,"hangOps":["upload"],"hangForMs":1000,"timeScale":0.5}"#))
        .await;
    let v = r.json();
    assert_eq!((v["latencyMs"]["cmd"].as_u64(), v["errorRate"].as_f64()), (Some(5), Some(0.25)));
    assert_eq!((v["seed"].as_u64(), v["hangOps"][0].as_str()), (Some(9), Some("upload")));
    let cfg = s.h.sim.config();
    assert_eq!((cfg.hang_for, cfg.time_scale), (Duration::from_secs(1), 0.5));
    assert_eq!(s.req("PUT", "/_sim/config", Some(r#"{"errorRate":3}"#)).await.status, 400);
    assert_eq!(s.req("PUT", "/_sim/config", Some(r#"{"bogus":1}"#)).await.status, 400);
    s.req("PUT", "/_sim/config", Some(r#"{"errorRate":0,"hangOps":[]}"#)).await;

    let r = s.post("/_sim/fail-next", r#"{"op":"delete","status":500,"message":"nope","count":2}"#).await;
    assert_eq!(r.json(), serde_json::json!({ "op": "delete", "pending": 2 }));
    s.delete("/v1/vms/x").await.assert_error(500, "nope");
    s.delete("/v1/vms/x").await.assert_error(500, "nope");
    s.post("/_sim/fail-next", r#"{"op":"cmd","drop":true}"#).await;
    assert_eq!(s.post("/_sim/fail-next", r#"{"status":500}"#).await.status, 400);

    assert_eq!(s.post("/_sim/zombie-next", "").await.json()["pendingZombies"], 1);
    s.start("z").await;
    s.start("ok").await;
    s.post("/v1/vms/ok/snapshots", r#"{"snapshotId":"snap"}"#).await;
    let state = s.get("/_sim/state").await.json();
    assert_eq!(state["vms"][0]["vmName"], "ok");
    assert_eq!(state["vms"][1]["vmName"], "z");
    assert_eq!(state["vms"][1]["status"], "RUNNING");
    assert_eq!(state["snapshots"][0]["snapshotId"], "snap");
    assert_eq!(state["snapshots"][0]["vmName"], "ok");
    assert_eq!(state["nextHostPort"], 3012);
    assert_eq!(state["pendingFailures"]["cmd"], 1);

    let log = s.get("/_sim/log").await.json();
    let entries = log["entries"].as_array().unwrap();
    let first = &entries[0];
    for key in ["seq", "startMs", "endMs", "method", "path", "op", "vmName", "status", "faultInjected"] {
        assert!(first.get(key).is_some(), "log entry lacks {key}: {first}");
    }
    assert_eq!(first["op"], "delete");
    assert!(entries.iter().all(|e| !e["path"].as_str().unwrap().starts_with("/_sim")));

    assert_eq!(s.post("/_sim/restart", "").await.json()["destroyed"], 2);
    assert_eq!(s.get("/v1/vms").await.body, "{}\n");
    assert_eq!(s.get("/_sim/state").await.json()["snapshots"][0]["snapshotId"], "snap");
    assert!(s.delete("/_sim/log").await.json()["cleared"].as_u64().unwrap() > 0);
    assert_eq!(s.get("/_sim/log").await.json()["entries"].as_array().unwrap().len(), 0);
    // Unknown control paths fall through to the Arrakis router.
    assert_eq!(s.get("/_sim/nope").await.body, "404 page not found\n");
    assert_eq!(error_body("x"), "{\"error\":{\"message\":\"x\"}}\n");
}

#[test]
fn binary_prints_its_address_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_arrakis-sim"))
        .args(["--listen", "127.0.0.1:0", "--latency", "health=1ms", "--seed", "3"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("arrakis-sim listening on ").unwrap_or_else(|| panic!("{line:?}"));
    let addr = url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    stream.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            assert!(exit.success(), "{exit:?}");
            break;
        }
        assert!(Instant::now() < deadline, "arrakis-sim did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
}
