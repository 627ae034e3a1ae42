//! A typed async client for the Arrakis VM REST server (`abshkbh/arrakis`), as it really
//! behaves (see `shared/arrakis/BEHAVIOR.md`): not-found reported as 500, lifecycle calls that
//! block for a whole boot, strict cmd/files bodies, and a 30 s guest-proxy timeout.
//!
//! Each call has its own timeout ([`Timeouts`]); every failure is an [`ArrakisError`] that says
//! whether the VM is missing ([`ArrakisError::is_not_found`]) and whether a retry may help
//! ([`ArrakisError::is_transient`]). The client does not retry by itself, nor serialize calls
//! per VM: the server has no per-name locking, so callers must do that (§0).

mod error;
mod types;

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, LOCATION};
use reqwest::{Method, RequestBuilder};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use error::{ApiErrorKind, ArrakisError};
pub use types::{CommandOutput, FileDownload, FileUpload, Health, PortForward, StartVmRequest, VmInfo, VmStatus};

/// Everything but RFC 3986's unreserved characters is escaped in a path segment, so `/`, `%`,
/// `?`, `#`, spaces and non-ASCII never change the URL's structure.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// The same for a `paths` query value, keeping `/` readable.
const QUERY_PATH: &AsciiSet = &SEGMENT.remove(b'/');
/// Time allowed to establish a TCP connection, whatever the operation's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of an unexpected body goes into an error message.
const SNIPPET: usize = 200;
/// Largest response body read by default: far above any real answer, low enough that a
/// runaway command's output cannot exhaust the daemon's memory.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Per-operation timeouts. Arrakis does its work inside the request and a disconnect cancels
/// it half-way (§0), so these are generous: a boot can take the server's 60 s readiness wait,
/// and cmd/files are capped at 30 s on the server side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `POST /v1/vms` (boot, re-boot, restore).
    pub start: Duration,
    /// `DELETE /v1/vms/{name}` and `DELETE /v1/vms`.
    pub delete: Duration,
    pub snapshot: Duration,
    pub cmd: Duration,
    /// Upload and download.
    pub files: Duration,
    /// Health, list, get and the PATCH state changes.
    pub default: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            start: Duration::from_secs(120),
            delete: Duration::from_secs(60),
            snapshot: Duration::from_secs(60),
            cmd: Duration::from_secs(35),
            files: Duration::from_secs(35),
            default: Duration::from_secs(30),
        }
    }
}

/// A client for one Arrakis server. Cheap to clone; clones share a connection pool.
#[derive(Debug, Clone)]
pub struct ArrakisClient {
    http: reqwest::Client,
    /// Without a trailing slash, so paths can be appended.
    base: String,
    timeouts: Timeouts,
    max_response_bytes: usize,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorMessage,
}

#[derive(Deserialize)]
struct ErrorMessage {
    message: String,
}

