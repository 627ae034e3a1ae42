//! The `durable` dispatch mode's push channel: one WebSocket per served server to that
//! server's host queue object (`GET /hosts/{server}/connect` on the consumer worker). The
//! object sends every task that becomes claimable, and on each (re)connect everything
//! claimable now, so a reconnect redelivers what a lost connection missed.
//!
//! A push is only a hint for [`crate::edge::EdgeClient::ready`]: a full listing every
//! `RELIST_SECONDS` covers a push that never arrived. Claims, heartbeats, releases and reports
//! go over the same socket while it is open ([`PushChannel::call`]), straight to the object
//! that answers them, skipping both workers' HTTP path; one that gets no answer (the socket
//! dropped, or stayed silent for [`CALL_TIMEOUT`]) is sent again over HTTP, which the
//! operations' idempotency makes safe. While connected the daemon sends no long polls, so an
//! idle host costs the object nothing but a `ping` every [`PING_EVERY`], which the runtime
//! answers without waking it, and the host report's full listing every `HOST_REPORT_SECONDS`
//! (see [`crate::edge`]).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use reqwest::Url;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue, Message};
use uuid::Uuid;
use vm_task_types::wire::{BufferedTask, HostCall, HostOp, HostPush, ReadyTasksResponse};

/// The bell of a listing made of pushed tasks starts with this; a polled bell never does.
const PUSHED_BELL_PREFIX: &str = "push-";

/// A listing of the tasks pushed since the last one: partial (others the daemon knows stay),
/// numbered `n` so the loop sees each as new.
pub fn pushed_listing(tasks: Vec<BufferedTask>, n: u64) -> ReadyTasksResponse {
    ReadyTasksResponse {
        success: true,
        count: tasks.len(),
        tasks,
        bell: format!("{PUSHED_BELL_PREFIX}{n}"),
        list_complete: false,
    }
}

/// Whether a listing came from pushes. Such a listing is partial by nature, not cut at a page
/// limit, so it calls for no full listing: the object pushes every task that becomes
/// claimable, sends all of them on each (re)connect, and the RELIST_SECONDS listing covers
/// a push lost in between.
pub fn is_pushed(listing: &ReadyTasksResponse) -> bool {
    listing.bell.starts_with(PUSHED_BELL_PREFIX)
}

use crate::retry::{Jitter, RetryPolicy};

/// How often an open socket says `ping` (the object's auto-response answers `pong`).
pub const PING_EVERY: Duration = Duration::from_secs(20);
/// Waits before reconnecting: full jitter ([`crate::retry`]) under a ceiling that starts at
/// 100 ms and doubles to 1 s, so a restarted worker is reached again within about a second of
/// answering, and daemons that lost it together do not all knock at the same instant.
const RECONNECT: RetryPolicy =
    RetryPolicy { retries: u32::MAX, base: Duration::from_millis(100), cap: Duration::from_secs(1) };
/// A connection that says nothing (not even `pong`) for this long is taken as dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(3 * PING_EVERY.as_secs());
/// A call over the socket unanswered for this long is sent over HTTP instead.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer to a call over the socket: the HTTP status and body the route would have given.
pub type Answer = (u16, String);

/// A call waiting for a socket to send it: the operation, and where its answer goes.
type Outgoing = (Uuid, HostOp, oneshot::Sender<Answer>);

