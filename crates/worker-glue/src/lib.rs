//! Adapters between workers-rs and `vm-task-edge`: KV, Queue, clock and randomness behind the
//! edge's traits, and request/response conversion. No decisions are made here.

pub mod durable;

use std::time::Duration;

use serde_json::Value;
use vm_task_edge::{
    http,
    webhooks::{self, FetchOutcome, WebhookFetch, WebhookMessage, WebhookQueue},
    Clock, Ids, KvKey, KvPage, KvStore, QueueMessage, StoreError, TaskQueue,
};
use vm_task_types::Timestamp;
use worker::{Date, Delay, Env};

/// A Workers KV namespace.
pub struct WorkerKv(pub worker::kv::KvStore);

/// The runtime reports KV errors as text only (`KV PUT failed: 429 Too Many Requests` when a
/// key is written twice within a second); this is the one place that text is read.
fn store_err(e: impl std::fmt::Display) -> StoreError {
    let message = e.to_string();
    if message.contains("429") {
        StoreError::rate_limited(message)
    } else {
        StoreError::other(message)
    }
}

impl KvStore for WorkerKv {
    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.0.get(key).text().await.map_err(store_err)
    }

    async fn get_with_metadata(&self, key: &str) -> Result<Option<(String, Option<Value>)>, StoreError> {
        let (value, metadata) = self.0.get(key).text_with_metadata::<Value>().await.map_err(store_err)?;
        Ok(value.map(|v| (v, metadata)))
    }

    async fn put(&self, key: &str, value: &str, metadata: Option<&Value>) -> Result<(), StoreError> {
        let mut builder = self.0.put(key, value).map_err(store_err)?;
        if let Some(m) = metadata {
            builder = builder.metadata(m).map_err(store_err)?;
        }
        builder.execute().await.map_err(store_err)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key).await.map_err(store_err)
    }

    async fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> Result<KvPage, StoreError> {
        let mut builder = self.0.list().prefix(prefix.to_owned()).limit(limit as u64);
        if let Some(c) = cursor {
            builder = builder.cursor(c.to_owned());
        }
        let page = builder.execute().await.map_err(store_err)?;
        Ok(KvPage {
            keys: page.keys.into_iter().map(|k| KvKey { name: k.name, metadata: k.metadata }).collect(),
            cursor: page.cursor.filter(|c| !c.is_empty()),
            list_complete: page.list_complete,
        })
    }
}

/// The task queue producer binding.
pub struct WorkerQueue(pub worker::Queue);

impl TaskQueue for WorkerQueue {
    async fn send(&self, message: &QueueMessage) -> Result<(), StoreError> {
        self.0.send(message).await.map_err(store_err)
    }
}

/// The webhook queue producer binding. A delay is Queues' `delaySeconds` (at most 12 h).
pub struct WorkerWebhookQueue(pub worker::Queue);

impl WebhookQueue for WorkerWebhookQueue {
    async fn send(&self, message: &WebhookMessage, delay_secs: u32) -> Result<(), StoreError> {
        let message = worker::MessageBuilder::new(message).delay_seconds(delay_secs).build();
        self.0.send(message).await.map_err(store_err)
    }
}

/// The runtime's `fetch` for webhook deliveries: a POST, redirects not followed (a 3xx is
/// the receiver's answer), aborted after [`webhooks::DELIVERY_TIMEOUT_MS`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerFetch;

impl WebhookFetch for WorkerFetch {
    async fn post(&self, url: &str, headers: &[(String, String)], body: &[u8]) -> FetchOutcome {
        let outcome = async {
            let out_headers = worker::Headers::new();
            for (name, value) in headers {
                out_headers.set(name, value)?;
            }
            let mut init = worker::RequestInit::new();
            init.with_method(worker::Method::Post)
                .with_headers(out_headers)
                .with_redirect(worker::RequestRedirect::Manual)
                .with_body(Some(worker::js_sys::Uint8Array::from(body).into()));
            let request = worker::Request::new_with_init(url, &init)?;
            let controller = worker::AbortController::default();
            let signal = controller.signal();
            let fetch = worker::Fetch::Request(request);
            let fetch = std::pin::pin!(fetch.send_with_signal(&signal));
            let timeout = std::pin::pin!(Delay::from(Duration::from_millis(webhooks::DELIVERY_TIMEOUT_MS)));
            match futures::future::select(fetch, timeout).await {
                futures::future::Either::Left((response, _)) => Ok::<_, worker::Error>(Some(response?.status_code())),
                futures::future::Either::Right(_) => {
                    controller.abort();
                    Ok(None)
                }
            }
        };
        match outcome.await {
            Ok(Some(status)) => FetchOutcome::Status(status),
            Ok(None) => FetchOutcome::Timeout,
            Err(e) => FetchOutcome::Network(e.to_string()),
        }
    }
}

/// `Date.now()` and `setTimeout`.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerClock;

impl Clock for WorkerClock {
    fn now(&self) -> Timestamp {
        Timestamp(Date::now().as_millis())
    }

    async fn sleep_ms(&self, ms: u64) {
        Delay::from(Duration::from_millis(ms)).await;
    }
}

/// `crypto.getRandomValues`, through uuid's `js` feature.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerIds;

impl Ids for WorkerIds {
    fn random_bytes(&self) -> [u8; 16] {
        uuid::Uuid::new_v4().into_bytes()
    }
}

/// Reads a var or secret, empty when unset.
pub fn setting(env: &Env, name: &str) -> String {
    env.secret(name).map(|s| s.to_string()).or_else(|_| env.var(name).map(|v| v.to_string())).unwrap_or_default()
}

/// A numeric setting, or `default` when unset or unparsable.
pub fn number(env: &Env, name: &str, default: u64) -> u64 {
    setting(env, name).trim().parse().unwrap_or(default)
}

/// The request's method, path, query and headers, without its body: enough for the edge to
/// refuse it unread (`refuse_unread`).
pub fn request_head(req: &worker::Request) -> worker::Result<http::Request> {
    let url = req.url()?;
    let mut headers = Vec::new();
    for (name, value) in req.headers().entries() {
        headers.push((name.to_ascii_lowercase(), value));
    }
    Ok(http::Request {
        // The raw method: workers-rs maps methods it does not know (PURGE, QUERY...) to GET,
        // which would serve them as reads instead of a 405.
        method: req.inner().method(),
        path: url.path().to_owned(),
        // `application/x-www-form-urlencoded` decoding, `+` as a space, from the URL parser.
        query: url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect(),
        headers,
        body: Vec::new(),
    })
}

/// Reads the body into `head`, once the edge has not refused the request unread.
pub async fn read_body(mut req: worker::Request, head: &mut http::Request) {
    if !matches!(head.method.as_str(), "GET" | "HEAD" | "OPTIONS") {
        head.body = req.bytes().await.unwrap_or_default();
    }
}

pub fn to_worker_response(response: http::Response) -> worker::Result<worker::Response> {
    let mut out = if response.body.is_empty() {
        worker::Response::empty()?
    } else {
        worker::Response::from_bytes(response.body)?
    }
    .with_status(response.status);
    for (name, value) in &response.headers {
        out.headers_mut().set(name, value)?;
    }
    Ok(out)
}