impl ArrakisClient {
    /// A client for `base_url` (`http://host:7000`, optionally with a path prefix; a trailing
    /// slash is fine). Fails with [`ArrakisError::InvalidName`] unless the URL is http(s) with
    /// a host and without query or fragment.
    pub fn new(base_url: &str) -> Result<Self, ArrakisError> {
        let invalid = || ArrakisError::InvalidName { name: base_url.to_string() };
        let url = reqwest::Url::parse(base_url.trim()).map_err(|_| invalid())?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none_or(str::is_empty)
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(invalid());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // The server's 301s point at cleaned paths, i.e. at a different resource; and a
            // followed 301 would turn a POST into a GET.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ArrakisError::Connect { message: error_chain(&e) })?;
        Ok(Self {
            http,
            base: url.as_str().trim_end_matches('/').to_string(),
            timeouts: Timeouts::default(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        })
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The normalised base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Answers longer than `bytes` fail with [`ArrakisError::Protocol`] instead of being read.
    pub fn with_max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// `GET /v1/health`. The server checks nothing behind it; this only proves it answers.
    pub async fn health(&self) -> Result<Health, ArrakisError> {
        let req = self.request(Method::GET, "/v1/health");
        self.call("health", self.timeouts.default, None, req).await
    }

    /// `GET /v1/vms`, every registered VM in random order (`{}` when there are none).
    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, ArrakisError> {
        #[derive(Deserialize)]
        struct List {
            #[serde(default)]
            vms: Option<Vec<VmInfo>>,
        }
        let req = self.request(Method::GET, "/v1/vms");
        let list: List = self.call("list_vms", self.timeouts.default, None, req).await?;
        Ok(list.vms.unwrap_or_default())
    }

    /// `POST /v1/vms`: boots a new VM, cold-boots a STOPPED one, resumes a PAUSED one, or
    /// restores `snapshot_id`. After any failure the VM may exist anyway (a zombie, §2.3).
    pub async fn start_vm(&self, req: &StartVmRequest) -> Result<VmInfo, ArrakisError> {
        check_name(&req.vm_name)?;
        if let Some(id) = req.snapshot_id.as_deref().filter(|id| !id.is_empty()) {
            check_name(id)?;
        }
        let builder = self.request(Method::POST, "/v1/vms").json(req);
        self.call("start_vm", self.timeouts.start, Some(&req.vm_name), builder).await
    }

    /// `GET /v1/vms/{name}`.
    pub async fn get_vm(&self, name: &str) -> Result<VmInfo, ArrakisError> {
        let req = self.request(Method::GET, &vm_path(name, "")?);
        self.call("get_vm", self.timeouts.default, Some(name), req).await
    }

    /// A hard power-off; the VM stays registered as STOPPED with all its resources.
    pub async fn stop_vm(&self, name: &str) -> Result<(), ArrakisError> {
        self.patch("stop_vm", name, "stopped").await
    }

    pub async fn pause_vm(&self, name: &str) -> Result<(), ArrakisError> {
        self.patch("pause_vm", name, "paused").await
    }

    pub async fn resume_vm(&self, name: &str) -> Result<(), ArrakisError> {
        self.patch("resume_vm", name, "resume").await
    }

    async fn patch(&self, op: &'static str, name: &str, status: &str) -> Result<(), ArrakisError> {
        #[derive(Serialize)]
        struct Patch<'a> {
            status: &'a str,
        }
        let req = self.request(Method::PATCH, &vm_path(name, "")?).json(&Patch { status });
        self.call::<serde_json::Value>(op, self.timeouts.default, Some(name), req).await.map(drop)
    }

    /// `DELETE /v1/vms/{name}`: destroys the VM and its disk. Its host ports are not freed.
    pub async fn delete_vm(&self, name: &str) -> Result<(), ArrakisError> {
        let req = self.request(Method::DELETE, &vm_path(name, "")?);
        self.call::<serde_json::Value>("delete_vm", self.timeouts.delete, Some(name), req).await.map(drop)
    }

    /// `DELETE /v1/vms`: destroys every VM.
    pub async fn delete_all_vms(&self) -> Result<(), ArrakisError> {
        let req = self.request(Method::DELETE, "/v1/vms");
        self.call::<serde_json::Value>("delete_all_vms", self.timeouts.delete, None, req).await.map(drop)
    }

    /// `POST /v1/vms/{name}/snapshots`; returns the snapshot id. Ids are global and must be
    /// new; the VM must be RUNNING and not itself restored.
    pub async fn snapshot_vm(&self, name: &str, snapshot_id: &str) -> Result<String, ArrakisError> {
        #[derive(Serialize, Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Snapshot {
            snapshot_id: String,
        }
        check_name(snapshot_id)?;
        let body = Snapshot { snapshot_id: snapshot_id.to_string() };
        let req = self.request(Method::POST, &vm_path(name, "/snapshots")?).json(&body);
        let resp: Snapshot = self.call("snapshot_vm", self.timeouts.snapshot, Some(name), req).await?;
        Ok(resp.snapshot_id)
    }

