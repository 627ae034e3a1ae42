//! The `durable` dispatch mode's push channel: one WebSocket per served server to that
//! server's host queue object (`GET /hosts/{server}/connect` on the consumer worker). The
//! object sends every task that becomes claimable, and on each (re)connect everything
//! claimable now, so a reconnect redelivers what a lost connection missed.
//!
//! A push is only a hint for [`crate::edge::EdgeClient::ready`]: claims, heartbeats and
//! reports stay HTTP with their usual idempotency, and a full listing every `RELIST_SECONDS`
//! covers a push that never arrived. While connected the daemon sends no long polls, so an
//! idle host costs the object nothing but a `ping` every [`PING_EVERY`], which the runtime
//! answers without waking it, and the host report's full listing every `HOST_REPORT_SECONDS`
//! (see [`crate::edge`]).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use reqwest::Url;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue, Message};
use vm_task_types::wire::{BufferedTask, HostPush, ReadyTasksResponse};

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
                let outcome = serve(&channel, socket).await;
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

/// Reads pushes until the socket ends; says `ping` meanwhile.
async fn serve(channel: &PushChannel, socket: Socket) -> String {
    let (mut sink, mut stream) = socket.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if let Err(e) = sink.send(Message::text("ping")).await {
                    return e.to_string();
                }
            }
            message = tokio::time::timeout(SILENCE_LIMIT, stream.next()) => match message {
                Err(_) => return "silent too long".into(),
                Ok(None) => return "closed by the worker".into(),
                Ok(Some(Err(e))) => return e.to_string(),
                Ok(Some(Ok(Message::Text(text)))) => {
                    if let Ok(HostPush::Ready { tasks }) = serde_json::from_str(&text) {
                        channel.deliver(tasks);
                    }
                }
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
}
