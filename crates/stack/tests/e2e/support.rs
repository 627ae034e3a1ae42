//! Helpers shared by the end-to-end test modules: starting a stack, reading the simulator,
//! waiting for a status, submitting per-VM chains of tasks.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stack::{ApiClient, Stack, StackOptions};
use uuid::Uuid;
use vm_task_types::TaskStatus;

/// Starts a stack; `BELL_CHECK_MS` is lowered so idle long polls react fast in tests.
pub async fn start(opts: StackOptions) -> Stack {
    Stack::start(opts.worker_var("BELL_CHECK_MS", 100)).await.expect("the stack starts")
}

/// A call to the simulator's control API (`/_sim/...`); its JSON answer, or null.
pub async fn sim(stack: &Stack, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let url = format!("{}{path}", stack.arrakis_url().trim_end_matches('/'));
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("simulator control").json().await.unwrap_or(Value::Null)
}

/// The simulator's request log: every Arrakis call it answered (or dropped).
pub async fn sim_log(stack: &Stack) -> Vec<Value> {
    sim(stack, reqwest::Method::GET, "/_sim/log", None).await["entries"].as_array().cloned().unwrap_or_default()
}

/// Polls until the task has status `want` (within a minute).
pub async fn wait_for_status(stack: &Stack, id: Uuid, want: TaskStatus) {
    let api = stack.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.status(id).await.unwrap().status != want {
        assert!(Instant::now() < deadline, "task {id} never became {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// For each of `vms` VMs named `{prefix}-{n}`: a launch on `production`, then `commands` `echo`
/// commands, each submitted after the previous one was accepted. The ids in submission order.
pub async fn submit_chains(api: &ApiClient, prefix: &str, vms: usize, commands: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for vm in 0..vms {
        let name = format!("{prefix}-{vm}");
        let launch = json!({"vmName": name, "targetServer": "production"});
        ids.push(api.submit_op("launch_vm", launch).await.unwrap().task_id);
        for step in 0..commands {
            let cmd = json!({"vmName": name, "command": format!("echo {step}")});
            ids.push(api.submit_op("run_command", cmd).await.unwrap().task_id);
        }
    }
    ids
}
