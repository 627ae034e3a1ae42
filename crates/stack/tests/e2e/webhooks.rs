//! Signed webhooks against the real stack: a receiver on this machine gets one delivery per
//! terminal task, signed as the Standard Webhooks specification says (checked here with the
//! `hmac`, `sha2` and `base64` crates, not with the workers' code), retried with the same
//! `webhook-id` while it fails or is down, each attempt on the task's timeline.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use stack::{ApiClient, StackOptions};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use uuid::Uuid;
use vm_task_types::TaskStatus;

use crate::support::*;

/// The specification's tolerance for `webhook-timestamp` against the receiver's clock.
const TOLERANCE_SECS: u64 = 5 * 60;

/// One POST the receiver got.
#[derive(Clone)]
struct Delivery {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
    received_ms: u64,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.id)
            .field("timestamp", &self.timestamp)
            .field("received_ms", &self.received_ms)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish_non_exhaustive()
    }
}

impl Delivery {
    fn event(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A small HTTP/1.1 receiver: answers each POST with the next scripted status (200 once the
/// script is used up) and keeps what it received.
#[derive(Clone, Default)]
struct Receiver {
    script: Arc<Mutex<VecDeque<u16>>>,
    received: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    fn answering(statuses: &[u16]) -> Self {
        Self { script: Arc::new(Mutex::new(statuses.iter().copied().collect())), ..Self::default() }
    }

    /// Serves on `listener` until the test ends.
    fn serve(&self, listener: TcpListener) {
        let receiver = self.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let receiver = receiver.clone();
                tokio::spawn(async move { receiver.answer(socket).await });
            }
        });
    }

