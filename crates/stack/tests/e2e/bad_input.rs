//! Bad input to the real workers under `wrangler dev`, over HTTP through the dev gateway: each
//! case must be a 4xx with a JSON `ErrorBody` naming the problem, exactly as the native tests
//! in `crates/vm-task-edge/tests/bad_input.rs` see it. Catches what only the runtime does:
//! body and header conversion by workers-rs, URL normalisation, the gateway's forwarding.
//!
//! One stack serves every case; the test runs them all and then lists every failure.
//!
//! Run with `cargo xtask e2e`; the worker bundles must be built first.

use std::time::Duration;

use reqwest::{
    header::{HeaderName, HeaderValue},
    Method,
};
use serde_json::{json, Value};
use stack::{Stack, StackOptions};
use vm_task_types::{wire::ErrorBody, Limits};

/// A v7 UUID no task has.
const UNKNOWN_ID: &str = "0190b5a4-3b7c-7def-8abc-0123456789ab";

#[derive(Clone, Copy)]
enum Token {
    None,
    Client,
    Consumer,
    Other(&'static str),
}

/// One request and the error it must produce.
struct Case {
    name: String,
    method: Method,
    path: String,
    token: Token,
    headers: Vec<(&'static str, HeaderValue)>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
    needles: Vec<String>,
    /// Response headers that must be present with these values.
    expect_headers: Vec<(&'static str, &'static str)>,
}

impl Case {
    fn new(name: impl Into<String>, method: Method, path: impl Into<String>, token: Token) -> Self {
        Self {
            name: name.into(),
            method,
            path: path.into(),
            token,
            headers: Vec::new(),
            body: None,
            status: 0,
            code: "",
            field: None,
            needles: Vec::new(),
            expect_headers: Vec::new(),
        }
    }

    fn get(name: impl Into<String>, path: impl Into<String>) -> Self {
        Self::new(name, Method::GET, path, Token::Client)
    }

    /// `POST /vm/tasks` with the client token and this JSON body.
    fn submit(name: impl Into<String>, body: Value) -> Self {
        Self::new(name, Method::POST, "/vm/tasks", Token::Client).json(&body)
    }

    fn json(self, body: &Value) -> Self {
        self.raw(serde_json::to_vec(body).expect("JSON"), "application/json")
    }

    fn raw(mut self, body: impl Into<Vec<u8>>, content_type: &'static str) -> Self {
        self.body = Some(body.into());
        self.header("content-type", HeaderValue::from_static(content_type))
    }

    fn header(mut self, name: &'static str, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    fn expect(mut self, status: u16, code: &'static str, field: Option<&'static str>, needles: &[&str]) -> Self {
        self.status = status;
        self.code = code;
        self.field = field;
        self.needles = needles.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    fn expect_header(mut self, name: &'static str, value: &'static str) -> Self {
        self.expect_headers.push((name, value));
        self
    }
}

struct Target<'a> {
    http: reqwest::Client,
    stack: &'a Stack,
}

impl Target<'_> {
    async fn send(&self, case: &Case) -> Result<reqwest::Response, String> {
        let url = format!("{}{}", self.stack.gateway_url(), case.path);
        let mut request = self.http.request(case.method.clone(), &url);
        let bearer = match case.token {
            Token::None => None,
            Token::Client => Some(self.stack.client_token()),
            Token::Consumer => Some(self.stack.consumer_token()),
            Token::Other(token) => Some(token),
        };
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        for (name, value) in &case.headers {
            request = request.header(HeaderName::from_static(name), value.clone());
        }
        if let Some(body) = &case.body {
            request = request.body(body.clone());
        }
        request.send().await.map_err(|e| format!("no answer: {e:#}"))
    }