    /// `POST /v1/vms/{name}/cmd`: runs `bash -c cmd` as root in `/tmp/server_files`. A
    /// non-zero exit is `Ok` with [`CommandOutput::exit_code`] set; with `blocking = false` the
    /// output is only the "started in background" notice.
    pub async fn run_command(&self, name: &str, cmd: &str, blocking: bool) -> Result<CommandOutput, ArrakisError> {
        #[derive(Serialize)]
        struct Cmd<'a> {
            cmd: &'a str,
            blocking: bool,
        }
        #[derive(Deserialize)]
        struct Output {
            #[serde(default)]
            output: String,
            #[serde(default)]
            error: String,
        }
        let req = self.request(Method::POST, &vm_path(name, "/cmd")?).json(&Cmd { cmd, blocking });
        let out: Output = self.call("run_command", self.timeouts.cmd, Some(name), req).await?;
        Ok(CommandOutput::from_wire(out.output, out.error))
    }

    /// `POST /v1/vms/{name}/files`. Files before a failing one stay written.
    pub async fn upload_files(&self, name: &str, files: &[FileUpload]) -> Result<(), ArrakisError> {
        #[derive(Serialize)]
        struct Upload<'a> {
            files: &'a [FileUpload],
        }
        let req = self.request(Method::POST, &vm_path(name, "/files")?).json(&Upload { files });
        self.call::<serde_json::Value>("upload_files", self.timeouts.files, Some(name), req).await.map(drop)
    }

    /// `GET /v1/vms/{name}/files?paths=…`. Every path resolves under `/tmp/server_files`, even
    /// absolute ones; a missing file is an entry with `error` set. Paths containing `,`, `&`,
    /// `#`, `%`, `+` or whitespace cannot survive the server's unescaped forwarding (§2.11)
    /// and are rejected with [`ArrakisError::InvalidName`].
    pub async fn download_files(&self, name: &str, paths: &[String]) -> Result<Vec<FileDownload>, ArrakisError> {
        #[derive(Deserialize)]
        struct Entry {
            path: String,
            #[serde(default)]
            content: String,
            #[serde(default)]
            error: String,
        }
        #[derive(Deserialize)]
        struct Files {
            #[serde(default)]
            files: Vec<Entry>,
        }
        for path in paths {
            if path.chars().any(|c| matches!(c, ',' | '&' | '#' | '%' | '+') || c.is_whitespace() || c.is_control()) {
                return Err(ArrakisError::InvalidName { name: path.clone() });
            }
        }
        let joined: Vec<String> = paths.iter().map(|p| utf8_percent_encode(p, QUERY_PATH).to_string()).collect();
        let path = format!("{}?paths={}", vm_path(name, "/files")?, joined.join(","));
        let req = self.request(Method::GET, &path);
        let files: Files = self.call("download_files", self.timeouts.files, Some(name), req).await?;
        Ok(files
            .files
            .into_iter()
            .map(|e| FileDownload { path: e.path, content: e.content, error: (!e.error.is_empty()).then_some(e.error) })
            .collect())
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{}", self.base, path))
    }

    /// Sends a request and decodes a 2xx body as `T`, or turns the answer into an error.
    async fn call<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        timeout: Duration,
        vm_name: Option<&str>,
        req: RequestBuilder,
    ) -> Result<T, ArrakisError> {
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                ArrakisError::Timeout { operation, after: timeout }
            } else if e.is_connect() {
                ArrakisError::Connect { message: error_chain(&e) }
            } else {
                ArrakisError::Dropped { message: error_chain(&e) }
            }
        };
        let resp = req.timeout(timeout).send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = match read_capped(resp, self.max_response_bytes).await {
            Ok(body) => body,
            Err(BodyError::Transport(e)) => return Err(transport(e)),
            Err(e @ BodyError::TooLarge { .. }) => {
                return Err(ArrakisError::Protocol { status, message: format!("{operation}: {e}") })
            }
        };
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|e| ArrakisError::Protocol {
                status,
                message: format!("cannot decode the {operation} response ({e}): {}", snippet(&body)),
            });
        }
        Err(error_from_response(status, &headers, &body, vm_name))
    }
}

