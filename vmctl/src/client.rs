//! HTTP client of the API worker: one method per endpoint vmctl uses, each returning the
//! typed body and the JSON as the API sent it (for `--json`), or a [`CliError`] that says
//! what went wrong in the user's terms.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;
use vm_task_types::{
    wire::{
        CreateTaskResponse, ErrorBody, ListHostsResponse, ListTasksResponse, ListVmsResponse, TaskDetailResponse,
        TaskStatusResponse, VmStatusResponse,
    },
    Operation, OperationKind, TaskStatus,
};

use crate::error::CliError;

/// A body as typed and as received.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    pub body: T,
    pub json: Value,
}

/// What `DELETE /vm/tasks/:id` answered, short of an error. Read loosely: a 202's `status`
/// is `cancel_requested`, which is no task status.
#[derive(Debug, Clone)]
pub struct CancelOutcome {
    /// 202: not final yet (a daemon's claim was in flight, the command is running, or, deployed
    /// across locations, until the `cancelFinalAt` the message names); the task's record says
    /// how it ends.
    pub requested: bool,
    pub status: String,
    pub message: String,
    pub json: Value,
}

/// The filters of `GET /vm/tasks`, as query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: u16,
    pub cursor: Option<String>,
    pub status: Option<TaskStatus>,
    pub kind: Option<OperationKind>,
    pub vm_name: Option<String>,
    pub target_server: Option<String>,
}

impl ListQuery {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![("limit", self.limit.to_string())];
        let optional = [
            ("cursor", self.cursor.clone()),
            ("status", self.status.map(|s| s.as_str().to_owned())),
            ("type", self.kind.map(|k| k.as_str().to_owned())),
            ("vmName", self.vm_name.clone()),
            ("targetServer", self.target_server.clone()),
        ];
        pairs.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        pairs
    }
}

/// The query of `GET /vms`.
#[derive(Debug, Clone, Default)]
pub struct VmsQuery {
    pub limit: u16,
    pub cursor: Option<String>,
    pub server: Option<String>,
    pub state: Option<String>,
}

impl VmsQuery {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![("limit", self.limit.to_string())];
        let optional =
            [("cursor", self.cursor.clone()), ("server", self.server.clone()), ("state", self.state.clone())];
        pairs.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        pairs
    }
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    token: String,
}

