//! A typed client for both workers, as end-to-end tests use them: the client API with the
//! client token, and the consumer API plus status reports with the consumer token, so a test
//! can act as the daemon.
//!
//! Responses decode into the wire types of `vm_task_types::wire`; any status outside 2xx is a
//! [`ClientError::Status`] carrying the JSON body, so tests can assert on 401s and 409s.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use uuid::Uuid;
use vm_task_types::{
    wire::{
        ClaimResponse, CreateTaskResponse, HealthResponse, LeaseResponse, ListTasksResponse, ReadyTasksResponse,
        StatsResponse, TaskDetailResponse, TaskStatusResponse, UpdateStatusResponse, VmStatusResponse,
    },
    Limits, Task, TaskResult, TaskStatus,
};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The worker answered outside 2xx.
    #[error("{method} {path} answered {status}: {body}")]
    Status { method: Method, path: String, status: StatusCode, body: Value },
    /// No answer: connection refused, timeout, reset.
    #[error("{method} {path} failed")]
    Transport {
        method: Method,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    /// An answer whose body is not the expected JSON.
    #[error("{method} {path} answered {status} with an unexpected body: {body}")]
    Decode {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
        #[source]
        source: serde_json::Error,
    },
    /// [`ApiClient::wait_terminal`] ran out of time; `last` is the latest status read.
    #[error("task {task_id} is still {} after {waited:?}", last.status)]
    NotTerminal { task_id: Uuid, waited: Duration, last: Box<TaskStatusResponse> },
}

impl ClientError {
    /// The HTTP status of a [`ClientError::Status`] error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The JSON body of a [`ClientError::Status`] error.
    pub fn body(&self) -> Option<&Value> {
        match self {
            Self::Status { body, .. } => Some(body),
            _ => None,
        }
    }
}

pub type ClientResult<T> = Result<T, ClientError>;

/// Which token a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    None,
    Client,
    Consumer,
}

/// Client of the gateway: `/...` reaches the API worker, `/consumer/...` the consumer worker.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    gateway: String,
    client_token: String,
    consumer_token: String,
}

/// Per-request timeout for everything but long polls, which get their wait on top of it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

impl ApiClient {
    /// `gateway` is `http://host:port` without a trailing slash.
    pub fn new(gateway: impl Into<String>, client_token: impl Into<String>, consumer_token: impl Into<String>) -> Self {
        Self {
            http: http_client(REQUEST_TIMEOUT),
            gateway: gateway.into().trim_end_matches('/').to_owned(),
            client_token: client_token.into(),
            consumer_token: consumer_token.into(),
        }
    }

    pub fn gateway_url(&self) -> &str {
        &self.gateway
    }

    /// `Bearer <client token>`, for [`submit_raw`](Self::submit_raw) headers.
    pub fn client_bearer(&self) -> String {
        format!("Bearer {}", self.client_token)
    }

    /// `Bearer <consumer token>`, for [`submit_raw`](Self::submit_raw) headers.
    pub fn consumer_bearer(&self) -> String {
        format!("Bearer {}", self.consumer_token)
    }

    /// Any request, exactly as given: no token is added. Returns the status and the JSON body
    /// (`Value::Null` when the body is empty or not JSON). Only transport failures are errors.
    pub async fn submit_raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> ClientResult<(StatusCode, Value)> {
        let mut request = self.http.request(method.clone(), self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|source| transport(&method, path, source))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|source| transport(&method, path, source))?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    /// `GET /health` on the API worker (no token).
    pub async fn health(&self) -> ClientResult<HealthResponse> {
        self.call(Method::GET, "/health", Auth::None, None, None).await
    }

    /// `GET /consumer/health` (no token).
    pub async fn consumer_health(&self) -> ClientResult<HealthResponse> {
        self.call(Method::GET, "/consumer/health", Auth::None, None, None).await
    }

    /// `POST /vm/tasks` with `{"type": ..., "payload": ...}`; 202 (200 on an idempotent replay).
    pub async fn submit(&self, body: &Value) -> ClientResult<CreateTaskResponse> {
        self.call(Method::POST, "/vm/tasks", Auth::Client, Some(body), None).await
    }

