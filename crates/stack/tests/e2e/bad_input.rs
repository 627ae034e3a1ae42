//! Bad input to the real workers under `wrangler dev`, over HTTP through the dev gateway: every
//! case of the edge's bad-input table (`vm_task_edge::bad_input`, which the native tests in
//! `crates/vm-task-edge/tests/bad_input.rs` iterate too) must be the same 4xx with a JSON
//! `ErrorBody` naming the problem. Catches what only the runtime does: body and header
//! conversion by workers-rs, URL normalisation, the gateway's forwarding.
//!
//! One stack serves every case; the test runs them all and then lists every failure.

use std::time::Duration;

use reqwest::{header::HeaderValue, Method};
use serde_json::{json, Value};
use stack::{Stack, StackOptions};
use vm_task_edge::bad_input::{self, Case, Fixture, Token, Worker};
use vm_task_types::wire::ErrorBody;

struct Target<'a> {
    http: reqwest::Client,
    stack: &'a Stack,
}

impl Target<'_> {
    /// Sends a table case: consumer paths go under the gateway's `/consumer`.
    async fn send(&self, case: &Case) -> Result<reqwest::Response, String> {
        let prefix = match case.worker {
            Worker::Api => "",
            Worker::Consumer => "/consumer",
        };
        let url = format!("{}{prefix}{}", self.stack.gateway_url(), case.path);
        let method = Method::from_bytes(case.method.as_bytes()).map_err(|e| format!("method: {e}"))?;
        let mut request = self.http.request(method, &url);
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
            let value = HeaderValue::from_bytes(value.as_bytes()).map_err(|e| format!("header {name}: {e}"))?;
            request = request.header(*name, value);
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

    /// Sends a client request that must succeed with `status` and returns its JSON body.
    async fn ok(&self, method: Method, path: &str, body: Option<&Value>, key: Option<&str>, status: u16) -> Value {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.stack.gateway_url()))
            .bearer_auth(self.stack.client_token());
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{path}: {e:#}"));
        let got = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(got, status, "{path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"))
    }
}

fn stop(vm_name: &str) -> Value {
    json!({"type": "stop_vm", "payload": {"vmName": vm_name, "targetServer": "production"}})
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
    let first = target.ok(Method::POST, "/vm/tasks", Some(&stop("vm-1")), None, 202).await;
    target.ok(Method::POST, "/vm/tasks", Some(&stop("vm-2")), None, 202).await;
    let existing_id = first["taskId"].as_str().expect("a taskId").to_owned();
    let page = target.ok(Method::GET, "/vm/tasks?limit=1", None, None, 200).await;
    let genuine_cursor = page["cursor"].as_str().expect("a cursor to the second page").to_owned();
    let second = target.ok(Method::GET, &format!("/vm/tasks?limit=1&cursor={genuine_cursor}"), None, None, 200).await;
    assert_eq!(second["count"], 1, "{second}");

    // The same Idempotency-Key: the same body replays the task, another body is refused.
    let created = target.ok(Method::POST, "/vm/tasks", Some(&stop("vm-3")), Some("order-42"), 202).await;
    let replayed = target.ok(Method::POST, "/vm/tasks", Some(&stop("vm-3")), Some("order-42"), 200).await;
    assert_eq!(replayed["taskId"], created["taskId"], "a replay returns the first task");
    let response = target
        .http
        .post(format!("{}/vm/tasks", stack.gateway_url()))
        .bearer_auth(stack.client_token())
        .header("idempotency-key", "order-42")
        .json(&stop("vm-4"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status().as_u16(), 422);
    let reused: ErrorBody = response.json().await.expect("an ErrorBody");
    assert_eq!(reused.code, "idempotency_key_reused");
    assert!(reused.error.contains(created["taskId"].as_str().unwrap_or_default()), "{}", reused.error);

    let all = bad_input::cases(&Fixture { existing_id, genuine_cursor });
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