impl ApiClient {
    pub fn new(api_url: &str, token: &str) -> Result<Self, CliError> {
        let bad = |reason: &str| CliError::BadUrl { url: api_url.to_owned(), reason: reason.to_owned() };
        let mut base = Url::parse(api_url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(bad("expected http:// or https:// and a host"));
        }
        if base.cannot_be_a_base() {
            return Err(bad("cannot hold a path"));
        }
        // Paths are appended segment by segment; a trailing empty segment would double the '/'.
        if let Ok(mut segments) = base.path_segments_mut() {
            segments.pop_if_empty();
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .user_agent(concat!("vmctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self { http, base, token: token.to_owned() })
    }

    /// `POST /vm/tasks`, with the webhook URL for its terminal event if given.
    pub async fn submit(
        &self,
        operation: &Operation,
        callback_url: Option<&str>,
    ) -> Result<Answer<CreateTaskResponse>, CliError> {
        let mut body = serde_json::to_value(operation).map_err(|e| CliError::Output(e.to_string()))?;
        if let Some(url) = callback_url {
            body["callbackUrl"] = Value::String(url.to_owned());
        }
        let (_, answer) = self.call(Method::POST, &["vm", "tasks"], &[], Some(&body), 0).await?;
        Ok(answer)
    }

    /// `GET /vm/tasks/:id/status?wait=N`.
    pub async fn status(&self, id: Uuid, wait_secs: u64) -> Result<Answer<TaskStatusResponse>, CliError> {
        let id = id.to_string();
        let query = [("wait", wait_secs.to_string())];
        let (_, answer) = self.call(Method::GET, &["vm", "tasks", &id, "status"], &query, None, wait_secs).await?;
        Ok(answer)
    }

    /// `GET /vm/tasks/:id?wait=N`: the whole record with its timeline.
    pub async fn task(&self, id: Uuid, wait_secs: u64) -> Result<Answer<TaskDetailResponse>, CliError> {
        let id = id.to_string();
        let query = [("wait", wait_secs.to_string())];
        let (_, answer) = self.call(Method::GET, &["vm", "tasks", &id], &query, None, wait_secs).await?;
        Ok(answer)
    }

    /// `GET /vm/tasks?limit=&cursor=&status=&type=&vmName=&targetServer=`.
    pub async fn list(&self, query: &ListQuery) -> Result<Answer<ListTasksResponse>, CliError> {
        let (_, answer) = self.call(Method::GET, &["vm", "tasks"], &query.pairs(), None, 0).await?;
        Ok(answer)
    }

    /// `GET /vms?limit=&cursor=&server=&state=`.
    pub async fn vms(&self, query: &VmsQuery) -> Result<Answer<ListVmsResponse>, CliError> {
        let (_, answer) = self.call(Method::GET, &["vms"], &query.pairs(), None, 0).await?;
        Ok(answer)
    }

    /// `GET /hosts?server=`.
    pub async fn hosts(&self, server: Option<&str>) -> Result<Answer<ListHostsResponse>, CliError> {
        let query: Vec<(&str, String)> = server.map(|s| ("server", s.to_owned())).into_iter().collect();
        let (_, answer) = self.call(Method::GET, &["hosts"], &query, None, 0).await?;
        Ok(answer)
    }

    /// `DELETE /vm/tasks/:id`.
    pub async fn cancel(&self, id: Uuid) -> Result<CancelOutcome, CliError> {
        let id = id.to_string();
        let (status, answer) = self.call::<Value>(Method::DELETE, &["vm", "tasks", &id], &[], None, 0).await?;
        let text = |key: &str| answer.json[key].as_str().unwrap_or_default().to_owned();
        Ok(CancelOutcome {
            requested: status == StatusCode::ACCEPTED,
            status: text("status"),
            message: text("message"),
            json: answer.json,
        })
    }

    /// `GET /vm/:vmName/status`.
    pub async fn vm_status(&self, vm_name: &str) -> Result<Answer<VmStatusResponse>, CliError> {
        let (_, answer) = self.call(Method::GET, &["vm", vm_name, "status"], &[], None, 0).await?;
        Ok(answer)
    }

    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked in new").extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// One request, tried up to [`ATTEMPTS`] times while it fails transiently (a dropped
    /// connection, a timeout, 429 or 5xx). Every call vmctl makes is safe to repeat: reads,
    /// cancels, and submissions, which carry one `Idempotency-Key` across their tries. A
    /// refused connection is not retried: nothing is listening, and the user hears so at once.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
        wait_secs: u64,
    ) -> Result<(StatusCode, Answer<T>), CliError> {
        let idempotency_key = (method == Method::POST).then(|| Uuid::new_v4().to_string());
        let mut attempt = 1;
        loop {
            let request = Request { method: method.clone(), segments, query, body, wait_secs };
            match self.call_once(&request, idempotency_key.as_deref()).await {
                Err(failure) if failure.transient && attempt < ATTEMPTS => {
                    tokio::time::sleep(RETRY_BACKOFF * 2u32.pow(attempt - 1)).await;
                    attempt += 1;
                }
                outcome => return outcome.map_err(|failure| failure.error),
            }
        }
    }

    async fn call_once<T: DeserializeOwned>(
        &self,
        request: &Request<'_>,
        idempotency_key: Option<&str>,
    ) -> Result<(StatusCode, Answer<T>), Failure> {
        let url = self.url(request.segments, request.query);
        let mut builder = self
            .http
            .request(request.method.clone(), url.clone())
            .bearer_auth(&self.token)
            // A long poll holds the request for up to `wait` seconds before answering.
            .timeout(Duration::from_secs(30 + request.wait_secs));
        if let Some(body) = request.body {
            builder = builder.json(body);
        }
        if let Some(key) = idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        let unreachable = |e: reqwest::Error| Failure {
            transient: !e.is_connect(),
            error: CliError::Unreachable { url: url.to_string(), reason: error_chain(&e) },
        };
        let response = builder.send().await.map_err(unreachable)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let transient = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            return Err(Failure { transient, error: error_for(status, &bytes, &url) });
        }
        let protocol =
            |reason: String| Failure { transient: false, error: CliError::Protocol { url: url.to_string(), reason } };
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| protocol(format!("{status} with a body that is not JSON ({e}): {}", snippet(&bytes))))?;
        let typed = serde_json::from_value(json.clone())
            .map_err(|e| protocol(format!("{status} with a body vmctl cannot read ({e}): {}", snippet(&bytes))))?;
        Ok((status, Answer { body: typed, json }))
    }
}

/// How often a request is tried, and the pause before the second try (doubling after).
const ATTEMPTS: u32 = 3;
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// One request's parts, so each try builds it afresh.
struct Request<'a> {
    method: Method,
    segments: &'a [&'a str],
    query: &'a [(&'a str, String)],
    body: Option<&'a Value>,
    wait_secs: u64,
}