    /// `POST /vm/tasks` of one operation: `kind` is e.g. `launch_vm`, `payload` its payload.
    pub async fn submit_op(&self, kind: &str, payload: Value) -> ClientResult<CreateTaskResponse> {
        self.submit(&json!({ "type": kind, "payload": payload })).await
    }

    /// `GET /vm/tasks/:id/status`.
    pub async fn status(&self, id: Uuid) -> ClientResult<TaskStatusResponse> {
        self.call(Method::GET, &format!("/vm/tasks/{id}/status"), Auth::Client, None, None).await
    }

    /// `GET /vm/tasks/:id`: the whole record with its timeline.
    pub async fn task(&self, id: Uuid) -> ClientResult<Task> {
        let detail: TaskDetailResponse =
            self.call(Method::GET, &format!("/vm/tasks/{id}"), Auth::Client, None, None).await?;
        Ok(detail.task)
    }

    /// Long-polls `GET /vm/tasks/:id/status?wait=N` until the task is terminal or `timeout`
    /// has passed ([`ClientError::NotTerminal`] then).
    pub async fn wait_terminal(&self, id: Uuid, timeout: Duration) -> ClientResult<TaskStatusResponse> {
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            // Whole seconds, at least one, so a short timeout still waits server-side.
            let wait = left.as_secs().clamp(1, Limits::WAIT_MAX_SECS);
            let path = format!("/vm/tasks/{id}/status?wait={wait}");
            let extra = Some(Duration::from_secs(wait));
            let status: TaskStatusResponse = self.call(Method::GET, &path, Auth::Client, None, extra).await?;
            if status.status.is_terminal() {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                return Err(ClientError::NotTerminal { task_id: id, waited: start.elapsed(), last: Box::new(status) });
            }
        }
    }

    /// `GET /vm/tasks?limit=&cursor=`, newest first.
    pub async fn list(&self, limit: Option<usize>, cursor: Option<&str>) -> ClientResult<ListTasksResponse> {
        let mut query = Vec::new();
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        if let Some(cursor) = cursor {
            query.push(format!("cursor={}", encode_query(cursor)));
        }
        let path = if query.is_empty() { "/vm/tasks".to_owned() } else { format!("/vm/tasks?{}", query.join("&")) };
        self.call(Method::GET, &path, Auth::Client, None, None).await
    }

    /// `DELETE /vm/tasks/:id`.
    pub async fn cancel(&self, id: Uuid) -> ClientResult<UpdateStatusResponse> {
        self.call(Method::DELETE, &format!("/vm/tasks/{id}"), Auth::Client, None, None).await
    }

    /// `GET /vm/:vmName/status`, from the VM registry.
    pub async fn vm_status(&self, vm_name: &str) -> ClientResult<VmStatusResponse> {
        self.call(Method::GET, &format!("/vm/{}/status", encode_path(vm_name)), Auth::Client, None, None).await
    }

    /// `GET /consumer/tasks/ready?server=S`: buffered tasks, oldest first, without waiting.
    pub async fn ready(&self, server: &str) -> ClientResult<ReadyTasksResponse> {
        let path = format!("/consumer/tasks/ready?server={}", encode_query(server));
        self.call(Method::GET, &path, Auth::Consumer, None, None).await
    }

    /// `GET /consumer/tasks/ready?server=S&wait=W&since=BELL`: waits up to `wait` for work
    /// newer than `since`.
    pub async fn ready_wait(
        &self,
        server: &str,
        wait: Duration,
        since: Option<&str>,
    ) -> ClientResult<ReadyTasksResponse> {
        let mut path = format!("/consumer/tasks/ready?server={}&wait={}", encode_query(server), wait.as_secs());
        if let Some(since) = since {
            path.push_str(&format!("&since={}", encode_query(since)));
        }
        self.call(Method::GET, &path, Auth::Consumer, None, Some(wait)).await
    }

    /// `POST /consumer/tasks/:id/claim`; moves the task to `processing` under a lease.
    pub async fn claim(&self, id: Uuid, consumer_id: &str, lease_seconds: Option<u64>) -> ClientResult<ClaimResponse> {
        let body = json!({ "consumerId": consumer_id, "leaseSeconds": lease_seconds });
        self.call(Method::POST, &format!("/consumer/tasks/{id}/claim"), Auth::Consumer, Some(&body), None).await
    }

    /// `POST /consumer/tasks/:id/heartbeat`: renews the lease.
    pub async fn heartbeat(&self, id: Uuid, claim_id: Uuid, lease_seconds: Option<u64>) -> ClientResult<LeaseResponse> {
        let body = json!({ "claimId": claim_id, "leaseSeconds": lease_seconds });
        self.call(Method::POST, &format!("/consumer/tasks/{id}/heartbeat"), Auth::Consumer, Some(&body), None).await
    }

    /// `POST /consumer/tasks/:id/release`: gives the task back to `pending`.
    pub async fn release(&self, id: Uuid, claim_id: Uuid, reason: Option<&str>) -> ClientResult<LeaseResponse> {
        let body = json!({ "claimId": claim_id, "reason": reason });
        self.call(Method::POST, &format!("/consumer/tasks/{id}/release"), Auth::Consumer, Some(&body), None).await
    }

    /// `PUT /vm/tasks/:id/status` with the consumer token, as the daemon holding `claim_id`.
    pub async fn report(
        &self,
        id: Uuid,
        claim_id: Uuid,
        status: TaskStatus,
        result: Option<TaskResult>,
        error: Option<&str>,
    ) -> ClientResult<UpdateStatusResponse> {
        let body = json!({ "status": status, "claimId": claim_id, "result": result, "error": error });
        self.call(Method::PUT, &format!("/vm/tasks/{id}/status"), Auth::Consumer, Some(&body), None).await
    }

    /// `GET /stats` on the API worker.
    pub async fn api_stats(&self) -> ClientResult<StatsResponse> {
        self.call(Method::GET, "/stats", Auth::Client, None, None).await
    }

    /// `GET /consumer/stats`: operation counts and buffered tasks per server.
    pub async fn consumer_stats(&self) -> ClientResult<StatsResponse> {
        self.call(Method::GET, "/consumer/stats", Auth::Consumer, None, None).await
    }

    /// Sends one request with `auth`'s token and decodes a 2xx JSON body as `T`. `long_poll`
    /// extends the timeout for requests that wait server-side.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        auth: Auth,
        body: Option<&Value>,
        long_poll: Option<Duration>,
    ) -> ClientResult<T> {
        let mut request = self.http.request(method.clone(), self.url(path));
        match auth {
            Auth::None => {}
            Auth::Client => request = request.bearer_auth(&self.client_token),
            Auth::Consumer => request = request.bearer_auth(&self.consumer_token),
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(wait) = long_poll {
            request = request.timeout(REQUEST_TIMEOUT + wait);
        }
        let response = request.send().await.map_err(|source| transport(&method, path, source))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|source| transport(&method, path, source))?;
        if !status.is_success() {
            let body = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            return Err(ClientError::Status { method, path: path.to_owned(), status, body });
        }
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            path: path.to_owned(),
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
            source,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway)
    }
}