/// The push channel of every served server.
#[derive(Debug, Default)]
pub struct PushChannel {
    pending: Mutex<Vec<BufferedTask>>,
    arrived: Notify,
    started: AtomicBool,
    /// Sockets open now.
    open: AtomicUsize,
    servers: AtomicUsize,
    /// Counts sockets opened, so a poll backing off from an unreachable worker can stop
    /// waiting the moment a socket is back ([`PushChannel::opened`]).
    opens: tokio::sync::watch::Sender<u64>,
    /// The open socket of each server, as the queue its calls are sent through.
    callers: Mutex<HashMap<String, mpsc::UnboundedSender<Outgoing>>>,
    /// Calls answered over a socket, and calls sent to one that gave no answer (then sent
    /// over HTTP), by operation: `/metrics` shows whether the socket carries the work.
    answered: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    unanswered: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl PushChannel {
    /// Opens (and keeps reopening) one socket per server, once; later calls do nothing.
    pub fn start(self: &Arc<Self>, consumer: &Url, token: &str, servers: &[String]) {
        if self.started.swap(true, SeqCst) {
            return;
        }
        self.servers.store(servers.len(), SeqCst);
        for server in servers {
            let mut url = consumer.join(&format!("hosts/{server}/connect")).expect("server names are path-safe");
            let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
            let _ = url.set_scheme(scheme);
            tokio::spawn(keep_connected(self.clone(), url, token.to_owned(), server.clone()));
        }
    }

    /// Resolves when a socket opens after this call (never, if none does).
    pub fn opened(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut opens = self.opens.subscribe();
        async move {
            if opens.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Every server's socket is open: pushes can stand in for long polls.
    pub fn live(&self) -> bool {
        let servers = self.servers.load(SeqCst);
        servers > 0 && self.open.load(SeqCst) >= servers
    }

    /// Tasks pushed since the last call, waiting up to `wait` for some; `None` when none came.
    pub async fn next(&self, wait: Duration) -> Option<Vec<BufferedTask>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            let tasks = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
            if !tasks.is_empty() {
                return Some(tasks);
            }
            // A socket that dropped meanwhile: let the caller fall back to polling.
            if !self.live() || tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }

    /// Sends `op` about task `id` over `server`'s socket and waits for the answer. `None`
    /// when no socket of `server` is open, it closed before answering, or [`CALL_TIMEOUT`]
    /// passed: the caller then sends the operation over HTTP.
    pub async fn call(&self, server: &str, id: Uuid, op: HostOp) -> Option<Answer> {
        let caller = self.callers.lock().unwrap_or_else(|p| p.into_inner()).get(server).cloned()?;
        let name = op.name();
        let (answer_to, answer) = oneshot::channel();
        let answer = match caller.send((id, op, answer_to)) {
            Ok(()) => tokio::time::timeout(CALL_TIMEOUT, answer).await.ok().and_then(Result::ok),
            Err(_) => None,
        };
        let counts = if answer.is_some() { &self.answered } else { &self.unanswered };
        *counts.lock().unwrap_or_else(|p| p.into_inner()).entry(name).or_default() += 1;
        answer
    }

    /// The call counters in Prometheus' text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, counts) in [
            (
                "local_consumer_socket_calls_total",
                "Claims, heartbeats, releases and reports answered over the push socket.",
                &self.answered,
            ),
            (
                "local_consumer_socket_calls_unanswered_total",
                "Calls the push socket did not answer (closed, or silent for 10 s), sent over HTTP instead.",
                &self.unanswered,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (op, count) in counts.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = writeln!(out, "{name}{{op=\"{op}\"}} {count}");
            }
        }
    }

    fn deliver(&self, tasks: Vec<BufferedTask>) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).extend(tasks);
        self.arrived.notify_waiters();
    }
}