    /// Runs the case; `Err` describes every way the answer differs from the expectation.
    async fn check(&self, case: &Case) -> Result<(), String> {
        let response = self.send(case).await?;
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let headers = response.headers().clone();
        let text = response.text().await.map_err(|e| format!("body unreadable: {e:#}"))?;
        let mut problems = Vec::new();
        if status != case.status {
            problems.push(format!("status {status}, expected {}", case.status));
        }
        if content_type != "application/json" {
            problems.push(format!("content type {content_type:?}, expected \"application/json\""));
        }
        match serde_json::from_str::<ErrorBody>(&text) {
            Err(e) => problems.push(format!("body is not an ErrorBody ({e})")),
            Ok(body) => {
                if body.success {
                    problems.push("success is true".into());
                }
                if body.code != case.code {
                    problems.push(format!("code {:?}, expected {:?}", body.code, case.code));
                }
                if body.field.as_deref() != case.field {
                    problems.push(format!("field {:?}, expected {:?}", body.field, case.field));
                }
                for needle in &case.needles {
                    if !body.error.contains(needle.as_str()) {
                        problems.push(format!("message lacks {needle:?}"));
                    }
                }
            }
        }
        for (name, value) in &case.expect_headers {
            let got = headers.get(*name).and_then(|v| v.to_str().ok());
            if got != Some(*value) {
                problems.push(format!("header {name}: {got:?}, expected {value:?}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            let shown: String = text.chars().take(400).collect();
            Err(format!("{}; answer: {status} {shown}", problems.join("; ")))
        }
    }

    /// Sends a request that must succeed with `status` and returns its JSON body.
    async fn ok(&self, case: Case, status: u16) -> Value {
        let response = self.send(&case).await.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let got = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(got, status, "{}: {text}", case.name);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {text}", case.name))
    }
}

fn stop(vm_name: &str) -> Value {
    json!({"type": "stop_vm", "payload": {"vmName": vm_name, "targetServer": "production"}})
}

fn header(value: &str) -> HeaderValue {
    HeaderValue::from_bytes(value.as_bytes()).expect("a valid header value")
}

/// Every route with a task id: `(method, path with {id}, token, body)`.
fn id_routes() -> Vec<(Method, &'static str, Token, Option<Value>)> {
    let claim_id = json!({"claimId": UNKNOWN_ID});
    vec![
        (Method::GET, "/vm/tasks/{id}", Token::Client, None),
        (Method::DELETE, "/vm/tasks/{id}", Token::Client, None),
        (Method::GET, "/vm/tasks/{id}/status", Token::Client, None),
        (
            Method::PUT,
            "/vm/tasks/{id}/status",
            Token::Consumer,
            Some(json!({"status": "completed", "claimId": UNKNOWN_ID})),
        ),
        (Method::DELETE, "/consumer/tasks/{id}", Token::Consumer, None),
        (Method::POST, "/consumer/tasks/{id}/claim", Token::Consumer, Some(json!({"consumerId": "host-a"}))),
        (Method::POST, "/consumer/tasks/{id}/heartbeat", Token::Consumer, Some(claim_id.clone())),
        (Method::POST, "/consumer/tasks/{id}/release", Token::Consumer, Some(claim_id)),
    ]
}

fn cases(existing_id: &str, genuine_cursor: &str) -> Vec<Case> {
    let mut cases = vec![
        // Bodies.
        Case::new("malformed JSON", Method::POST, "/vm/tasks", Token::Client)
            .raw(r#"{"type": "stop_vm", "payload": {"vmName": "#, "application/json")
            .expect(400, "malformed_json", None, &["request body is not valid JSON", "EOF"]),
        Case::new("empty body", Method::POST, "/vm/tasks", Token::Client)
            .raw("", "application/json")
            .expect(400, "empty_body", None, &["request body is empty"]),
        Case::new("whitespace body", Method::POST, "/vm/tasks", Token::Client)
            .raw(" \n", "application/json")
            .expect(400, "empty_body", None, &["request body is empty"]),
        Case::new("text/plain body", Method::POST, "/vm/tasks", Token::Client)
            .raw(serde_json::to_vec(&stop("vm-1")).unwrap(), "text/plain")
            .expect(415, "unsupported_media_type", None, &["\"text/plain\"", "send application/json"]),
        Case::new("form body", Method::POST, "/vm/tasks", Token::Client)
            .raw("type=stop_vm", "application/x-www-form-urlencoded")
            .expect(415, "unsupported_media_type", None, &["application/x-www-form-urlencoded"]),
        Case::submit("body not an object", json!([]))
            .expect(400, "invalid_field", Some("body"), &["must be a JSON object"]),
        Case::submit("unknown operation", json!({"type": "reboot_vm", "payload": {"vmName": "vm-1"}})).expect(
            400,
            "invalid_field",
            Some("type"),
            &["unknown operation \"reboot_vm\"", "launch_vm"],
        ),
        Case::submit("missing type", json!({"payload": {"vmName": "vm-1"}}))
            .expect(400, "invalid_field", Some("type"), &["type: is required"]),
        Case::submit("missing payload", json!({"type": "stop_vm"}))
            .expect(400, "invalid_field", Some("payload"), &["payload: is required"]),
        Case::submit("unknown top-level field", json!({"type": "stop_vm", "payload": {"vmName": "v"}, "priority": 1}))
            .expect(400, "invalid_field", Some("priority"), &["unknown top-level field"]),
        Case::submit("unknown payload field", json!({"type": "stop_vm", "payload": {"vmName": "v", "vmname": "w"}}))
            .expect(400, "invalid_field", Some("payload"), &["unknown field `vmname`"]),
        Case::submit("run_command without command", json!({"type": "run_command", "payload": {"vmName": "v"}}))
            .expect(400, "invalid_field", Some("payload"), &["missing field `command`"]),
        Case::submit("blank command", json!({"type": "run_command", "payload": {"vmName": "v", "command": " \n"}}))
            .expect(400, "invalid_field", Some("payload.command"), &["must not be empty or only whitespace"]),
        // Names.
        Case::submit("vmName with a slash", stop("a/b")).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["contains '/'"],
        ),
        Case::submit("vmName ../etc", stop("../etc")).expect(400, "invalid_field", Some("payload.vmName"), &["'/'"]),
        Case::submit("vmName ..", stop("..")).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["must not start with '.' or '-'"],
        ),
        Case::submit("vmName with a space", stop("my vm")).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["contains ' '"],
        ),
        Case::submit("vmName of 64 characters", stop(&"v".repeat(64))).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["must be at most 63 characters, got 64"],
        ),
        Case::submit("non-ASCII vmName", stop("naïve-vm")).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["contains 'ï'"],
        ),
        Case::get("path vmName with %2F", "/vm/a%2Fb/status").expect(400, "invalid_field", Some("vmName"), &["'/'"]),
        Case::get("path vmName with %20", "/vm/my%20vm/status").expect(400, "invalid_field", Some("vmName"), &["' '"]),
        Case::get("path vmName non-ASCII", "/vm/na%C3%AFve/status").expect(
            400,
            "invalid_field",
            Some("vmName"),
            &["'ï'"],
        ),
        Case::get("path vmName of 64 characters", format!("/vm/{}/status", "v".repeat(64))).expect(
            400,
            "invalid_field",
            Some("vmName"),
            &["at most 63"],
        ),
        Case::get("unknown VM", "/vm/ghost/status").expect(404, "not_found", None, &["VM \"ghost\" is not in the registry"]),
        Case::submit("bad targetServer", json!({"type": "stop_vm", "payload": {"vmName": "v", "targetServer": "a:b"}}))
            .expect(400, "invalid_field", Some("payload.targetServer"), &["contains ':'"]),
        Case::submit("no targetServer for an unknown VM", json!({"type": "stop_vm", "payload": {"vmName": "ghost"}}))
            .expect(422, "no_target_server", Some("payload.targetServer"), &["payload.targetServer is required"]),
        // Sizes.
        Case::submit(
            "command over 16 KiB",
            json!({"type": "run_command", "payload": {"vmName": "v", "command": "x".repeat(Limits::COMMAND_MAX_BYTES + 1), "targetServer": "p"}}),
        )
        .expect(400, "invalid_field", Some("payload.command"), &["must be at most 16384 bytes, got 16385"]),
        Case::submit(
            "body over 64 KiB",
            json!({"type": "launch_vm", "payload": {"vmName": "v", "vmConfig": {"memory": "m".repeat(Limits::BODY_MAX_BYTES)}}}),
        )
        .expect(413, "payload_too_large", None, &["the limit is 65536 bytes"]),
        Case::new("claim body over 64 KiB", Method::POST, format!("/consumer/tasks/{UNKNOWN_ID}/claim"), Token::Consumer)
            .json(&json!({"consumerId": "c".repeat(Limits::BODY_MAX_BYTES)}))
            .expect(413, "payload_too_large", None, &["the limit is 65536 bytes"]),
        // Query parameters.
        Case::get("wait=61", format!("/vm/tasks/{existing_id}?wait=61")).expect(
            400,
            "invalid_field",
            Some("wait"),
            &["must be whole seconds from 0 to 60, got \"61\""],
        ),
        Case::get("status wait=61", format!("/vm/tasks/{existing_id}/status?wait=61")).expect(
            400,
            "invalid_field",
            Some("wait"),
            &["got \"61\""],
        ),
        Case::get("wait=-1", format!("/vm/tasks/{existing_id}?wait=-1")).expect(
            400,
            "invalid_field",
            Some("wait"),
            &["got \"-1\""],
        ),
        Case::new("ready wait=31", Method::GET, "/consumer/tasks/ready?server=production&wait=31", Token::Consumer)
            .expect(400, "invalid_field", Some("wait"), &["must be an integer from 0 to 30, got \"31\""]),
        Case::new("ready wait without server", Method::GET, "/consumer/tasks/ready?wait=5", Token::Consumer).expect(
            400,
            "invalid_field",
            Some("server"),
            &["is required with `wait` or `since`"],
        ),
        Case::new("ready server with a slash", Method::GET, "/consumer/tasks/ready?server=a%2Fb", Token::Consumer)
            .expect(400, "invalid_field", Some("server"), &["contains '/'"]),
        Case::get("limit=0", "/vm/tasks?limit=0").expect(
            400,
            "invalid_field",
            Some("limit"),
            &["must be an integer from 1 to 1000, got \"0\""],
        ),
        Case::get("limit=1001", "/vm/tasks?limit=1001").expect(400, "invalid_field", Some("limit"), &["got \"1001\""]),
        Case::new("ready limit=0", Method::GET, "/consumer/tasks/ready?limit=0", Token::Consumer).expect(
            400,
            "invalid_field",
            Some("limit"),
            &["got \"0\""],
        ),
        Case::new("all limit=0", Method::GET, "/consumer/tasks/all?limit=0", Token::Consumer).expect(
            400,
            "invalid_field",
            Some("limit"),
            &["got \"0\""],
        ),
        // Idempotency keys.
        Case::submit("Idempotency-Key with a space", stop("vm-1"))
            .header("idempotency-key", header("has space"))
            .expect(400, "invalid_idempotency_key", Some("Idempotency-Key"), &["1 to 255 visible ASCII characters"]),
        Case::submit("Idempotency-Key of 256 characters", stop("vm-1"))
            .header("idempotency-key", header(&"k".repeat(256)))
            .expect(400, "invalid_idempotency_key", Some("Idempotency-Key"), &["1 to 255 visible ASCII characters"]),
        Case::submit("empty Idempotency-Key", stop("vm-1"))
            .header("idempotency-key", header(""))
            .expect(400, "invalid_idempotency_key", Some("Idempotency-Key"), &["1 to 255 visible ASCII characters"]),
        Case::submit("non-ASCII Idempotency-Key", stop("vm-1"))
            .header("idempotency-key", header("ключ"))
            .expect(400, "invalid_idempotency_key", Some("Idempotency-Key"), &["1 to 255 visible ASCII characters"]),
        // Daemon bodies.
        Case::new("claim without consumerId", Method::POST, format!("/consumer/tasks/{existing_id}/claim"), Token::Consumer)
            .json(&json!({"leaseSeconds": 60}))
            .expect(400, "invalid_body", None, &["missing field `consumerId`"]),
        Case::new("claim with a bad consumerId", Method::POST, format!("/consumer/tasks/{existing_id}/claim"), Token::Consumer)
            .json(&json!({"consumerId": "a/b"}))
            .expect(400, "invalid_field", Some("consumerId"), &["contains '/'"]),
        Case::new("heartbeat without claimId", Method::POST, format!("/consumer/tasks/{existing_id}/heartbeat"), Token::Consumer)
            .json(&json!({"leaseSeconds": 60}))
            .expect(400, "invalid_body", None, &["missing field `claimId`"]),
        Case::new("report of an unknown status", Method::PUT, format!("/vm/tasks/{existing_id}/status"), Token::Consumer)
            .json(&json!({"status": "done", "claimId": UNKNOWN_ID}))
            .expect(400, "invalid_body", None, &["unknown variant `done`"]),
        Case::new("report without a claim", Method::PUT, format!("/vm/tasks/{existing_id}/status"), Token::Consumer)
            .json(&json!({"status": "completed", "claimId": UNKNOWN_ID}))
            .expect(409, "conflict", None, &["does not hold task"]),
        // Tokens.
        Case::new("no token", Method::GET, "/vm/tasks", Token::None)
            .expect(401, "unauthorized", None, &["missing Authorization header"])
            .expect_header("www-authenticate", "Bearer"),
        Case::new("wrong token", Method::GET, "/vm/tasks", Token::Other("guess"))
            .expect(401, "unauthorized", None, &["invalid client token"])
            .expect_header("www-authenticate", "Bearer"),
        Case::new("Basic credentials", Method::GET, "/vm/tasks", Token::None)
            .header("authorization", header("Basic YTpi"))
            .expect(401, "unauthorized", None, &["Bearer scheme"]),
        Case::new("client token on the consumer worker", Method::GET, "/consumer/tasks/ready", Token::Client)
            .expect(401, "unauthorized", None, &["invalid consumer token"]),
        Case::new("client token on a status report", Method::PUT, format!("/vm/tasks/{existing_id}/status"), Token::Client)
            .json(&json!({"status": "completed", "claimId": UNKNOWN_ID}))
            .expect(401, "unauthorized", None, &["invalid consumer token"]),
        Case::new("consumer token on a submission", Method::POST, "/vm/tasks", Token::Consumer)
            .json(&stop("vm-1"))
            .expect(401, "unauthorized", None, &["invalid client token"]),
        // Routes and methods.
        Case::get("unknown path", "/vm/tasks/x/y/z").expect(404, "not_found", None, &["no route for GET /vm/tasks/x/y/z"]),
        Case::new("unknown consumer path", Method::GET, "/consumer/nope", Token::Consumer).expect(
            404,
            "not_found",
            None,
            &["no route for GET /nope"],
        ),
        Case::new("PATCH on a task", Method::PATCH, format!("/vm/tasks/{UNKNOWN_ID}"), Token::Client)
            .expect(405, "method_not_allowed", None, &["method PATCH is not allowed", "allowed: GET, DELETE"])
            .expect_header("allow", "GET, DELETE"),
        Case::new("GET on a claim", Method::GET, format!("/consumer/tasks/{UNKNOWN_ID}/claim"), Token::Consumer)
            .expect(405, "method_not_allowed", None, &["allowed: POST"])
            .expect_header("allow", "POST"),
        Case::new("TRACE on the task list", Method::TRACE, "/vm/tasks", Token::Client)
            .expect(405, "method_not_allowed", None, &["method TRACE is not allowed", "allowed: POST, GET"]),
    ];
    // Every id route: a non-UUID is a 400 naming `id`, an unknown UUID a 404.
    for (method, path, token, body) in id_routes() {
        for bad in ["not-a-uuid", "0190b5a43b7c7def8abc0123456789ab"] {
            let mut case =
                Case::new(format!("{method} {path} with id {bad}"), method.clone(), path.replace("{id}", bad), token);
            if let Some(body) = &body {
                case = case.json(body);
            }
            let expected = format!("id: \"{bad}\" is not a UUID");
            cases.push(case.expect(400, "invalid_field", Some("id"), &[&expected]));
        }
        let mut case = Case::new(
            format!("{method} {path} with an unknown id"),
            method.clone(),
            path.replace("{id}", UNKNOWN_ID),
            token,
        );
        if let Some(body) = &body {
            case = case.json(body);
        }
        let expected = format!("task {UNKNOWN_ID} not found");
        cases.push(case.expect(404, "not_found", None, &[&expected]));
    }
    // Cursors: anything but a cursor this API signed.
    let tampered = {
        let mut chars: Vec<char> = genuine_cursor.chars().collect();
        let last = chars.last_mut().expect("a non-empty cursor");
        *last = if *last == '0' { '1' } else { '0' };
        chars.into_iter().collect::<String>()
    };
    for forged in ["task:000".to_owned(), "abc.def".to_owned(), tampered, genuine_cursor.replace('.', "")] {
        cases.push(Case::get(format!("forged cursor {forged}"), format!("/vm/tasks?cursor={forged}")).expect(
            400,
            "invalid_cursor",
            Some("cursor"),
            &["cursor is not one this API issued"],
        ));
    }
    cases
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn bad_input_is_a_4xx_with_a_json_error_naming_the_problem() {
    let stack = Stack::start(StackOptions::edge_only()).await.expect("the stack starts");
    let target = Target {
        http: reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(15)).build().expect("a client"),
        stack: &stack,
    };