/// The HTTP client every part of the stack uses: loopback only, so no proxy (an inherited
/// `HTTP_PROXY` would otherwise swallow requests to 127.0.0.1), no Nagle delay, short
/// timeouts so a wedged process fails a test instead of hanging it.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
        .build()
        .expect("a client without TLS or proxies always builds")
}

fn transport(method: &Method, path: &str, source: reqwest::Error) -> ClientError {
    ClientError::Transport { method: method.clone(), path: path.to_owned(), source }
}

/// Percent-encodes everything but unreserved characters, for query values.
fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b',' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Percent-encodes one path segment.
fn encode_path(s: &str) -> String {
    encode_query(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode_query("production,staging"), "production,staging");
        assert_eq!(encode_query("a b/c=d&e"), "a%20b%2Fc%3Dd%26e");
        assert_eq!(encode_path("my vm"), "my%20vm");
    }

    #[test]
    fn status_errors_expose_status_and_body() {
        let err = ClientError::Status {
            method: Method::GET,
            path: "/x".into(),
            status: StatusCode::CONFLICT,
            body: json!({"code": "conflict"}),
        };
        assert_eq!(err.status(), Some(StatusCode::CONFLICT));
        assert_eq!(err.body().unwrap()["code"], "conflict");
        assert_eq!(err.to_string(), "GET /x answered 409 Conflict: {\"code\":\"conflict\"}");
    }
}
