//! The daemon's view of the two workers, [`Edge`], and its HTTP implementation,
//! [`EdgeClient`]: poll, claim, renew, release, report, look up a task.
//!
//! The daemon's decisions run over the trait, so tests (and a deterministic simulation) drive
//! them with an in-process fake in simulated time; only [`EdgeClient`] knows URLs, sockets and
//! the wall clock. Errors are split the way the daemon must act on them: a transient failure
//! (network, 5xx, 429) is retried with backoff; a refusal (other 4xx) is final and carries the
//! body.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
        Arc,
    },
    time::Duration,
};

use arrakis_client::{error_chain, read_capped};
use reqwest::{Method, StatusCode, Url};
use serde::{de::DeserializeOwned, Serialize};
use uuid::Uuid;
use vm_task_types::{
    wire::{
        BufferedTask, ClaimRequest, ClaimResponse, ErrorBody, HostOp, LeaseRequest, LeaseResponse, ReadyTasksResponse,
        TaskStatusResponse, UpdateStatusRequest,
    },
    TaskStatus, Timestamp,
};

use crate::{config::Config, push::PushChannel};

/// The header on the consumer worker's answers that names its dispatch mode.
const MODE_HEADER: &str = "x-dispatch-mode";

/// Largest worker answer read: a full listing of 1,000 entries is about 300 KB.
const RESPONSE_MAX_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Worth retrying: the request may not have been processed.
    #[error("{0}")]
    Transient(String),
    /// The worker refused the request; retrying the same request will not help.
    #[error("HTTP {status}: {}", body.error)]
    Refused { status: u16, body: ErrorBody },
}

impl EdgeError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

/// What a claim attempt found.
#[derive(Debug)]
pub enum ClaimOutcome {
    Claimed(Box<ClaimResponse>),
    /// The task is terminal (cancelled, say): it will not run.
    Finished(TaskStatus),
    /// Another claim's lease holds it for about this long yet.
    Held(Duration),
    /// The API has no record of the task (404), though it is listed: its record has not
    /// reached the location that answered yet (KV takes up to 60 s to propagate, and caches
    /// the absence). The buffer entry proves the task exists, so this means "not yet".
    NotVisible,
}

/// What a renewed lease's answer said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Renewal {
    /// The client asked to cancel the task (only a long command's heartbeat says so).
    pub cancel_requested: bool,
}

/// The calls the daemon makes to the workers. Futures are `Send`: each task's job runs on the
/// multi-threaded runtime.
pub trait Edge: Send + Sync + 'static {
    /// Buffered tasks of `servers`, oldest first. With `since`, waits up to `wait` at the
    /// worker for the doorbell to change before listing. `hot`: work was just seen, so ask the
    /// worker to check the doorbell quickly at first.
    fn ready(
        &self,
        servers: &[String],
        since: Option<&str>,
        wait: Duration,
        hot: bool,
    ) -> impl Future<Output = Result<ReadyTasksResponse, EdgeError>> + Send;

    /// Claims a listed task for `lease`.
    fn claim(
        &self,
        task: &BufferedTask,
        lease: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, EdgeError>> + Send;

    /// Renews the claim's lease.
    fn heartbeat(
        &self,
        id: Uuid,
        claim_id: Uuid,
        lease: Duration,
    ) -> impl Future<Output = Result<(), EdgeError>> + Send;

    /// Renews the claim's lease and says whether the task's client asked to cancel it (a
    /// long command's heartbeat carries that answer). An edge that cannot tell says no.
    fn renew(
        &self,
        id: Uuid,
        claim_id: Uuid,
        lease: Duration,
    ) -> impl Future<Output = Result<Renewal, EdgeError>> + Send {
        let renewed = self.heartbeat(id, claim_id, lease);
        async move { renewed.await.map(|()| Renewal::default()) }
    }

    /// Gives a claimed, unstarted task back.
    fn release(&self, id: Uuid, claim_id: Uuid, reason: &str) -> impl Future<Output = Result<(), EdgeError>> + Send;

    /// Reports a task's outcome. `Ok` means the worker accepted it.
    fn report(&self, id: Uuid, update: &UpdateStatusRequest) -> impl Future<Output = Result<(), EdgeError>> + Send;

    /// A task's status (`None` when the API does not know it), for checking that a VM's
    /// previous task has finished.
    fn task_status(&self, id: Uuid) -> impl Future<Output = Result<Option<TaskStatusResponse>, EdgeError>> + Send;

    /// Resolves when the workers are reachable again by other means than a poll (a push socket
    /// opened after this call), so a poll backing off can go at once. An edge without such means
    /// never resolves it.
    fn reconnected(&self) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }
}