/// Classifies a non-2xx answer: a handler's error body, or something only a router or proxy
/// sends.
fn error_from_response(status: u16, headers: &HeaderMap, body: &[u8], vm_name: Option<&str>) -> ArrakisError {
    if let Ok(err) = serde_json::from_slice::<ErrorBody>(body) {
        return error::classify(status, err.error.message, vm_name);
    }
    let message = match (status, headers.get(LOCATION)) {
        (300..=399, Some(location)) => format!(
            "redirected to {} (the request path was not in clean form)",
            String::from_utf8_lossy(location.as_bytes())
        ),
        (405, _) => "method not allowed on this path".to_string(),
        _ if body.is_empty() => "empty body".to_string(),
        _ => snippet(body),
    };
    ArrakisError::Protocol { status, message }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim_end();
    match text.char_indices().nth(SNIPPET) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// Why a response body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the response is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the response: {0}")]
    Transport(reqwest::Error),
}

/// Reads a response body, refusing one over `limit` bytes: by its `Content-Length` before
/// reading, else as it arrives. The daemon's edge client reads the workers' answers with it too.
pub async fn read_capped(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error with its causes, `: `-separated. reqwest's `Display` omits the cause ("error
/// sending request"); the chain says what failed. The daemon's edge client uses it too.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Rejects names that cannot address one VM: the server routes on the decoded path, so an
/// encoded `/` still splits the segment, and `.`/`..` are cleaned away (301).
fn check_name(name: &str) -> Result<(), ArrakisError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.chars().any(char::is_control) {
        return Err(ArrakisError::InvalidName { name: name.to_string() });
    }
    Ok(())
}

fn vm_path(name: &str, suffix: &str) -> Result<String, ArrakisError> {
    check_name(name)?;
    Ok(format!("/v1/vms/{}{suffix}", utf8_percent_encode(name, SEGMENT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(ArrakisClient::new("http://h:7000/").unwrap().base_url(), "http://h:7000");
        assert_eq!(ArrakisClient::new("http://h:7000/api/").unwrap().base_url(), "http://h:7000/api");
        assert_eq!(ArrakisClient::new("https://h").unwrap().base_url(), "https://h");
        for bad in ["", "h:7000", "ftp://h", "http://", "http://h/?x=1", "http://h/#f", "not a url"] {
            assert!(matches!(ArrakisClient::new(bad), Err(ArrakisError::InvalidName { .. })), "{bad:?}");
        }
    }

    #[test]
    fn names_become_one_encoded_segment() {
        assert_eq!(vm_path("vm-1_a.b", "").unwrap(), "/v1/vms/vm-1_a.b");
        assert_eq!(vm_path("a b?c#d%e", "/cmd").unwrap(), "/v1/vms/a%20b%3Fc%23d%25e/cmd");
        assert_eq!(vm_path("ü", "").unwrap(), "/v1/vms/%C3%BC");
        for bad in ["", ".", "..", "a/b", "a\nb", "\0"] {
            assert_eq!(vm_path(bad, ""), Err(ArrakisError::InvalidName { name: bad.into() }));
        }
    }

    #[test]
    fn non_handler_answers_are_protocol_errors() {
        let headers = HeaderMap::new();
        let e = error_from_response(404, &headers, b"404 page not found\n", Some("x"));
        assert_eq!(e, ArrakisError::Protocol { status: 404, message: "404 page not found".into() });
        let e = error_from_response(405, &headers, b"", None);
        assert!(matches!(e, ArrakisError::Protocol { status: 405, .. }));
        let mut redirect = HeaderMap::new();
        redirect.insert(LOCATION, "/v1/vms".parse().unwrap());
        let e = error_from_response(301, &redirect, b"", None);
        assert!(matches!(&e, ArrakisError::Protocol { status: 301, message } if message.contains("/v1/vms")));
        let e = error_from_response(502, &headers, b"<html>bad gateway</html>", None);
        assert!(e.is_transient());
        let e = error_from_response(500, &headers, br#"{"error":{"message":"boom"}}"#, None);
        assert!(matches!(e, ArrakisError::Api { status: 500, kind: ApiErrorKind::Unavailable, .. }));
    }
}
