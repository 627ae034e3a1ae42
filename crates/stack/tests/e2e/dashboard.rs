//! The operator dashboard (`GET /dashboard`) in a real headless Chromium (Debian's `chromium`,
//! installed by `cargo xtask setup`), driven over the DevTools protocol: the token gate, a
//! launch submitted through the form and followed to `completed` without a reload, its
//! timeline, a field error as the API answers it, a cancel of a task aimed at a server no
//! daemon serves, and the VM and host pages. The page runs under its own strict CSP, so a
//! script the policy blocked would fail every step here. Screenshots of each page go to
//! `target/dashboard-screenshots/`.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use stack::{repo_root, StackOptions};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
};
use tokio_tungstenite::{tungstenite::Message, MaybeTlsStream, WebSocketStream};

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";

/// One headless Chromium with one page, spoken to over its DevTools WebSocket.
struct Browser {
    _process: Child,
    page: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: PathBuf,
}

impl Browser {
    async fn launch() -> Browser {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: `cargo xtask setup` installs Debian's chromium (as root)"
        );
        let profile = std::env::temp_dir().join(format!("dashboard-chromium-{}", uuid::Uuid::new_v4().simple()));
        let mut process = Command::new(CHROMIUM)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
            .args(["--disable-extensions", "--disable-background-networking", "--remote-debugging-port=0"])
            .arg("--window-size=1280,900")
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        // Chromium prints `DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID`.
        let mut lines = BufReader::new(process.stderr.take().expect("stderr")).lines();
        let browser_ws = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("chromium stderr") {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("chromium exited before listening for DevTools");
        })
        .await
        .expect("chromium listens for DevTools within a minute");
        // Keep draining stderr so Chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let port = browser_ws.trim_start_matches("ws://").split(['/', ':']).nth(1).expect("port").to_owned();
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .expect("DevTools target list")
            .json()
            .await
            .expect("target list is JSON");
        let page_ws = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let (page, _) = tokio_tungstenite::connect_async(page_ws).await.expect("DevTools page socket");
        Browser { _process: process, page, next_id: 0, _profile: profile }
    }

    /// Sends one DevTools command and returns its `result` (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let text = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::Text(text.into())).await.expect("DevTools send");
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.page.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no DevTools answer in 30 s"))
                .expect("DevTools socket open")
                .expect("DevTools message");
            let Message::Text(text) = message else { continue };
            let value: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method} failed: {value}");
                return value["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its JSON value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call("Runtime.evaluate", json!({"expression": expression, "awaitPromise": true, "returnByValue": true}))
            .await;
        assert!(result.get("exceptionDetails").is_none(), "`{expression}` threw: {}", result["exceptionDetails"]);
        result["result"]["value"].clone()
    }

    /// Polls `condition` (a JS expression) until it is true, within `within`.
    async fn wait_for(&mut self, condition: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.eval(&format!("!!({condition})")).await == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let text = self.eval("document.querySelector('main').innerText").await;
                panic!("never true within {within:?}: {condition}\npage text:\n{}", text.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// Saves a PNG of the viewport as `target/dashboard-screenshots/{name}.png`.
    async fn screenshot(&mut self, name: &str) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        let dir = repo_root().join("target/dashboard-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("screenshot written");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}

/// A JS string literal.
fn js(text: &str) -> String {
    serde_json::to_string(text).expect("string")
}

#[tokio::test]
#[ignore = "needs the local stack: cargo xtask e2e"]
async fn an_operator_submits_follows_and_cancels_tasks_in_the_dashboard() {
    let stack = start(StackOptions::default()).await;
    let api = stack.client();
    let page_url = format!("{}/dashboard", stack.api_url());

    // The page is open and self-contained, under a policy that allows only its own blocks.
    let served = reqwest::get(&page_url).await.expect("GET /dashboard");
    assert_eq!(served.status(), 200);
    let csp = served.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'sha256-") && !csp.contains("unsafe"), "{csp}");

    let mut browser = Browser::launch().await;
    browser.navigate(&page_url).await;
    browser.wait_for("document.querySelector('#token')", Duration::from_secs(20)).await;
    browser.screenshot("1-token").await;

    // A wrong token is refused with the API's own 401 message; the right one opens the tasks.
    let fill = |selector: &str, value: &str| {
        format!(
            "(() => {{ const e = document.querySelector({}); e.value = {}; e.dispatchEvent(new Event('input')); }})()",
            js(selector),
            js(value)
        )
    };
    browser.eval(&fill("#token", "not-a-token")).await;
    browser.eval("document.querySelector('#token-form').requestSubmit()").await;
    browser
        .wait_for("document.querySelector('[role=alert]')?.innerText.includes('401')", Duration::from_secs(20))
        .await;
    browser.eval(&fill("#token", stack.client_token())).await;
    browser.eval("document.querySelector('#token-form').requestSubmit()").await;
    browser.wait_for("document.querySelector('#tasks .empty, #task-table')", Duration::from_secs(20)).await;
    assert_eq!(
        browser.eval("sessionStorage.getItem('vmtq.token')").await,
        json!(stack.client_token()),
        "the token is kept in the tab's session storage"
    );
    assert!(!browser.eval("location.href").await.as_str().unwrap().contains(stack.client_token()));

    // A bad VM name comes back as the API's field error, marked on the field.
    browser.eval("location.hash = '#/submit'").await;
    browser.wait_for("document.querySelector('#submit-form')", Duration::from_secs(10)).await;
    browser.eval(&fill("[name=vmName]", "../etc")).await;
    browser.eval("document.querySelector('#submit-form').requestSubmit()").await;
    browser.wait_for("document.querySelector('#submit-result [role=alert]')", Duration::from_secs(20)).await;
    let shown = browser.eval("document.querySelector('#submit-result').innerText").await;
    assert!(shown.as_str().unwrap().contains("400") && shown.as_str().unwrap().contains("payload.vmName"), "{shown}");
    assert_eq!(
        browser.eval("document.querySelector('[name=vmName]').getAttribute('aria-invalid')").await,
        json!("true")
    );
    browser.screenshot("2-submit-error").await;

    // A launch through the form, followed to `completed` on the task page without a reload.
    browser.eval("window.__sameDocument = true").await;
    browser.eval(&fill("[name=vmName]", "dash-vm")).await;
    browser.eval(&fill("[name=targetServer]", "production")).await;
    browser.eval("document.querySelector('#submit-form').requestSubmit()").await;
    browser.wait_for("document.querySelector('#created-task')", Duration::from_secs(20)).await;
    let created = browser.eval("document.querySelector('#created-task').getAttribute('href')").await;
    let launch_id = created.as_str().unwrap().trim_start_matches("#/task/").to_owned();
    browser.eval("document.querySelector('#created-task').click()").await;
    browser.wait_for("document.querySelector('#task-status')", Duration::from_secs(20)).await;
    browser
        .wait_for(
            "document.querySelector('#task-status [data-status]').dataset.status === 'completed'",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(browser.eval("window.__sameDocument").await, json!(true), "the page never reloaded");
    let events = browser.eval("[...document.querySelectorAll('#timeline li strong')].map(e => e.innerText)").await;
    let events: Vec<&str> = events.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(events.first(), Some(&"created"), "{events:?}");
    assert_eq!(events.last(), Some(&"completed"), "{events:?}");
    assert!(events.contains(&"claimed"), "{events:?}");
    let gaps = browser.eval("document.querySelectorAll('#timeline .gap').length").await;
    assert_eq!(gaps, json!(events.len() - 1), "a duration between every two steps");
    let task = api.task(launch_id.parse().unwrap()).await.unwrap();
    assert_eq!(task.status, vm_task_types::TaskStatus::Completed, "the API agrees");
    browser.screenshot("3-task-timeline").await;

    // A task aimed at a server nobody serves stays pending; the dashboard cancels it (200).
    let orphan = api.submit_op("stop_vm", json!({"vmName": "dash-orphan", "targetServer": "nowhere"})).await.unwrap();
    browser.eval("location.hash = '#/tasks'").await;
    browser
        .wait_for(&format!("document.querySelector('[data-task=\"{}\"]')", orphan.task_id), Duration::from_secs(20))
        .await;
    browser
        .wait_for(
            &format!("document.querySelector('[data-task=\"{launch_id}\"] [data-status=completed]')"),
            Duration::from_secs(20),
        )
        .await;
    browser.screenshot("4-tasks").await;
    // The status filter narrows the list to the pending orphan.
    browser.eval("location.hash = '#/tasks?status=pending'").await;
    browser
        .wait_for(
            &format!(
                "document.querySelector('[data-task=\"{}\"]') && !document.querySelector('[data-task=\"{launch_id}\"]')",
                orphan.task_id
            ),
            Duration::from_secs(20),
        )
        .await;
    browser.eval(&format!("location.hash = '#/task/{}'", orphan.task_id)).await;
    browser.wait_for("document.querySelector('#cancel')", Duration::from_secs(20)).await;
    browser.eval("document.querySelector('#cancel').click()").await;
    browser
        .wait_for(
            "document.querySelector('#cancel-result')?.innerText.includes('answered 200')",
            Duration::from_secs(20),
        )
        .await;
    browser
        .wait_for(
            "document.querySelector('#task-status [data-status]').dataset.status === 'cancelled'",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(api.status(orphan.task_id).await.unwrap().status, vm_task_types::TaskStatus::Cancelled);
    browser.screenshot("5-cancelled").await;

    // VMs grouped by server, with the launched VM's state and its last task.
    browser.eval("location.hash = '#/vms'").await;
    browser
        .wait_for("document.querySelector('[data-vm=\"dash-vm\"] [data-status=running]')", Duration::from_secs(20))
        .await;
    browser.screenshot("6-vms").await;
    browser.eval("location.hash = '#/vm/dash-vm'").await;
    browser
        .wait_for(
            &format!("document.querySelector('#task-table [data-task=\"{launch_id}\"]')"),
            Duration::from_secs(20),
        )
        .await;

    // Hosts: the daemon has reported to the host registry and shows as live (in both dispatch
    // modes: the durable mode's daemon sends its report on a full listing).
    browser.eval("location.hash = '#/hosts'").await;
    browser
        .wait_for("document.querySelector('[data-host=\"production\"] [data-status=live]')", Duration::from_secs(30))
        .await;
    browser.screenshot("7-hosts").await;

    // Back goes to the previous view: routing is by hash.
    browser.eval("history.back()").await;
    browser.wait_for("location.hash.startsWith('#/vm/')", Duration::from_secs(10)).await;
}