#[derive(Debug, Clone)]
pub struct EdgeClient {
    http: reqwest::Client,
    consumer: Url,
    api: Url,
    token: String,
    consumer_id: String,
    /// Random per process: claim ids are derived from it, so a retried claim of this process
    /// is recognised and a restarted daemon's is not.
    instance: Uuid,
    /// The consumer worker said `x-dispatch-mode: durable`: tasks are pushed over WebSockets.
    durable: Arc<AtomicBool>,
    push: Arc<PushChannel>,
    /// Numbers the bells of pushed listings, so the loop sees each as new.
    pushes: Arc<AtomicU64>,
    /// What polls report to the host registry, and when.
    host: Arc<HostReporter>,
}

/// The daemon's report for the host registry, carried by a poll every `HOST_REPORT_SECONDS`
/// (see the edge's `hosts` module). Tasks in flight are the claims this process holds: added
/// on a claim, removed on a final report or a release.
#[derive(Debug)]
struct HostReporter {
    every: Option<Duration>,
    host_name: String,
    concurrency: usize,
    arrakis: Option<arrakis_client::ArrakisClient>,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    /// Claims held, with their task's server (named on heartbeats and releases).
    held: std::sync::Mutex<std::collections::HashMap<Uuid, String>>,
}

impl HostReporter {
    /// How long until the next report is due; zero when it is due now, `Duration::MAX` when
    /// this daemon never reports.
    fn due_in(&self) -> Duration {
        let Some(every) = self.every else { return Duration::MAX };
        match *self.last.lock().expect("not poisoned") {
            Some(at) => every.saturating_sub(at.elapsed()),
            None => Duration::ZERO,
        }
    }

    /// The server of a claim this process holds.
    fn server_of(&self, id: Uuid) -> Option<String> {
        self.held.lock().expect("not poisoned").get(&id).cloned()
    }