    async fn answer(&self, mut socket: TcpStream) {
        let _ = socket.set_nodelay(true);
        let mut data = Vec::new();
        let mut chunk = [0u8; 8192];
        let (head_end, length) = loop {
            let Ok(n) = socket.read(&mut chunk).await else { return };
            if n == 0 {
                return;
            }
            data.extend_from_slice(&chunk[..n]);
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                let length = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0usize);
                break (end + 4, length);
            }
        };
        while data.len() < head_end + length {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => data.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
        let lower = head.to_ascii_lowercase();
        let value = |name: &str| {
            // Values keep their case (base64); names are matched case-insensitively.
            let start = lower.find(&format!("\r\n{name}:"))? + name.len() + 3;
            let end = head[start..].find("\r\n").map_or(head.len(), |e| start + e);
            Some(head[start..end].trim().to_owned())
        };
        self.received.lock().unwrap().push(Delivery {
            id: value("webhook-id").unwrap_or_default(),
            timestamp: value("webhook-timestamp").unwrap_or_default(),
            signature: value("webhook-signature").unwrap_or_default(),
            body: data[head_end..head_end + length].to_vec(),
            received_ms: now_ms(),
        });
        let status = self.script.lock().unwrap().pop_front().unwrap_or(200);
        let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        let _ = socket.write_all(answer.as_bytes()).await;
        let _ = socket.shutdown().await;
    }

    fn received(&self) -> Vec<Delivery> {
        self.received.lock().unwrap().clone()
    }

    fn for_task(&self, id: Uuid) -> Vec<Delivery> {
        self.received().into_iter().filter(|d| d.event()["taskId"] == json!(id)).collect()
    }

    /// Waits until `count` deliveries of task `id` arrived, within `timeout`.
    async fn wait_for(&self, id: Uuid, count: usize, timeout: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.for_task(id);
            if got.len() >= count {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "task {id}: {} of {count} deliveries in {timeout:?}; all received: {:?}",
                got.len(),
                self.received()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A listener on a free loopback port.
async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// The specification's verification, written from it: the key is the base64 after `whsec_`;
/// the signed content is `{id}.{timestamp}.{body}`; any `v1,` signature of the
/// space-separated list must equal the base64 HMAC-SHA256; the timestamp must be within the
/// tolerance of `now_secs`.
fn verify(secret: &str, id: &str, timestamp: &str, signatures: &str, body: &[u8], now_secs: u64) -> Result<(), String> {
    let key =
        BASE64.decode(secret.strip_prefix("whsec_").ok_or("secret without whsec_")?).map_err(|e| e.to_string())?;
    let ts: u64 = timestamp.parse().map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    if ts.abs_diff(now_secs) > TOLERANCE_SECS {
        return Err(format!("timestamp {ts} is outside the tolerance of {now_secs}"));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = BASE64.encode(mac.finalize().into_bytes());
    let matches = signatures.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|s| s == expected);
    matches.then_some(()).ok_or_else(|| format!("no v1 signature matches in {signatures:?}"))
}

fn submit_body(kind: &str, payload: Value, callback: &str) -> Value {
    json!({"type": kind, "payload": payload, "callbackUrl": callback})
}

/// The task's webhook timeline entries.
async fn webhook_entries(api: &ApiClient, id: Uuid) -> Vec<String> {
    let task = api.task(id).await.unwrap();
    task.timeline.iter().filter(|e| e.event == "webhook").map(|e| e.message.clone()).collect()
}

async fn wait_for_entries(api: &ApiClient, id: Uuid, count: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let entries = webhook_entries(api, id).await;
        if entries.len() >= count {
            return entries;
        }
        assert!(Instant::now() < deadline, "task {id}: {entries:?} after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A completed, a failed and a cancelled task each reach the receiver once, within 2 s of
/// becoming terminal, signed, with the task's status body; a forged body and a timestamp
/// outside the tolerance fail the same check.
#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn each_terminal_task_is_delivered_once_signed_within_2_s() {
    let (listener, addr) = listen().await;
    let receiver = Receiver::default();
    receiver.serve(listener);
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let hook = format!("http://{addr}/hooks/vm");

    let launch = submit_body("launch_vm", json!({"vmName": "hook-vm", "targetServer": "production"}), &hook);
    let completed = api.submit(&launch).await.unwrap().task_id;
    // A command on a VM that does not exist fails at Arrakis.
    let missing = submit_body(
        "run_command",
        json!({"vmName": "no-such-vm", "command": "true", "targetServer": "production"}),
        &hook,
    );
    let failed = api.submit(&missing).await.unwrap().task_id;
    // Nobody serves this server: the task stays pending until cancelled.
    let parked = submit_body("stop_vm", json!({"vmName": "parked-vm", "targetServer": "unserved"}), &hook);
    let cancelled = api.submit(&parked).await.unwrap().task_id;
    api.cancel(cancelled).await.unwrap();

    let secret = stack.webhook_secret();
    for (id, want) in
        [(completed, TaskStatus::Completed), (failed, TaskStatus::Failed), (cancelled, TaskStatus::Cancelled)]
    {
        let status = api.wait_terminal(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(status.status, want, "task {id}");
        let delivery = receiver.wait_for(id, 1, Duration::from_secs(10)).await.remove(0);
        let late = delivery.received_ms.saturating_sub(status.updated_at.as_millis());
        assert!(late <= 2_000, "task {id} ({want}) delivered {late} ms after it became terminal");
        assert_eq!(delivery.id, format!("msg_{}", id.simple()));
        let now = now_ms() / 1_000;
        verify(secret, &delivery.id, &delivery.timestamp, &delivery.signature, &delivery.body, now)
            .unwrap_or_else(|e| panic!("task {id}: {e}"));
        // The body is the task's status body, as GET /vm/tasks/:id/status answers it.
        assert_eq!(delivery.event(), serde_json::to_value(api.status(id).await.unwrap()).unwrap());

        let mut forged = delivery.event();
        forged["status"] = json!("completed");
        forged["error"] = Value::Null;
        let forged = serde_json::to_vec(&forged).unwrap();
        assert!(forged != delivery.body);
        assert!(verify(secret, &delivery.id, &delivery.timestamp, &delivery.signature, &forged, now).is_err());
        let late_check = now + TOLERANCE_SECS + 1;
        let replayed =
            verify(secret, &delivery.id, &delivery.timestamp, &delivery.signature, &delivery.body, late_check);
        assert!(replayed.unwrap_err().contains("tolerance"));
        let other_id = verify(secret, "msg_other", &delivery.timestamp, &delivery.signature, &delivery.body, now);
        assert!(other_id.is_err());
        let entries = wait_for_entries(&api, id, 1, Duration::from_secs(5)).await;
        assert!(entries[0].contains("attempt 1") && entries[0].contains("delivered"), "{entries:?}");
    }
    // Exactly one each: nothing more arrives afterwards.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in [completed, failed, cancelled] {
        let got = receiver.for_task(id);
        let timeline = api.task(id).await.unwrap().timeline;
        assert_eq!(got.len(), 1, "task {id}: {got:?}\n{timeline:#?}");
    }
    stack.shutdown().await.unwrap();
}

/// 500, 500, then 200: the same `webhook-id` three times, 2 s and 10 s apart as scheduled, and
/// three attempts on the timeline.
#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_receiver_failing_twice_gets_the_same_id_three_times() {
    let (listener, addr) = listen().await;
    let receiver = Receiver::answering(&[500, 500]);
    receiver.serve(listener);
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let body = submit_body(
        "launch_vm",
        json!({"vmName": "retry-vm", "targetServer": "production"}),
        &format!("http://{addr}/h"),
    );
    let id = api.submit(&body).await.unwrap().task_id;
    api.wait_terminal(id, Duration::from_secs(60)).await.unwrap();
    let deliveries = receiver.wait_for(id, 3, Duration::from_secs(30)).await;
    assert!(deliveries.iter().all(|d| d.id == deliveries[0].id), "one id: {deliveries:?}");
    assert!(deliveries.iter().all(|d| d.body == deliveries[0].body), "the same body every attempt");
    let gaps: Vec<u64> = deliveries.windows(2).map(|w| w[1].received_ms - w[0].received_ms).collect();
    assert!(gaps[0] >= 1_900 && gaps[1] >= 9_900, "the schedule's 2 s and 10 s: {gaps:?} ms");
    for d in &deliveries {
        let ts: u64 = d.timestamp.parse().unwrap();
        verify(stack.webhook_secret(), &d.id, &d.timestamp, &d.signature, &d.body, ts).unwrap();
    }
    let entries = wait_for_entries(&api, id, 3, Duration::from_secs(5)).await;
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert!(entries[0].contains("HTTP 500") && entries[0].contains("next attempt in 2 s"), "{entries:?}");
    assert!(entries[1].contains("HTTP 500") && entries[1].contains("next attempt in 10 s"), "{entries:?}");
    assert!(entries[2].contains("HTTP 200") && entries[2].contains("delivered"), "{entries:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.for_task(id).len(), 3, "nothing after the 200");
    stack.shutdown().await.unwrap();
}

/// The receiver's port refuses connections for a minute after the task finishes, then a
/// receiver listens there: the event arrives on a later attempt (the schedule's 2, 10, 30, 60 s
/// put it at about 102 s), and the refused attempts are on the timeline. This test takes
/// about two minutes.
#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn a_receiver_down_for_a_minute_still_gets_the_event() {
    // A free port, closed again: connections to it are refused until we listen.
    let (listener, addr) = listen().await;
    drop(listener);
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let body = submit_body(
        "launch_vm",
        json!({"vmName": "down-vm", "targetServer": "production"}),
        &format!("http://{addr}/h"),
    );
    let id = api.submit(&body).await.unwrap().task_id;
    let done = api.wait_terminal(id, Duration::from_secs(60)).await.unwrap();
    let up_at = Instant::now() + Duration::from_secs(60);
    let refused = wait_for_entries(&api, id, 1, Duration::from_secs(10)).await;
    assert!(refused[0].contains("network error") && refused[0].contains("next attempt in 2 s"), "{refused:?}");
    tokio::time::sleep_until(up_at.into()).await;
    let receiver = Receiver::default();
    receiver.serve(TcpListener::bind(addr).await.expect("the port is still free"));
    let deliveries = receiver.wait_for(id, 1, Duration::from_secs(90)).await;
    assert_eq!(deliveries.len(), 1);
    let d = &deliveries[0];
    assert_eq!(d.id, format!("msg_{}", id.simple()));
    assert!(d.received_ms >= done.updated_at.as_millis() + 60_000);
    verify(stack.webhook_secret(), &d.id, &d.timestamp, &d.signature, &d.body, now_ms() / 1_000).unwrap();
    let entries = wait_for_entries(&api, id, 5, Duration::from_secs(5)).await;
    assert!(entries[..entries.len() - 1].iter().all(|e| e.contains("network error")), "{entries:?}");
    assert!(entries.last().unwrap().contains("delivered"), "{entries:?}");
    stack.shutdown().await.unwrap();
}