async fn keep_connected(channel: Arc<PushChannel>, url: Url, token: String, server: String) {
    let jitter = Jitter::from_entropy();
    let mut failures = 0;
    loop {
        match connect(&url, &token).await {
            Ok(socket) => {
                tracing::info!(%server, "push channel open");
                let opened = tokio::time::Instant::now();
                channel.open.fetch_add(1, SeqCst);
                channel.opens.send_modify(|n| *n += 1);
                let (caller, calls) = mpsc::unbounded_channel();
                channel.callers.lock().unwrap_or_else(|p| p.into_inner()).insert(server.clone(), caller);
                let outcome = serve(&channel, socket, calls).await;
                channel.callers.lock().unwrap_or_else(|p| p.into_inner()).remove(&server);
                // Only a socket that stayed up resets the backoff: one the worker accepts and
                // drops at once must not be reopened (and wake the poll) ten times a second.
                if opened.elapsed() >= PING_EVERY {
                    failures = 0;
                }
                channel.open.fetch_sub(1, SeqCst);
                // Wake a waiting poll so it falls back to HTTP while we reconnect.
                channel.arrived.notify_waiters();
                tracing::warn!(%server, "push channel closed: {outcome}; reconnecting");
            }
            Err(e) => tracing::debug!(%server, "push channel: {e}"),
        }
        failures += 1;
        tokio::time::sleep(RECONNECT.delay(failures, &jitter)).await;
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &Url, token: &str) -> Result<Socket, String> {
    let mut request = url.as_str().into_client_request().map_err(|e| e.to_string())?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
    request.headers_mut().insert("authorization", bearer);
    let (socket, _) =
        tokio_tungstenite::connect_async_with_config(request, None, true).await.map_err(|e| e.to_string())?;
    Ok(socket)
}

/// Reads pushes and answers until the socket ends, sends the calls queued for it, and says
/// `ping` meanwhile. Calls unanswered when it ends are dropped, which their callers see.
async fn serve(channel: &PushChannel, socket: Socket, mut calls: mpsc::UnboundedReceiver<Outgoing>) -> String {
    let (mut sink, mut stream) = socket.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut next_call = 0u64;
    let mut waiting: HashMap<u64, oneshot::Sender<Answer>> = HashMap::new();
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if let Err(e) = sink.send(Message::text("ping")).await {
                    return e.to_string();
                }
            }
            Some((task_id, op, answer_to)) = calls.recv() => {
                next_call += 1;
                // A caller that gave up meanwhile leaves only its entry, dropped here.
                waiting.retain(|_, waiter| !waiter.is_closed());
                waiting.insert(next_call, answer_to);
                let text = serde_json::to_string(&HostCall { call: next_call, task_id, op }).unwrap_or_default();
                if let Err(e) = sink.send(Message::text(text)).await {
                    return e.to_string();
                }
            }
            message = tokio::time::timeout(SILENCE_LIMIT, stream.next()) => match message {
                Err(_) => return "silent too long".into(),
                Ok(None) => return "closed by the worker".into(),
                Ok(Some(Err(e))) => return e.to_string(),
                Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(&text) {
                    Ok(HostPush::Ready { tasks }) => channel.deliver(tasks),
                    Ok(HostPush::Answer { call, status, body }) => {
                        if let Some(waiter) = waiting.remove(&call) {
                            let _ = waiter.send((status, body.to_string()));
                        }
                    }
                    Err(_) => {}
                },
                Ok(Some(Ok(Message::Close(_)))) => return "closed by the worker".into(),
                Ok(Some(Ok(_))) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::tests::first_byte_listener;

    /// Deployed workers answer `wss://` only: the push socket must speak TLS, as the daemon's
    /// HTTP does (the socket was once built without TLS support and failed before connecting).
    #[tokio::test]
    async fn the_push_socket_speaks_tls_to_https_workers() {
        let (port, first_byte) = first_byte_listener().await;
        let url = Url::parse(&format!("wss://127.0.0.1:{port}/hosts/production/connect")).unwrap();
        // No TLS server answers, so the connection fails; what matters is what was sent.
        let _ = tokio::time::timeout(Duration::from_secs(5), connect(&url, "t")).await;
        assert_eq!(first_byte.await, 0x16, "the first byte of a TLS handshake record");
    }

    /// Calls go over the open socket and come back with their answer; a call whose socket
    /// closes before answering, or to a server with no socket, returns `None` at once (the
    /// caller then uses HTTP) rather than after [`CALL_TIMEOUT`].
    #[tokio::test]
    async fn calls_are_answered_over_the_socket_and_give_way_to_http_when_it_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut socket = tokio_tungstenite::accept_async(stream).await.unwrap();
            while let Some(Ok(message)) = socket.next().await {
                let Message::Text(text) = message else { continue };
                let Ok(call) = serde_json::from_str::<HostCall>(&text) else { continue };
                if call.call > 1 {
                    // The second call: the worker goes away without answering.
                    let _ = socket.close(None).await;
                    return;
                }
                let body = serde_json::json!({"op": call.op.name(), "taskId": call.task_id});
                let answer = HostPush::Answer { call: call.call, status: 200, body };
                socket.send(Message::text(serde_json::to_string(&answer).unwrap())).await.unwrap();
            }
        });
        let channel = Arc::new(PushChannel::default());
        let consumer = Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        channel.start(&consumer, "t", &["production".to_owned()]);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !channel.live() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the socket opens");

        let id = Uuid::from_u128(9);
        let lease = vm_task_types::wire::LeaseRequest { claim_id: id, lease_seconds: Some(60), reason: None };
        let (status, body) = channel.call("production", id, HostOp::Heartbeat(lease.clone())).await.expect("answered");
        assert_eq!(status, 200);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body, serde_json::json!({"op": "heartbeat", "taskId": id}));

        let started = tokio::time::Instant::now();
        assert_eq!(channel.call("production", id, HostOp::Heartbeat(lease.clone())).await, None);
        assert!(started.elapsed() < Duration::from_secs(2), "no wait for the timeout: {:?}", started.elapsed());
        assert_eq!(channel.call("staging", id, HostOp::Heartbeat(lease)).await, None, "no socket to staging");
        let mut metrics = String::new();
        channel.render_metrics(&mut metrics);
        assert!(metrics.contains("local_consumer_socket_calls_total{op=\"heartbeat\"} 1\n"), "{metrics}");
        assert!(metrics.contains("local_consumer_socket_calls_unanswered_total{op=\"heartbeat\"} 1\n"), "{metrics}");
    }
}
