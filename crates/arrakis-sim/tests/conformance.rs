//! Conformance of the simulator to BEHAVIOR.md: raw HTTP against a spawned simulator, checking
//! status codes and exact bodies endpoint by endpoint, the router's own answers, and the §3.2
//! transition table row by row.

mod common;

use std::time::{Duration, Instant};

use arrakis_sim::{Op, SimConfig};
use common::Sim;

/// The exact body the server sends for a VM: alphabetical keys, CIDR ip, string ports.
fn vm_json(name: &str, ip: u8, tap: u32, first_port: u16, status: &str) -> String {
    let mut forwards = vec![format!(r#"{{"description":"gui","guestPort":"5901","hostPort":"{first_port}"}}"#)];
    for (i, guest) in (5736..=5740).enumerate() {
        forwards.push(format!(
            r#"{{"description":"code (range 5736-5740)","guestPort":"{guest}","hostPort":"{}"}}"#,
            first_port + 1 + i as u16
        ));
    }
    format!(
        r#"{{"ip":"10.20.1.{ip}/24","portForwards":[{}],"status":"{status}","tapDeviceName":"tap{tap}","vmName":"{name}"}}"#,
        forwards.join(",")
    ) + "\n"
}

const SUCCESS: &str = "{\"success\":true}\n";
const CHV: &str = "500 Internal Server Error";
const OPAQUE: &str = "{0xc0001b4000}";

#[tokio::test]
async fn health_is_always_healthy() {
    let s = Sim::new().await;
    let r = s.get("/v1/health").await;
    assert_eq!((r.status, r.content_type.as_deref()), (200, Some("application/json")));
    let v = r.json();
    assert_eq!(v["status"], "healthy");
    let ts = v["timestamp"].as_str().unwrap();
    assert!(ts.len() == 20 && ts.ends_with('Z'), "{ts}");
    assert!(r.body.ends_with("}\n"));
}

#[tokio::test]
async fn list_is_empty_object_then_vms() {
    let s = Sim::new().await;
    let r = s.get("/v1/vms").await;
    assert_eq!((r.status, r.body.as_str()), (200, "{}\n"));
    assert_eq!(s.start("foo").await.body, vm_json("foo", 2, 0, 3000, "RUNNING"));
    assert_eq!(s.start("bar").await.body, vm_json("bar", 3, 1, 3006, "RUNNING"));
    let r = s.get("/v1/vms").await;
    let expected = format!(
        "{{\"vms\":[{},{}]}}\n",
        vm_json("bar", 3, 1, 3006, "RUNNING").trim_end(),
        vm_json("foo", 2, 0, 3000, "RUNNING").trim_end()
    );
    assert_eq!(r.body, expected);
    assert_eq!(s.get("/v1/vms/foo").await.body, vm_json("foo", 2, 0, 3000, "RUNNING"));
}

#[tokio::test]
async fn list_order_is_shuffled_by_default() {
    let s = Sim::with(SimConfig::for_tests()).await;
    for n in 0..6 {
        s.start(&format!("vm{n}")).await;
    }
    let order = |r: common::Resp| -> Vec<String> {
        r.json()["vms"].as_array().unwrap().iter().map(|v| v["vmName"].to_string()).collect()
    };
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        seen.insert(order(s.get("/v1/vms").await));
    }
    assert!(seen.len() > 1, "list order never changed");
}

#[tokio::test]
async fn start_validation() {
    let s = Sim::new().await;
    s.post("/v1/vms", "").await.assert_error(400, "Invalid request format: EOF");
    s.post("/v1/vms", "{").await.assert_error(400, "Invalid request format: unexpected EOF");
    s.post("/v1/vms", "{}").await.assert_error(400, "Empty vm name");
    s.post("/v1/vms", r#"{"vmName":""}"#).await.assert_error(400, "Empty vm name");
    s.post("/v1/vms", r#"{"vmName":7}"#).await.assert_error(
        400,
        "Invalid request format: json: cannot unmarshal number into Go struct field StartVMRequest.vmName of type string",
    );
    // Lenient: keys match case-insensitively, unknown keys and entryPoint are ignored.
    let r = s.post("/v1/vms", r#"{"VMNAME":"a","entryPoint":"/x","bogus":1,"kernel":"/k"}"#).await;
    assert_eq!(r.body, vm_json("a", 2, 0, 3000, "RUNNING"));
}

#[tokio::test]
async fn not_found_is_a_500_worded_per_endpoint() {
    let s = Sim::new().await;
    let n = "ghost";
    s.get("/v1/vms/ghost")
        .await
        .assert_error(500, &format!("Failed to list VM: rpc error: code = NotFound desc = vm not found: {n}"));
    s.patch(n, "stopped").await.assert_error(
        500,
        &format!("Failed to change VM state to 'stopped': rpc error: code = NotFound desc = vm {n} not found"),
    );
    s.patch(n, "paused").await.assert_error(
        500,
        &format!("Failed to change VM state to 'paused': rpc error: code = NotFound desc = vm not found: {n}"),
    );
    s.patch(n, "resume").await.assert_error(
        500,
        &format!("Failed to change VM state to 'resume': rpc error: code = NotFound desc = vm not found: {n}"),
    );
    s.delete("/v1/vms/ghost").await.assert_error(
        500,
        &format!("Failed to destroy VM: rpc error: code = Internal desc = failed to destroy vm: {n}: vm {n} not found"),
    );
    s.post("/v1/vms/ghost/snapshots", r#"{"snapshotId":"s"}"#)
        .await
        .assert_error(500, &format!("Failed to create snapshot: rpc error: code = NotFound desc = vm not found: {n}"));
    s.cmd(n, "ls")
        .await
        .assert_error(500, &format!("Failed to execute command: rpc error: code = NotFound desc = vm not found: {n}"));
    s.post("/v1/vms/ghost/files", r#"{"files":[{"path":"a","content":"b"}]}"#)
        .await
        .assert_error(500, &format!("Failed to upload files: rpc error: code = NotFound desc = vm not found: {n}"));
    s.get("/v1/vms/ghost/files?paths=a")
        .await
        .assert_error(500, &format!("Failed to download files: rpc error: code = NotFound desc = vm not found: {n}"));
}

#[tokio::test]
async fn patch_validation_runs_before_the_lookup() {
    let s = Sim::new().await;
    s.patch("ghost", "running").await.assert_error(400, "Invalid status value: running");
    s.patch("ghost", "resumed").await.assert_error(400, "Invalid status value: resumed");
    s.req("PATCH", "/v1/vms/ghost", Some("{}")).await.assert_error(400, "Invalid status value: ");
    s.req("PATCH", "/v1/vms/ghost", Some("")).await.assert_error(400, "Invalid request format: EOF");
    s.start("a").await;
    // Lenient and case-insensitive on the key, case-sensitive on the value.
    let r = s.req("PATCH", "/v1/vms/a", Some(r#"{"Status":"paused","x":1}"#)).await;
    assert_eq!((r.status, r.body.as_str()), (200, SUCCESS));
    s.patch("a", "RESUME").await.assert_error(400, "Invalid status value: RESUME");
}

#[tokio::test]
async fn transition_table_rows() {
    let s = Sim::with(SimConfig::for_tests().with_latency(Op::Snapshot, Duration::from_millis(150))).await;
    let refused = |verb: &str, call: &str| {
        format!("Failed to change VM state to '{verb}': rpc error: code = Internal desc = failed to {call} VM: failed to {call} VM resp.Body: {OPAQUE}: {CHV}")
    };
    let stop_refused =
        format!("Failed to change VM state to 'stopped': rpc error: code = Internal desc = failed to stop VM: {CHV}");
    let boot_refused = format!("Failed to start VM: rpc error: code = Internal desc = failed to boot existing VM: failed to boot VM resp.Body: {OPAQUE}: {CHV}");
    let snap_refused = format!("Failed to create snapshot: failed to pause VM: {CHV}");

    // absent → POST → RUNNING with new resources.
    assert_eq!(s.start("v").await.body, vm_json("v", 2, 0, 3000, "RUNNING"));
    // RUNNING → resume → 500.
    s.patch("v", "resume").await.assert_error(500, &refused("resume", "resume"));
    // RUNNING → POST same name → 500, unchanged.
    s.start("v").await.assert_error(500, &boot_refused);
    assert_eq!(s.status_of("v").await.as_deref(), Some("RUNNING"));
    // RUNNING → snapshot → briefly PAUSED, then RUNNING.
    let snap = {
        let url = format!("{}/v1/vms/v/snapshots", s.h.url());
        tokio::spawn(async move {
            reqwest::Client::new().post(url).body(r#"{"snapshotId":"t1"}"#).send().await.unwrap().text().await.unwrap()
        })
    };
    // Poll rather than sleep a fixed time, so a slow machine cannot miss the window.
    let mut saw_paused = false;
    while !snap.is_finished() && !saw_paused {
        saw_paused = s.status_of("v").await.as_deref() == Some("PAUSED");
    }
    assert!(saw_paused, "never saw the VM paused during the snapshot");
    assert_eq!(snap.await.unwrap(), "{\"snapshotId\":\"t1\"}\n");
    assert_eq!(s.status_of("v").await.as_deref(), Some("RUNNING"));
    // RUNNING → paused → PAUSED.
    assert_eq!(s.patch("v", "paused").await.body, SUCCESS);
    assert_eq!(s.status_of("v").await.as_deref(), Some("PAUSED"));
    // PAUSED → paused → 500.
    s.patch("v", "paused").await.assert_error(500, &refused("paused", "pause"));
    // PAUSED → snapshot → 500, stays PAUSED.
    s.post("/v1/vms/v/snapshots", r#"{"snapshotId":"t2"}"#).await.assert_error(500, &snap_refused);
    assert_eq!(s.status_of("v").await.as_deref(), Some("PAUSED"));
    // PAUSED → resume → RUNNING.
    assert_eq!(s.patch("v", "resume").await.body, SUCCESS);
    assert_eq!(s.status_of("v").await.as_deref(), Some("RUNNING"));
    // PAUSED → POST same name → RUNNING (acts as resume).
    s.patch("v", "paused").await;
    assert_eq!(s.start("v").await.body, vm_json("v", 2, 0, 3000, "RUNNING"));
    // PAUSED → stopped → STOPPED.
    s.patch("v", "paused").await;
    assert_eq!(s.patch("v", "stopped").await.body, SUCCESS);
    assert_eq!(s.status_of("v").await.as_deref(), Some("STOPPED"));
    // STOPPED → stopped / paused / resume → 500.
    s.patch("v", "stopped").await.assert_error(500, &stop_refused);
    s.patch("v", "paused").await.assert_error(500, &refused("paused", "pause"));
    s.patch("v", "resume").await.assert_error(500, &refused("resume", "resume"));
    // STOPPED → snapshot → 500.
    s.post("/v1/vms/v/snapshots", r#"{"snapshotId":"t3"}"#).await.assert_error(500, &snap_refused);
    // STOPPED still reports ip, tap and forwards.
    assert_eq!(s.get("/v1/vms/v").await.body, vm_json("v", 2, 0, 3000, "STOPPED"));
    // STOPPED → POST same name → RUNNING (cold boot), same resources.
    assert_eq!(s.start("v").await.body, vm_json("v", 2, 0, 3000, "RUNNING"));
    // RUNNING → stopped → STOPPED.
    assert_eq!(s.patch("v", "stopped").await.body, SUCCESS);
    // any → DELETE → absent.
    assert_eq!(s.delete("/v1/vms/v").await.body, SUCCESS);
    assert_eq!(s.status_of("v").await, None);
    for from in ["RUNNING", "PAUSED"] {
        s.start("w").await;
        if from == "PAUSED" {
            s.patch("w", "paused").await;
        }
        assert_eq!(s.delete("/v1/vms/w").await.body, SUCCESS, "{from}");
        assert_eq!(s.status_of("w").await, None);
    }
    // any registered → restore onto the same name → 500 (the simulator refuses).
    s.start("src").await;
    s.post("/v1/vms/src/snapshots", r#"{"snapshotId":"t4"}"#).await;
    let r = s.post("/v1/vms", r#"{"vmName":"src","snapshotId":"t4"}"#).await;
    assert_eq!(r.status, 500);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Failed to start VM: failed to restore VM from snapshot: "));
    assert_eq!(s.status_of("src").await.as_deref(), Some("RUNNING"));
}

#[tokio::test]
async fn cold_boot_clears_tmp_and_keeps_other_files() {
    let s = Sim::new().await;
    s.start("v").await;
    s.cmd("v", "echo keep > /root/k; echo gone > t").await;
    s.patch("v", "paused").await;
    s.patch("v", "resume").await;
    assert_eq!(s.cmd("v", "cat t /root/k").await.json()["output"], "gone\nkeep\n");
    s.patch("v", "stopped").await;
    s.start("v").await;
    let r = s.cmd("v", "cat t; cat /root/k").await.json();
    assert_eq!(r["output"], "cat: t: No such file or directory\nkeep\n");
}

#[tokio::test]
async fn snapshots_and_restore() {
    let s = Sim::new().await;
    s.start("src").await;
    s.start("other").await;
    let prefix = "Failed to start VM: failed to restore VM from snapshot: ";
    // A missing or empty id always "exists": the message has a double space.
    s.post("/v1/vms/src/snapshots", "{}")
        .await
        .assert_error(500, "Failed to create snapshot: snapshot with ID  already exists");
    s.post("/v1/vms/src/snapshots", "").await.assert_error(400, "Invalid request format: EOF");
    s.cmd("src", "echo state > f").await;
    let r = s.post("/v1/vms/src/snapshots", r#"{"SNAPSHOTID":"s1"}"#).await;
    assert_eq!(r.body, "{\"snapshotId\":\"s1\"}\n");
    // Ids are global.
    s.post("/v1/vms/other/snapshots", r#"{"snapshotId":"s1"}"#)
        .await
        .assert_error(500, "Failed to create snapshot: snapshot with ID s1 already exists");
    // Restore needs the snapshot to exist, the source destroyed, and the same name.
    s.post("/v1/vms", r#"{"vmName":"src","snapshotId":"nope"}"#)
        .await
        .assert_error(500, &format!("{prefix}snapshot with ID nope does not exist"));
    s.post("/v1/vms", r#"{"vmName":"src","snapshotId":"s1"}"#)
        .await
        .assert_error(500, &format!("{prefix}failed to create tap device: tap ID 0 is not available"));
    s.patch("src", "stopped").await;
    s.post("/v1/vms", r#"{"vmName":"src","snapshotId":"s1"}"#)
        .await
        .assert_error(500, &format!("{prefix}failed to create tap device: tap ID 0 is not available"));
    s.delete("/v1/vms/src").await;
    let r = s.post("/v1/vms", r#"{"vmName":"elsewhere","snapshotId":"s1"}"#).await;
    r.assert_error(500, &format!("{prefix}failed to restore VM: failed to restore from snapshot: {CHV}"));
    assert_eq!(s.status_of("elsewhere").await, None);
    // Same ip and tap, new host ports; files as at snapshot time.
    let r = s.post("/v1/vms", r#"{"vmName":"src","snapshotId":"s1","kernel":"ignored"}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!((v["ip"].as_str(), v["tapDeviceName"].as_str()), (Some("10.20.1.2/24"), Some("tap0")));
    assert_ne!(v["portForwards"][0]["hostPort"], "3000");
    assert_eq!(s.cmd("src", "cat f").await.json()["output"], "state\n");
    // A restored VM can never be snapshotted; it stays RUNNING.
    s.post("/v1/vms/src/snapshots", r#"{"snapshotId":"s2"}"#).await.assert_error(500, "Failed to create snapshot: failed to copy stateful disk to snapshot directory: source file not found: stat : no such file or directory");
    assert_eq!(s.status_of("src").await.as_deref(), Some("RUNNING"));
    // A failed snapshot leaves its id free.
    s.post("/v1/vms/other/snapshots", r#"{"snapshotId":"s2"}"#).await;
    let state = s.h.sim.state();
    let ids: Vec<&str> = state.snapshots.iter().map(|s| s.snapshot_id.as_str()).collect();
    assert_eq!(ids, ["s1", "s2"]);
}

#[tokio::test]
async fn cmd_endpoint() {
    let s = Sim::new().await;
    s.start("v").await;
    let r = s.cmd("v", "echo hello").await;
    assert_eq!((r.status, r.body.as_str()), (200, "{\"error\":\"\",\"output\":\"hello\\n\"}\n"));
    // Non-zero exit is still a 200.
    assert_eq!(s.cmd("v", "echo out; exit 3").await.body, "{\"error\":\"exit status 3\",\"output\":\"out\\n\"}\n");
    assert_eq!(
        s.cmd("v", "nosuch").await.body,
        "{\"error\":\"exit status 127\",\"output\":\"bash: nosuch: command not found\\n\"}\n"
    );
    assert_eq!(s.cmd("v", "false").await.json()["error"], "exit status 1");
    assert_eq!(s.cmd("v", "hostname; pwd").await.json()["output"], "v\n/tmp/server_files\n");
    // Go escapes <, > and & in JSON.
    assert_eq!(s.cmd("v", "echo '<a&b>'").await.body, "{\"error\":\"\",\"output\":\"\\u003ca\\u0026b\\u003e\\n\"}\n");
    // Strict body.
    let post = |b: &'static str| s.post("/v1/vms/v/cmd", b);
    post(r#"{"cmd":"ls","x":1}"#).await.assert_error(400, "Invalid request format: json: unknown field \"x\"");
    post(r#"{"blocking":true}"#)
        .await
        .assert_error(400, "Invalid request format: no value given for required property cmd");
    post(r#"{"cmd":""}"#).await.assert_error(400, "Command cannot be empty");
    post(r#"{"cmd":null}"#).await.assert_error(400, "Command cannot be empty");
    post("").await.assert_error(400, "Invalid request format: EOF");
    // Guest pre-check failures.
    for bad in ["   ", "echo 'unbalanced", "(subshell)", "; ls", "echo trailing\\"] {
        s.cmd("v", bad).await.assert_error(500, "Failed to execute command: request failed with status: 400");
    }
    // blocking defaults to true; false returns at once and runs in the background.
    let r = s.post("/v1/vms/v/cmd", r#"{"cmd":"sleep 10; echo done > bg.txt","blocking":false}"#).await;
    assert_eq!(r.body, "{\"error\":\"\",\"output\":\"Command '/usr/bin/bash -c sleep 10; echo done \\u003e bg.txt' started in background\"}\n");
    assert_eq!(s.h.sim.vm_file("v", "bg.txt"), None);
    let deadline = Instant::now() + Duration::from_secs(2);
    while s.h.sim.vm_file("v", "bg.txt").is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.h.sim.vm_file("v", "bg.txt").as_deref(), Some("done\n"));
}

#[tokio::test]
async fn cmd_times_out_on_paused_stopped_and_long_commands() {
    let s = Sim::with(SimConfig::for_tests().with_proxy_timeout(Duration::from_millis(80))).await;
    s.start("v").await;
    let timeout_msg = "Failed to execute command: failed to execute request: Post \"http://10.20.1.2:4031/cmd\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)";
    // sleep 1 is 1 ms at the test time scale; sleep 500 is 500 ms, past the proxy timeout.
    assert_eq!(s.cmd("v", "sleep 1 && echo ok").await.json()["output"], "ok\n");
    let t = Instant::now();
    s.cmd("v", "sleep 500; echo late > late.txt").await.assert_error(500, timeout_msg);
    assert!(t.elapsed() >= Duration::from_millis(80));
    s.patch("v", "paused").await;
    let t = Instant::now();
    s.cmd("v", "echo hi").await.assert_error(500, timeout_msg);
    assert!(t.elapsed() >= Duration::from_millis(80));
    s.post("/v1/vms/v/files", r#"{"files":[{"path":"a","content":"b"}]}"#).await.assert_error(
        500,
        "Failed to upload files: rpc error: code = Internal desc = failed to execute request: Post \"http://10.20.1.2:4031/files\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
    );
    s.patch("v", "stopped").await;
    s.get("/v1/vms/v/files?paths=a").await.assert_error(
        500,
        "Failed to download files: rpc error: code = Internal desc = failed to execute request: Get \"http://10.20.1.2:4031/files?paths=a\": dial tcp 10.20.1.2:4031: connect: no route to host",
    );
}

#[tokio::test]
async fn files_endpoints() {
    let s = Sim::new().await;
    s.start("v").await;
    let up = |b: &'static str| s.post("/v1/vms/v/files", b);
    let r = up(r#"{"files":[{"path":"a.txt","content":"A"},{"path":"","content":"skipped"},{"path":"/root/abs.txt","content":"B"}]}"#).await;
    assert_eq!((r.status, r.body.as_str()), (200, "{}\n"));
    assert_eq!(s.h.sim.vm_file("v", "/tmp/server_files/a.txt").as_deref(), Some("A"));
    assert_eq!(s.h.sim.vm_file("v", "/root/abs.txt").as_deref(), Some("B"));
    // Strict bodies and validation.
    up(r#"{"files":[{"path":"a","content":"b","mode":1}]}"#)
        .await
        .assert_error(400, "Invalid request format: json: unknown field \"mode\"");
    up(r#"{"files":[{"path":"a"}]}"#)
        .await
        .assert_error(400, "Invalid request format: no value given for required property content");
    up(r#"{"files":[]}"#).await.assert_error(400, "No files provided for upload");
    up(r#"{"files":null}"#).await.assert_error(400, "No files provided for upload");
    up(r#"{"file":[]}"#).await.assert_error(400, "Invalid request format: no value given for required property files");
    // No parent directories are created; earlier files stay written.
    up(r#"{"files":[{"path":"first","content":"1"},{"path":"no/such/dir/f","content":"x"}]}"#)
        .await
        .assert_error(500, "Failed to upload files: rpc error: code = Internal desc = request failed with status: 500");
    assert_eq!(s.h.sim.vm_file("v", "first").as_deref(), Some("1"));
    s.cmd("v", "mkdir -p no/such/dir").await;
    assert_eq!(up(r#"{"files":[{"path":"no/such/dir/f","content":"x"}]}"#).await.status, 200);

    // Downloads: one entry per path, in order, duplicates included; absolute paths resolve
    // under /tmp/server_files.
    let r = s.get("/v1/vms/v/files?paths=a.txt,nope,a.txt,/root/abs.txt,no").await;
    assert_eq!(r.status, 200);
    let expected = concat!(
        "{\"files\":[",
        "{\"content\":\"A\",\"error\":\"\",\"path\":\"a.txt\"},",
        "{\"content\":\"\",\"error\":\"Failed to read file: open /tmp/server_files/nope: no such file or directory\",\"path\":\"nope\"},",
        "{\"content\":\"A\",\"error\":\"\",\"path\":\"a.txt\"},",
        "{\"content\":\"\",\"error\":\"Failed to read file: open /tmp/server_files/root/abs.txt: no such file or directory\",\"path\":\"/root/abs.txt\"},",
        "{\"content\":\"\",\"error\":\"Failed to read file: read /tmp/server_files/no: is a directory\",\"path\":\"no\"}",
        "]}\n"
    );
    assert_eq!(r.body, expected);
    s.get("/v1/vms/v/files").await.assert_error(400, "Missing 'paths' query parameter");
    s.get("/v1/vms/v/files?paths=").await.assert_error(400, "Missing 'paths' query parameter");
    // The paths check runs before the VM lookup.
    s.get("/v1/vms/ghost/files").await.assert_error(400, "Missing 'paths' query parameter");
}

#[tokio::test]
async fn router_answers() {
    let s = Sim::new().await;
    for path in ["/nope", "/v1/vms/", "/v1", "/v1/vms/a/b", "/v1/vms/a%2Fb"] {
        let r = s.get(path).await;
        assert_eq!(
            (r.status, r.content_type.as_deref(), r.body.as_str()),
            (404, Some("text/plain; charset=utf-8"), "404 page not found\n"),
            "{path}"
        );
    }
    for (method, path) in
        [("PUT", "/v1/vms"), ("DELETE", "/v1/health"), ("POST", "/v1/vms/x"), ("GET", "/v1/vms/x/cmd")]
    {
        let r = s.req(method, path, None).await;
        assert_eq!((r.status, r.content_type.as_deref(), r.body.as_str()), (405, None, ""), "{method} {path}");
    }
    let raw = s.raw("GET //v1/vms HTTP/1.1").await;
    assert!(raw.starts_with("HTTP/1.1 301"), "{raw}");
    assert!(raw.to_lowercase().contains("location: /v1/vms\r\n"), "{raw}");
    assert!(!raw.to_lowercase().contains("content-type"), "{raw}");
    let raw = s.raw("GET /v1/vms/../health?x=1 HTTP/1.1").await;
    assert!(raw.to_lowercase().contains("location: /v1/health?x=1\r\n"), "{raw}");
    let raw = s.raw("DELETE /v1/vms/%2E%2E HTTP/1.1").await;
    assert!(raw.starts_with("HTTP/1.1 301") && raw.to_lowercase().contains("location: /v1\r\n"), "{raw}");
    let raw = s.raw("GET /v1/./health HTTP/1.1").await;
    assert!(raw.starts_with("HTTP/1.1 301"), "{raw}");
}

#[tokio::test]
async fn odd_names_are_decoded_from_the_path() {
    let s = Sim::new().await;
    let name = "odd name?#%ü";
    let body = serde_json::json!({ "vmName": name }).to_string();
    assert_eq!(s.post("/v1/vms", &body).await.status, 200);
    let encoded = "odd%20name%3F%23%25%C3%BC";
    let r = s.get(&format!("/v1/vms/{encoded}")).await;
    assert_eq!(r.json()["vmName"], name);
    assert_eq!(s.cmd(encoded, "hostname").await.json()["output"], format!("{name}\n"));
}

#[tokio::test]
async fn delete_all_and_allocators() {
    let s = Sim::with(SimConfig::for_tests().with_shuffle_list(false).with_port_range(3000, 3017)).await;
    assert_eq!(s.delete("/v1/vms").await.body, SUCCESS);
    s.start("a").await;
    s.start("b").await;
    s.delete("/v1/vms/a").await;
    // Freed IP and tap go to the back of the FIFO; ports are never reused.
    assert_eq!(s.start("c").await.body, vm_json("c", 4, 2, 3012, "RUNNING"));
    s.start("d").await.assert_error(500, "Failed to start VM: failed to forward ports to VM: failed to allocate port: no available ports in range 3000-3017");
    assert_eq!(s.status_of("d").await, None);
    assert_eq!(s.delete("/v1/vms").await.body, SUCCESS);
    assert_eq!(s.get("/v1/vms").await.body, "{}\n");
    // A restart resets the allocators (ports included) and keeps snapshots.
    s.h.sim.restart();
    assert_eq!(s.start("e").await.body, vm_json("e", 2, 0, 3000, "RUNNING"));
}