/// A failed try, and whether trying again may succeed.
struct Failure {
    transient: bool,
    error: CliError,
}

/// Maps an error status and its body (the API's `ErrorBody`, or anything a proxy sent) to the
/// error the user sees.
pub fn error_for(status: StatusCode, bytes: &[u8], url: &Url) -> CliError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(bytes).ok();
    let message = parsed.as_ref().map(|b| b.error.clone()).unwrap_or_else(|| {
        let text = snippet(bytes);
        if text.is_empty() {
            status.canonical_reason().unwrap_or("no message").to_owned()
        } else {
            text
        }
    });
    let field = parsed.as_ref().and_then(|b| b.field.clone());
    match status.as_u16() {
        401 | 403 => {
            let mut origin = url.clone();
            origin.set_path("");
            origin.set_query(None);
            CliError::Unauthorized { url: origin.as_str().trim_end_matches('/').to_owned(), message }
        }
        404 => CliError::NotFound { message },
        409 => CliError::Conflict { message, current_status: parsed.and_then(|b| b.current_status) },
        code @ 400..=499 => CliError::Rejected { status: code, message, field },
        code => CliError::ServerError { status: code, message },
    }
}

/// Why a request failed, from its innermost cause ("Connection refused (os error 111)"):
/// reqwest's own message only repeats the URL.
fn error_chain(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "no answer in time".into();
    }
    let mut innermost: &dyn std::error::Error = error;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> Url {
        Url::parse("http://127.0.0.1:8787/vm/tasks?limit=5").unwrap()
    }

    #[test]
    fn api_error_bodies_become_errors_that_keep_message_field_and_status() {
        let body = br#"{"success":false,"error":"payload.vmName: contains '/'","code":"invalid_field","field":"payload.vmName"}"#;
        let error = error_for(StatusCode::BAD_REQUEST, body, &url());
        assert_eq!(
            error.to_string(),
            "the API rejected the request (400): payload.vmName: contains '/' (field: payload.vmName)"
        );

        let body = br#"{"success":false,"error":"task is processing","code":"conflict","currentStatus":"processing"}"#;
        let CliError::Conflict { current_status, .. } = error_for(StatusCode::CONFLICT, body, &url()) else { panic!() };
        assert_eq!(current_status, Some(TaskStatus::Processing));

        let error = error_for(
            StatusCode::UNAUTHORIZED,
            br#"{"success":false,"error":"invalid token","code":"unauthorized"}"#,
            &url(),
        );
        assert!(
            error.to_string().starts_with("the API at http://127.0.0.1:8787 refused the token (401: invalid token)"),
            "{error}"
        );
    }

    #[test]
    fn a_non_json_error_page_still_says_something() {
        let error = error_for(StatusCode::BAD_GATEWAY, b"<html>Bad gateway</html>", &url());
        assert_eq!(error.to_string(), "the API failed (502): <html>Bad gateway</html>");
        let error = error_for(StatusCode::SERVICE_UNAVAILABLE, b"", &url());
        assert_eq!(error.to_string(), "the API failed (503): Service Unavailable");
    }

    #[test]
    fn urls_are_built_segment_by_segment_from_any_base() {
        for base in ["http://h:1", "http://h:1/", "https://h/prefix/"] {
            let client = ApiClient::new(base, "t").unwrap();
            let url = client.url(&["vm", "a b", "status"], &[]);
            assert!(url.as_str().ends_with("/vm/a%20b/status"), "{url}");
            assert!(!url.as_str().contains("//vm"), "{url}");
        }
        for bad in ["127.0.0.1:8787", "ftp://h", "not a url"] {
            let error = ApiClient::new(bad, "t").unwrap_err();
            assert!(error.to_string().contains("set API_URL or pass --api-url"), "{error}");
        }
    }

    #[test]
    fn list_filters_travel_as_the_documented_query_parameters() {
        let query = ListQuery {
            limit: 10,
            cursor: Some("c1".into()),
            status: Some(TaskStatus::Failed),
            kind: Some(OperationKind::RunCommand),
            vm_name: Some("vm-1".into()),
            target_server: Some("production".into()),
        };
        let client = ApiClient::new("http://h", "t").unwrap();
        let url = client.url(&["vm", "tasks"], &query.pairs());
        assert_eq!(
            url.query(),
            Some("limit=10&cursor=c1&status=failed&type=run_command&vmName=vm-1&targetServer=production")
        );
    }
}