    // Two tasks to read, list and page through; a positive control for the requests below.
    let first = target.ok(Case::submit("submit vm-1", stop("vm-1")), 202).await;
    target.ok(Case::submit("submit vm-2", stop("vm-2")), 202).await;
    let existing_id = first["taskId"].as_str().expect("a taskId").to_owned();
    let page = target.ok(Case::get("first page", "/vm/tasks?limit=1"), 200).await;
    let cursor = page["cursor"].as_str().expect("a cursor to the second page").to_owned();
    let second = target.ok(Case::get("second page", format!("/vm/tasks?limit=1&cursor={cursor}")), 200).await;
    assert_eq!(second["count"], 1, "{second}");

    // The same Idempotency-Key: the same body replays the task, another body is refused.
    let keyed = |vm: &str| Case::submit("keyed submission", stop(vm)).header("idempotency-key", header("order-42"));
    let created = target.ok(keyed("vm-3"), 202).await;
    let replayed = target.ok(keyed("vm-3"), 200).await;
    assert_eq!(replayed["taskId"], created["taskId"], "a replay returns the first task");
    let reused =
        format!("Idempotency-Key was already used for task {}", created["taskId"].as_str().unwrap_or_default());
    let mut all = vec![keyed("vm-4").expect(422, "idempotency_key_reused", Some("Idempotency-Key"), &[&reused])];
    all.extend(cases(&existing_id, &cursor));

    let mut failures = Vec::new();
    for case in &all {
        match target.check(case).await {
            Ok(()) => eprintln!("ok    {}", case.name),
            Err(problem) => {
                eprintln!("FAIL  {}: {problem}", case.name);
                failures.push(format!("{} ({} {}): {problem}", case.name, case.method, case.path));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n  {}", failures.len(), all.len(), failures.join("\n  "));
    stack.shutdown().await.expect("the stack stops cleanly");
}