    /// The report's query pairs when one is due, else `None`.
    async fn due(&self, consumer_id: &str) -> Option<Vec<(&'static str, String)>> {
        let every = self.every?;
        {
            let mut last = self.last.lock().expect("not poisoned");
            if last.is_some_and(|at| at.elapsed() < every) {
                return None;
            }
            *last = Some(std::time::Instant::now());
        }
        let arrakis = match &self.arrakis {
            Some(client) => match tokio::time::timeout(Duration::from_secs(2), client.health()).await {
                Ok(Ok(_)) => "up",
                _ => "down",
            },
            None => "down",
        };
        let in_flight = self.held.lock().expect("not poisoned").len();
        Some(vec![
            ("consumerId", consumer_id.to_owned()),
            ("hostName", self.host_name.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("concurrency", self.concurrency.to_string()),
            ("inFlight", in_flight.to_string()),
            ("arrakis", arrakis.to_owned()),
        ])
    }
}

impl EdgeClient {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(50))
            .user_agent(concat!("local-consumer/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            consumer: with_trailing_slash(&config.consumer_worker_url),
            api: with_trailing_slash(&config.api_worker_url),
            token: config.consumer_token.clone(),
            consumer_id: config.consumer_id.clone(),
            instance: Uuid::new_v4(),
            durable: Arc::default(),
            push: Arc::default(),
            pushes: Arc::default(),
            host: Arc::new(HostReporter {
                every: config.host_report_every,
                host_name: crate::config::host_name(),
                concurrency: config.max_concurrency,
                arrakis: arrakis_client::ArrakisClient::new(&config.arrakis_url).ok(),
                last: std::sync::Mutex::new(None),
                held: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    /// `tasks/{id}/{op}` on the consumer worker. In the durable mode it names the task's
    /// server (`?server=`, known from the claim), so the worker asks that server's object
    /// without reading the task record and checks a bound token against it; the status report
    /// does the same.
    fn lease_url(&self, id: Uuid, op: &str) -> Url {
        let mut url = self.consumer.join(&format!("tasks/{id}/{op}")).expect("uuid path");
        self.name_server(&mut url, id);
        url
    }

    /// Adds `?server=` (the durable mode, a claim of ours) to a request about task `id`.
    fn name_server(&self, url: &mut Url, id: Uuid) {
        if let (true, Some(server)) = (self.durable.load(SeqCst), self.host.server_of(id)) {
            url.query_pairs_mut().append_pair("server", &server);
        }
    }

    fn claim_id_for(&self, task: Uuid) -> Uuid {
        let mut bytes = *self.instance.as_bytes();
        for (b, t) in bytes.iter_mut().zip(task.as_bytes()) {
            *b ^= t;
        }
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    /// `op` about task `id` over `server`'s push socket, read as its HTTP answer would be;
    /// `None` when it must go over HTTP (no socket open, or no answer in time).
    async fn over_socket<T: DeserializeOwned>(
        &self,
        server: Option<&str>,
        id: Uuid,
        op: HostOp,
    ) -> Option<Result<T, EdgeError>> {
        if !self.durable.load(SeqCst) {
            return None;
        }
        let what = format!("{} of task {id} over the push socket", op.name());
        let (status, body) = self.push.call(server?, id, op).await?;
        Some(answer(status, &body, &what))
    }

    /// The durable mode's push sockets.
    pub fn push_channel(&self) -> &PushChannel {
        &self.push
    }

    /// `GET /health` of both workers.
    pub async fn health(&self) -> Result<(), String> {
        for (name, base) in [("API worker", &self.api), ("consumer worker", &self.consumer)] {
            let url = base.join("health").expect("static path");
            let response =
                self.http.get(url).timeout(Duration::from_secs(3)).send().await.map_err(|e| format!("{name}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("{name}: HTTP {}", response.status()));
            }
        }
        Ok(())
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, EdgeError> {
        let mut request = self.http.request(method.clone(), url.clone()).bearer_auth(&self.token).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| EdgeError::Transient(format!("{method} {}: {}", url.path(), error_chain(&e))))?;
        if let Some(mode) = response.headers().get(MODE_HEADER) {
            self.durable.store(mode.as_bytes() == b"durable", SeqCst);
        }
        let status = response.status();
        let body = read_capped(response, RESPONSE_MAX_BYTES)
            .await
            .map_err(|e| EdgeError::Transient(format!("{method} {}: {}", url.path(), error_chain(&e))))?;
        answer(status.as_u16(), &String::from_utf8_lossy(&body), &format!("{method} {}", url.path()))
    }
}

/// What a worker's answer means to the daemon, from its status and body (`what` names the
/// request in errors): a success's parsed body, a transient error (5xx, 429, 408, an
/// unreadable success) worth retrying, or a refusal. Plain, so the production model
/// (`edge-model`) reads its simulated answers the same way.
pub fn answer<T: serde::de::DeserializeOwned>(status: u16, text: &str, what: &str) -> Result<T, EdgeError> {
    if (200..300).contains(&status) {
        return serde_json::from_str(text)
            .map_err(|e| EdgeError::Transient(format!("{what}: unexpected body ({e}): {}", truncate(text))));
    }
    if status >= 500 || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT {
        return Err(EdgeError::Transient(format!("{what}: HTTP {status}: {}", truncate(text))));
    }
    let body = serde_json::from_str(text).unwrap_or_else(|_| ErrorBody {
        success: false,
        error: truncate(text),
        code: "unknown".into(),
        field: None,
        current_status: None,
        lease_expires_at: None,
    });
    Err(EdgeError::Refused { status, body })
}

/// A shared edge is an edge, so tests can keep a handle on the one the daemon uses.
impl<T: Edge> Edge for std::sync::Arc<T> {
    fn ready(
        &self,
        servers: &[String],
        since: Option<&str>,
        wait: Duration,
        hot: bool,
    ) -> impl Future<Output = Result<ReadyTasksResponse, EdgeError>> + Send {
        T::ready(self, servers, since, wait, hot)
    }

    fn claim(
        &self,
        task: &BufferedTask,
        lease: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, EdgeError>> + Send {
        T::claim(self, task, lease)
    }

    fn heartbeat(
        &self,
        id: Uuid,
        claim_id: Uuid,
        lease: Duration,
    ) -> impl Future<Output = Result<(), EdgeError>> + Send {
        T::heartbeat(self, id, claim_id, lease)
    }

    fn renew(
        &self,
        id: Uuid,
        claim_id: Uuid,
        lease: Duration,
    ) -> impl Future<Output = Result<Renewal, EdgeError>> + Send {
        T::renew(self, id, claim_id, lease)
    }

    fn release(&self, id: Uuid, claim_id: Uuid, reason: &str) -> impl Future<Output = Result<(), EdgeError>> + Send {
        T::release(self, id, claim_id, reason)
    }

    fn report(&self, id: Uuid, update: &UpdateStatusRequest) -> impl Future<Output = Result<(), EdgeError>> + Send {
        T::report(self, id, update)
    }

    fn task_status(&self, id: Uuid) -> impl Future<Output = Result<Option<TaskStatusResponse>, EdgeError>> + Send {
        T::task_status(self, id)
    }

    fn reconnected(&self) -> impl Future<Output = ()> + Send + 'static {
        T::reconnected(self)
    }
}

impl Edge for EdgeClient {
    async fn ready(
        &self,
        servers: &[String],
        since: Option<&str>,
        wait: Duration,
        hot: bool,
    ) -> Result<ReadyTasksResponse, EdgeError> {
        // The durable mode: while every server's socket is open, wait on pushes, not on a long
        // poll (which would keep the object awake). Full listings stay HTTP, and so does the
        // host report: when one is due it rides a full listing, answered at once (one short
        // request to each server's object and two KV writes per server, every
        // HOST_REPORT_SECONDS), instead of a long poll.
        let mut since = since;
        if let (Some(bell), true) = (since, self.durable.load(SeqCst)) {
            self.push.start(&self.consumer, &self.token, servers);
            let report_due_in = self.host.due_in();
            if self.push.live() && report_due_in.is_zero() {
                since = None;
            } else if self.push.live() {
                match self.push.next(wait.min(report_due_in)).await {
                    Some(tasks) => {
                        let n = self.pushes.fetch_add(1, SeqCst) + 1;
                        return Ok(crate::push::pushed_listing(tasks, n));
                    }
                    None if self.push.live() => {
                        let bell = bell.to_owned();
                        return Ok(ReadyTasksResponse {
                            success: true,
                            count: 0,
                            tasks: Vec::new(),
                            bell,
                            list_complete: true,
                        });
                    }
                    // A socket dropped: poll over HTTP while it reconnects.
                    None => {}
                }
            }
        }
        let mut url = self.consumer.join("tasks/ready").expect("static path");
        let report = self.host.due(&self.consumer_id).await;
        {
            let mut q = url.query_pairs_mut();
            for (name, value) in report.iter().flatten() {
                q.append_pair(name, value);
            }
            q.append_pair("server", &servers.join(","));
            // A list call costs the same for 1 key or 1000: take the biggest page.
            q.append_pair("limit", "1000");
            if let Some(since) = since {
                q.append_pair("since", since);
                q.append_pair("wait", &wait.as_secs().to_string());
                if hot {
                    q.append_pair("hot", "1");
                }
            }
        }
        self.send(Method::GET, url, None::<&()>, wait + Duration::from_secs(10)).await
    }

    /// The claim id is fixed per (process, task), so retrying after a lost response gets the
    /// same claim back rather than "held by another claim" until its lease ends. The entry's
    /// buffering time goes along for the task's timeline.
    async fn claim(&self, task: &BufferedTask, lease: Duration) -> Result<ClaimOutcome, EdgeError> {
        let id = task.task_id;
        let mut url = self.consumer.join(&format!("tasks/{id}/claim")).expect("uuid path");
        if self.durable.load(SeqCst) {
            // Names the object to ask, so the worker need not read the task record for it.
            url.query_pairs_mut().append_pair("server", &task.target_server);
        }
        let body = ClaimRequest {
            consumer_id: self.consumer_id.clone(),
            claim_id: Some(self.claim_id_for(id)),
            lease_seconds: Some(lease.as_secs()),
            buffered_at: Some(task.buffered_at),
        };
        let claimed = match self.over_socket(Some(&task.target_server), id, HostOp::Claim(body.clone())).await {
            Some(answered) => answered,
            None => self.send::<ClaimResponse>(Method::POST, url, Some(&body), Duration::from_secs(15)).await,
        };
        match claimed {
            Ok(claim) => {
                self.host.held.lock().expect("not poisoned").insert(id, task.target_server.clone());
                Ok(ClaimOutcome::Claimed(Box::new(claim)))
            }
            Err(e) => crate::decide::claim_refused(e, wall_clock()),
        }
    }

    async fn heartbeat(&self, id: Uuid, claim_id: Uuid, lease: Duration) -> Result<(), EdgeError> {
        self.renew(id, claim_id, lease).await.map(drop)
    }

    async fn renew(&self, id: Uuid, claim_id: Uuid, lease: Duration) -> Result<Renewal, EdgeError> {
        let body = LeaseRequest { claim_id, lease_seconds: Some(lease.as_secs()), reason: None };
        let server = self.host.server_of(id);
        let lease = match self.over_socket(server.as_deref(), id, HostOp::Heartbeat(body.clone())).await {
            Some(answered) => answered?,
            None => {
                let url = self.lease_url(id, "heartbeat");
                self.send::<LeaseResponse>(Method::POST, url, Some(&body), Duration::from_secs(15)).await?
            }
        };
        Ok(Renewal { cancel_requested: lease.cancel_requested })
    }

    async fn release(&self, id: Uuid, claim_id: Uuid, reason: &str) -> Result<(), EdgeError> {
        let url = self.lease_url(id, "release");
        let body = LeaseRequest { claim_id, lease_seconds: None, reason: Some(reason.to_owned()) };
        let server = self.host.held.lock().expect("not poisoned").remove(&id);
        if let Some(answered) =
            self.over_socket::<LeaseResponse>(server.as_deref(), id, HostOp::Release(body.clone())).await
        {
            return answered.map(drop);
        }
        self.send::<LeaseResponse>(Method::POST, url, Some(&body), Duration::from_secs(15)).await.map(drop)
    }

    async fn report(&self, id: Uuid, update: &UpdateStatusRequest) -> Result<(), EdgeError> {
        let mut url = self.api.join(&format!("vm/tasks/{id}/status")).expect("uuid path");
        self.name_server(&mut url, id);
        let server = if update.status.is_terminal() {
            self.host.held.lock().expect("not poisoned").remove(&id)
        } else {
            self.host.server_of(id)
        };
        match self
            .over_socket::<serde_json::Value>(server.as_deref(), id, HostOp::Report(Box::new(update.clone())))
            .await
        {
            // A task the object does not hold (purged after finishing, say) is the KV mode's
            // handler's to answer, as over HTTP.
            Some(Err(EdgeError::Refused { status: 404, .. })) | None => {}
            Some(answered) => return answered.map(drop),
        }
        self.send::<serde_json::Value>(Method::PUT, url, Some(update), Duration::from_secs(15)).await.map(drop)
    }

    fn reconnected(&self) -> impl Future<Output = ()> + Send + 'static {
        self.push.opened()
    }

    async fn task_status(&self, id: Uuid) -> Result<Option<TaskStatusResponse>, EdgeError> {
        let url = self.api.join(&format!("vm/tasks/{id}/status")).expect("uuid path");
        match self.send(Method::GET, url, None::<&()>, Duration::from_secs(15)).await {
            Ok(status) => Ok(Some(status)),
            Err(EdgeError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Now by the host's clock, to turn a lease's end into a wait.
/// Now, as the edge's timestamps count it.
pub(crate) fn wall_clock() -> Timestamp {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp(since_epoch.as_millis() as u64)
}

fn with_trailing_slash(url: &Url) -> Url {
    let mut url = url.clone();
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url
}

fn truncate(text: &str) -> String {
    text.chars().take(300).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser;
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::config::Cli;

    /// The daemon's settings with both worker URLs at `url`, plus `extra` flags.
    fn config_at(url: &str, extra: &[&str]) -> Config {
        let mut args =
            vec!["local-consumer", "--consumer-worker-url", url, "--api-worker-url", url, "--consumer-token", "t"];
        args.extend_from_slice(extra);
        Cli::parse_from(args).validate().unwrap()
    }

    /// A listener on 127.0.0.1 and the first byte its first connection sends: 0x16 opens a
    /// TLS handshake record. Fails the test if nothing connects within 5 s.
    pub(crate) async fn first_byte_listener() -> (u16, impl std::future::Future<Output = u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let first = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 1];
            socket.read_exact(&mut first).await.unwrap();
            first[0]
        });
        let first = async move {
            tokio::time::timeout(Duration::from_secs(5), first).await.expect("nothing connected").unwrap()
        };
        (port, first)
    }

    /// Deployed workers are served over https only. The workspace's reqwest was once built
    /// without TLS, so the daemon refused every `https://` URL before connecting.
    #[tokio::test]
    async fn the_daemon_speaks_tls_to_https_workers() {
        let (port, first_byte) = first_byte_listener().await;
        let edge = EdgeClient::new(&config_at(&format!("https://127.0.0.1:{port}"), &[])).unwrap();
        // No TLS server answers, so the call fails; what matters is what the client sent.
        let _ = edge.health().await;
        assert_eq!(first_byte.await, 0x16, "the first byte of a TLS handshake record");
    }

    /// The host registry's report rides on a poll once per `HOST_REPORT_SECONDS`, not on
    /// every poll, and counts the claims this process holds.
    #[tokio::test]
    async fn a_poll_carries_the_host_report_once_per_interval() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let config = config_at(
            &url,
            &["--consumer-id", "rack-7", "--server-names", "a,b", "--arrakis-url", "http://127.0.0.1:9"],
        );
        let edge = EdgeClient::new(&config).unwrap();
        let server = tokio::spawn(async move {
            let mut request_lines = Vec::new();
            for _ in 0..2 {
                let (mut socket, _) = listener.accept().await.unwrap();
                socket.set_nodelay(true).unwrap();
                let mut buf = vec![0u8; 4096];
                let n = socket.read(&mut buf).await.unwrap();
                let head = String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_owned();
                request_lines.push(head);
                let body = r#"{"success":true,"tasks":[],"count":0,"bell":"0","listComplete":true}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
            request_lines
        });
        edge.host.held.lock().unwrap().insert(Uuid::nil(), "production".into());
        let servers = ["a".to_owned(), "b".to_owned()];
        edge.ready(&servers, None, Duration::ZERO, false).await.unwrap();
        edge.ready(&servers, None, Duration::ZERO, false).await.unwrap();
        let lines = server.await.unwrap();
        let first = &lines[0];
        for part in ["consumerId=rack-7", "hostName=", "version=", "concurrency=8", "inFlight=1", "arrakis=down"] {
            assert!(first.contains(part), "{part} missing from {first}");
        }
        assert!(!lines[1].contains("hostName="), "the second poll within the interval reports nothing: {}", lines[1]);
    }

    /// In the durable mode a heartbeat, a release and a report name their task's server, so a
    /// consumer token bound to servers is checked and the worker asks that object without a
    /// lookup (they were sent without it, so each cost a task record read). The KV mode's
    /// routes are unchanged.
    #[test]
    fn durable_heartbeats_releases_and_reports_name_the_tasks_server() {
        let config = config_at("http://127.0.0.1:9", &["--server-names", "production"]);
        let edge = EdgeClient::new(&config).unwrap();
        let id = Uuid::from_u128(7);
        edge.host.held.lock().unwrap().insert(id, "production".into());
        assert_eq!(edge.lease_url(id, "heartbeat").query(), None, "the KV mode: as before");
        edge.durable.store(true, SeqCst);
        for op in ["heartbeat", "release"] {
            let url = edge.lease_url(id, op);
            assert!(url.path().ends_with(&format!("/tasks/{id}/{op}")), "{url}");
            assert_eq!(url.query(), Some("server=production"), "{url}");
        }
        assert_eq!(edge.lease_url(Uuid::from_u128(8), "release").query(), None, "not a claim of ours: no guess");
        let mut report = edge.api.join(&format!("vm/tasks/{id}/status")).unwrap();
        edge.name_server(&mut report, id);
        assert_eq!(report.query(), Some("server=production"), "{report}");
    }
}
