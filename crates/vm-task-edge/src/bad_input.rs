//! The bad-input table: requests both workers must refuse with a 4xx whose JSON body names the
//! problem. Written once, runtime-free, and iterated twice: natively over the in-memory ports
//! (`tests/bad_input.rs`) and over HTTP against the real workers under `wrangler dev` (the
//! stack's e2e tests), which catches what only the runtime does (body and header conversion,
//! URL normalisation, the dev gateway's forwarding).

use serde_json::{json, Value};
use vm_task_types::Limits;

/// A v7 UUID no task has.
pub const UNKNOWN_ID: &str = "0190b5a4-3b7c-7def-8abc-0123456789ab";

/// Which worker a case is sent to. Over the dev gateway, consumer paths are under `/consumer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worker {
    Api,
    Consumer,
}

/// Which bearer token a case sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    None,
    Client,
    Consumer,
    /// A token no worker accepts.
    Other(&'static str),
}

/// One request and the error it must produce.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub worker: Worker,
    pub method: &'static str,
    /// Path and query as the worker itself serves it (no gateway prefix).
    pub path: String,
    pub token: Token,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Vec<u8>>,
    pub status: u16,
    pub code: &'static str,
    pub field: Option<&'static str>,
    /// Substrings the error message must contain.
    pub needles: Vec<String>,
    /// Response headers that must be present with these values.
    pub expect_headers: Vec<(&'static str, &'static str)>,
}

/// What the table needs from the target: a task that exists, and a genuine list cursor.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub existing_id: String,
    pub genuine_cursor: String,
}

impl Case {
    fn new(
        name: impl Into<String>,
        worker: Worker,
        method: &'static str,
        path: impl Into<String>,
        token: Token,
    ) -> Self {
        Self {
            name: name.into(),
            worker,
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
        Self::new(name, Worker::Api, "GET", path, Token::Client)
    }

    fn consumer(name: impl Into<String>, method: &'static str, path: impl Into<String>) -> Self {
        Self::new(name, Worker::Consumer, method, path, Token::Consumer)
    }

    /// `POST /vm/tasks` with the client token and this JSON body.
    fn submit(name: impl Into<String>, body: Value) -> Self {
        Self::new(name, Worker::Api, "POST", "/vm/tasks", Token::Client).json(&body)
    }

    fn json(self, body: &Value) -> Self {
        self.raw(serde_json::to_vec(body).unwrap_or_default(), "application/json")
    }

    fn raw(mut self, body: impl Into<Vec<u8>>, content_type: &'static str) -> Self {
        self.body = Some(body.into());
        self.header("content-type", content_type)
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
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

fn stop(vm_name: &str) -> Value {
    json!({"type": "stop_vm", "payload": {"vmName": vm_name, "targetServer": "production"}})
}

/// Every route with a task id: `(worker, method, path with {id}, token, body)`.
fn id_routes() -> Vec<(Worker, &'static str, &'static str, Token, Option<Value>)> {
    let claim_id = json!({"claimId": UNKNOWN_ID});
    vec![
        (Worker::Api, "GET", "/vm/tasks/{id}", Token::Client, None),
        (Worker::Api, "DELETE", "/vm/tasks/{id}", Token::Client, None),
        (Worker::Api, "GET", "/vm/tasks/{id}/status", Token::Client, None),
        (
            Worker::Api,
            "PUT",
            "/vm/tasks/{id}/status",
            Token::Consumer,
            Some(json!({"status": "completed", "claimId": UNKNOWN_ID})),
        ),
        (Worker::Consumer, "DELETE", "/tasks/{id}", Token::Consumer, None),
        (Worker::Consumer, "POST", "/tasks/{id}/claim", Token::Consumer, Some(json!({"consumerId": "host-a"}))),
        (Worker::Consumer, "POST", "/tasks/{id}/heartbeat", Token::Consumer, Some(claim_id.clone())),
        (Worker::Consumer, "POST", "/tasks/{id}/release", Token::Consumer, Some(claim_id)),
    ]
}

/// The whole table.
pub fn cases(fixture: &Fixture) -> Vec<Case> {
    let existing_id = fixture.existing_id.as_str();
    let stop_json = serde_json::to_vec(&stop("vm-1")).unwrap_or_default();
    let mut cases = vec![
        // Bodies.
        Case::new("malformed JSON", Worker::Api, "POST", "/vm/tasks", Token::Client)
            .raw(r#"{"type": "stop_vm", "payload": {"vmName": "#, "application/json")
            .expect(400, "malformed_json", None, &["request body is not valid JSON", "EOF"]),
        Case::new("single-quoted JSON", Worker::Api, "POST", "/vm/tasks", Token::Client)
            .raw("{'type': 'stop_vm'}", "application/json")
            .expect(400, "malformed_json", None, &["key must be a string"]),
        Case::new("empty body", Worker::Api, "POST", "/vm/tasks", Token::Client)
            .raw("", "application/json")
            .expect(400, "empty_body", None, &["request body is empty"]),
        Case::new("whitespace body", Worker::Api, "POST", "/vm/tasks", Token::Client)
            .raw(" \n", "application/json")
            .expect(400, "empty_body", None, &["request body is empty"]),
        Case::new("text/plain body", Worker::Api, "POST", "/vm/tasks", Token::Client)
            .raw(stop_json.clone(), "text/plain")
            .expect(415, "unsupported_media_type", None, &["\"text/plain\"", "send application/json"]),
        Case::new("form body", Worker::Api, "POST", "/vm/tasks", Token::Client)
            .raw("type=stop_vm", "application/x-www-form-urlencoded")
            .expect(415, "unsupported_media_type", None, &["application/x-www-form-urlencoded"]),
        Case::new("multipart body", Worker::Api, "POST", "/vm/tasks", Token::Client)
            .raw(stop_json, "multipart/form-data; boundary=x")
            .expect(415, "unsupported_media_type", None, &["multipart/form-data; boundary=x", "send application/json"]),
        Case::submit("unknown operation", json!({"type": "reboot_vm", "payload": {"vmName": "vm-1"}})).expect(
            400,
            "invalid_field",
            Some("type"),
            &["unknown operation \"reboot_vm\"", "launch_vm", "run_command"],
        ),
        Case::submit("operation not a string", json!({"type": 7, "payload": {"vmName": "vm-1"}}))
            .expect(400, "invalid_field", Some("type"), &["must be a string"]),
        Case::submit("missing type", json!({"payload": {"vmName": "vm-1"}}))
            .expect(400, "invalid_field", Some("type"), &["type: is required"]),
        Case::submit("missing payload", json!({"type": "stop_vm"}))
            .expect(400, "invalid_field", Some("payload"), &["payload: is required"]),
        Case::submit("payload not an object", json!({"type": "stop_vm", "payload": "vm-1"}))
            .expect(400, "invalid_field", Some("payload"), &["must be a JSON object"]),
        Case::submit("unknown top-level field", json!({"type": "stop_vm", "payload": {"vmName": "v"}, "priority": 1}))
            .expect(400, "invalid_field", Some("priority"), &["unknown top-level field"]),
        Case::submit(
            "callbackUrl over plain http",
            json!({"type": "stop_vm", "payload": {"vmName": "v"}, "callbackUrl": "http://hooks.example.com/vm"}),
        )
        .expect(400, "invalid_field", Some("callbackUrl"), &["https"]),
        Case::submit(
            "callbackUrl not a URL",
            json!({"type": "stop_vm", "payload": {"vmName": "v"}, "callbackUrl": "hooks.example.com/vm"}),
        )
        .expect(400, "invalid_field", Some("callbackUrl"), &["https://"]),
        Case::submit("callbackUrl not a string", json!({"type": "stop_vm", "payload": {"vmName": "v"}, "callbackUrl": 7}))
            .expect(400, "invalid_field", Some("callbackUrl"), &["must be a string"]),
        Case::submit(
            "callbackUrl with credentials",
            json!({"type": "stop_vm", "payload": {"vmName": "v"}, "callbackUrl": "https://u:p@hooks.example.com/"}),
        )
        .expect(400, "invalid_field", Some("callbackUrl"), &["user info"]),
        Case::submit(
            "callbackUrl with a space",
            json!({"type": "stop_vm", "payload": {"vmName": "v"}, "callbackUrl": "https://hooks.example.com/a b"}),
        )
        .expect(400, "invalid_field", Some("callbackUrl"), &["printable ASCII"]),
        Case::submit("unknown payload field", json!({"type": "stop_vm", "payload": {"vmName": "v", "vmname": "w"}}))
            .expect(400, "invalid_field", Some("payload"), &["unknown field `vmname`", "expected `vmName`"]),
        Case::submit("vmName not a string", json!({"type": "stop_vm", "payload": {"vmName": 3}})).expect(
            400,
            "invalid_field",
            Some("payload"),
            &["invalid type: integer `3`, expected a string"],
        ),
        Case::submit(
            "blocking not a boolean",
            json!({"type": "run_command", "payload": {"vmName": "v", "command": "ls", "blocking": "yes"}}),
        )
        .expect(400, "invalid_field", Some("payload"), &["invalid type: string \"yes\", expected a boolean"]),
        Case::submit("run_command without command", json!({"type": "run_command", "payload": {"vmName": "v"}}))
            .expect(400, "invalid_field", Some("payload"), &["invalid run_command payload: missing field `command`"]),
        Case::submit("blank command", json!({"type": "run_command", "payload": {"vmName": "v", "command": " \n\t"}}))
            .expect(400, "invalid_field", Some("payload.command"), &["must not be empty or only whitespace"]),
        // Names.
        Case::submit("vmName with a slash", stop("a/b")).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["contains '/'"],
        ),
        Case::submit("vmName ../etc", stop("../etc")).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["contains '/'"],
        ),
        Case::submit("vmName with a space", stop("my vm")).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["contains ' '"],
        ),
        Case::submit("vmName with a leading space", stop(" vm")).expect(
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
        Case::submit("empty vmName", stop("")).expect(400, "invalid_field", Some("payload.vmName"), &["must not be empty"]),
        Case::submit("non-ASCII vmName", stop("naïve-vm")).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["contains 'ï'"],
        ),
        Case::submit("emoji vmName", stop("vm-😀")).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["contains '😀'"],
        ),
        Case::get("path vmName with %2F", "/vm/a%2Fb/status").expect(
            400,
            "invalid_field",
            Some("vmName"),
            &["contains '/'"],
        ),
        Case::get("path vmName with %20", "/vm/my%20vm/status").expect(
            400,
            "invalid_field",
            Some("vmName"),
            &["contains ' '"],
        ),
        Case::get("path vmName non-ASCII", "/vm/na%C3%AFve/status").expect(
            400,
            "invalid_field",
            Some("vmName"),
            &["contains 'ï'"],
        ),
        Case::get("path vmName of 64 characters", format!("/vm/{}/status", "v".repeat(64))).expect(
            400,
            "invalid_field",
            Some("vmName"),
            &["at most 63"],
        ),
        Case::get("unknown VM", "/vm/ghost/status").expect(404, "not_found", None, &["VM \"ghost\" is not in the registry"]),
        Case::submit("bad targetServer", json!({"type": "stop_vm", "payload": {"vmName": "v", "targetServer": "prod:1"}}))
            .expect(400, "invalid_field", Some("payload.targetServer"), &["contains ':'"]),
        Case::submit(
            "snapshotId over 128 characters",
            json!({"type": "snapshot_vm", "payload": {"vmName": "vm-1", "snapshotId": "s".repeat(129)}}),
        )
        .expect(400, "invalid_field", Some("payload.snapshotId"), &["at most 128 characters"]),
        Case::submit(
            "empty kernel path",
            json!({"type": "launch_vm", "payload": {"vmName": "vm-1", "vmConfig": {"kernel": ""}, "targetServer": "p"}}),
        )
        .expect(400, "invalid_field", Some("payload.vmConfig.kernel"), &["must not be empty"]),
        Case::submit(
            "relative rootfs path",
            json!({"type": "launch_vm", "payload": {"vmName": "vm-1", "vmConfig": {"rootfs": "images/rootfs.img"}, "targetServer": "p"}}),
        )
        .expect(400, "invalid_field", Some("payload.vmConfig.rootfs"), &["must be an absolute path"]),
        Case::submit(
            "kernel path climbing out with ..",
            json!({"type": "launch_vm", "payload": {"vmName": "vm-1", "vmConfig": {"kernel": "/var/lib/images/../../../etc/shadow"}, "targetServer": "p"}}),
        )
        .expect(400, "invalid_field", Some("payload.vmConfig.kernel"), &["must not contain a '..' segment"]),
        Case::submit(
            "initramfs path with a NUL",
            json!({"type": "launch_vm", "payload": {"vmName": "vm-1", "vmConfig": {"initramfs": "/images/init\u{0}rd"}, "targetServer": "p"}}),
        )
        .expect(400, "invalid_field", Some("payload.vmConfig.initramfs"), &["must not contain NUL bytes"]),
        Case::submit("no targetServer for an unknown VM", json!({"type": "stop_vm", "payload": {"vmName": "ghost"}}))
            .expect(422, "no_target_server", Some("payload.targetServer"), &["payload.targetServer is required", "\"ghost\""]),
        // Sizes.
        Case::submit(
            "command over 16 KiB",
            json!({"type": "run_command", "payload": {"vmName": "v", "command": "x".repeat(Limits::COMMAND_MAX_BYTES + 1), "targetServer": "p"}}),
        )
        .expect(400, "invalid_field", Some("payload.command"), &["must be at most 16384 bytes, got 16385"]),
        // Bytes, not characters: 8193 two-byte characters are 16386 bytes.
        Case::submit(
            "command over 16 KiB in two-byte characters",
            json!({"type": "run_command", "payload": {"vmName": "v", "command": "é".repeat(8193), "targetServer": "p"}}),
        )
        .expect(400, "invalid_field", Some("payload.command"), &["got 16386"]),
        Case::submit(
            "body over 64 KiB",
            json!({"type": "launch_vm", "payload": {"vmName": "v", "vmConfig": {"memory": "m".repeat(Limits::BODY_MAX_BYTES)}}}),
        )
        .expect(413, "payload_too_large", None, &["the limit is 65536 bytes"]),
        Case::consumer("claim body over 64 KiB", "POST", format!("/tasks/{UNKNOWN_ID}/claim"))
            .json(&json!({"consumerId": "c".repeat(Limits::BODY_MAX_BYTES)}))
            .expect(413, "payload_too_large", None, &["the limit is 65536 bytes"]),
        // Query parameters.
        Case::get("limit=0", "/vm/tasks?limit=0").expect(
            400,
            "invalid_field",
            Some("limit"),
            &["must be an integer from 1 to 1000, got \"0\""],
        ),
        Case::consumer("ready wait=31", "GET", "/tasks/ready?server=production&wait=31").expect(
            400,
            "invalid_field",
            Some("wait"),
            &["must be an integer from 0 to 30, got \"31\""],
        ),
        Case::consumer("ready wait without server", "GET", "/tasks/ready?wait=5").expect(
            400,
            "invalid_field",
            Some("server"),
            &["is required with `wait` or `since`"],
        ),
        Case::consumer("ready server with a slash", "GET", "/tasks/ready?server=prod%2F1").expect(
            400,
            "invalid_field",
            Some("server"),
            &["contains '/'"],
        ),
        Case::consumer(
            "ready with 33 servers",
            "GET",
            format!("/tasks/ready?server={}", (0..33).map(|i| format!("s{i}")).collect::<Vec<_>>().join(",")),
        )
        .expect(400, "invalid_field", Some("server"), &["at most 32 servers"]),
        Case::consumer("ready limit=0", "GET", "/tasks/ready?limit=0").expect(
            400,
            "invalid_field",
            Some("limit"),
            &["must be an integer from 1 to 1000, got \"0\""],
        ),
        Case::consumer("all limit=0", "GET", "/tasks/all?limit=0").expect(
            400,
            "invalid_field",
            Some("limit"),
            &["must be an integer from 1 to 1000, got \"0\""],
        ),
        // Idempotency keys.
        Case::submit("Idempotency-Key with a space", stop("vm-1"))
            .header("idempotency-key", "has space")
            .expect(400, "invalid_idempotency_key", Some("Idempotency-Key"), &["1 to 255 visible ASCII characters"]),
        Case::submit("Idempotency-Key with a tab", stop("vm-1"))
            .header("idempotency-key", "tab\tkey")
            .expect(400, "invalid_idempotency_key", Some("Idempotency-Key"), &["1 to 255 visible ASCII characters"]),
        Case::submit("Idempotency-Key of 256 characters", stop("vm-1"))
            .header("idempotency-key", "k".repeat(Limits::IDEMPOTENCY_KEY_MAX + 1))
            .expect(400, "invalid_idempotency_key", Some("Idempotency-Key"), &["1 to 255 visible ASCII characters"]),
        Case::submit("empty Idempotency-Key", stop("vm-1"))
            .header("idempotency-key", "")
            .expect(400, "invalid_idempotency_key", Some("Idempotency-Key"), &["1 to 255 visible ASCII characters"]),
        Case::submit("non-ASCII Idempotency-Key", stop("vm-1")).header("idempotency-key", "ключ").expect(
            400,
            "invalid_idempotency_key",
            Some("Idempotency-Key"),
            &["Idempotency-Key must be 1 to 255 visible ASCII characters"],
        ),
        // Daemon bodies.
        Case::consumer("claim without consumerId", "POST", format!("/tasks/{existing_id}/claim"))
            .json(&json!({"leaseSeconds": 60}))
            .expect(400, "invalid_body", None, &["missing field `consumerId`"]),
        Case::consumer("claim with a bad consumerId", "POST", format!("/tasks/{existing_id}/claim"))
            .json(&json!({"consumerId": "a/b"}))
            .expect(400, "invalid_field", Some("consumerId"), &["contains '/'"]),
        Case::consumer("claim with a negative lease", "POST", format!("/tasks/{existing_id}/claim"))
            .json(&json!({"consumerId": "h", "leaseSeconds": -1}))
            .expect(400, "invalid_body", None, &["invalid value: integer `-1`, expected u64"]),
        Case::consumer("heartbeat without claimId", "POST", format!("/tasks/{existing_id}/heartbeat"))
            .json(&json!({"leaseSeconds": 60}))
            .expect(400, "invalid_body", None, &["missing field `claimId`"]),
        Case::consumer("release without claimId", "POST", format!("/tasks/{existing_id}/release"))
            .json(&json!({"leaseSeconds": 60}))
            .expect(400, "invalid_body", None, &["missing field `claimId`"]),
        Case::new("report without claimId", Worker::Api, "PUT", format!("/vm/tasks/{existing_id}/status"), Token::Consumer)
            .json(&json!({"status": "completed"}))
            .expect(400, "invalid_body", None, &["missing field `claimId`"]),
        Case::new("report of an unknown status", Worker::Api, "PUT", format!("/vm/tasks/{existing_id}/status"), Token::Consumer)
            .json(&json!({"status": "done", "claimId": UNKNOWN_ID}))
            .expect(400, "invalid_body", None, &["unknown variant `done`"]),
        // serde names the problem, but not the field at fault (`claimId`).
        Case::new("report with a claimId that is not a UUID", Worker::Api, "PUT", format!("/vm/tasks/{existing_id}/status"), Token::Consumer)
            .json(&json!({"status": "completed", "claimId": "claim-1"}))
            .expect(400, "invalid_body", None, &["invalid request body: UUID parsing failed"]),
        Case::new("report without a claim", Worker::Api, "PUT", format!("/vm/tasks/{existing_id}/status"), Token::Consumer)
            .json(&json!({"status": "completed", "claimId": UNKNOWN_ID}))
            .expect(409, "conflict", None, &["does not hold task"]),
        // Tokens.
        Case::new("no token", Worker::Api, "GET", "/vm/tasks", Token::None)
            .expect(401, "unauthorized", None, &["missing Authorization header"])
            .expect_header("www-authenticate", "Bearer"),
        Case::new("wrong token", Worker::Api, "GET", "/vm/tasks", Token::Other("guess"))
            .expect(401, "unauthorized", None, &["invalid client token"])
            .expect_header("www-authenticate", "Bearer"),
        Case::new("Basic credentials", Worker::Api, "GET", "/vm/tasks", Token::None)
            .header("authorization", "Basic YTpi")
            .expect(401, "unauthorized", None, &["Bearer scheme"])
            .expect_header("www-authenticate", "Bearer"),
        Case::new("client token on the consumer worker", Worker::Consumer, "GET", "/tasks/ready", Token::Client)
            .expect(401, "unauthorized", None, &["invalid consumer token"])
            .expect_header("www-authenticate", "Bearer"),
        Case::new("no token on the sweep", Worker::Consumer, "POST", "/admin/sweep", Token::None)
            .expect(401, "unauthorized", None, &["missing Authorization header"])
            .expect_header("www-authenticate", "Bearer"),
        Case::new("client token on a status report", Worker::Api, "PUT", format!("/vm/tasks/{existing_id}/status"), Token::Client)
            .json(&json!({"status": "completed", "claimId": UNKNOWN_ID}))
            .expect(401, "unauthorized", None, &["invalid consumer token"])
            .expect_header("www-authenticate", "Bearer"),
        Case::new("consumer token on a submission", Worker::Api, "POST", "/vm/tasks", Token::Consumer)
            .json(&stop("vm-1"))
            .expect(401, "unauthorized", None, &["invalid client token"])
            .expect_header("www-authenticate", "Bearer"),
        // Routes and methods.
        Case::get("unknown path", "/vm/tasks/x/y/z").expect(404, "not_found", None, &["no route for GET /vm/tasks/x/y/z"]),
        Case::consumer("unknown consumer path", "GET", "/nope").expect(404, "not_found", None, &["no route for GET /nope"]),
        Case::new("PATCH on a task", Worker::Api, "PATCH", format!("/vm/tasks/{UNKNOWN_ID}"), Token::Client)
            .expect(405, "method_not_allowed", None, &["method PATCH is not allowed", "allowed: GET, DELETE"])
            .expect_header("allow", "GET, DELETE"),
        Case::consumer("GET on a claim", "GET", format!("/tasks/{UNKNOWN_ID}/claim"))
            .expect(405, "method_not_allowed", None, &["allowed: POST"])
            .expect_header("allow", "POST"),
        Case::new("TRACE on the task list", Worker::Api, "TRACE", "/vm/tasks", Token::Client)
            .expect(405, "method_not_allowed", None, &["method TRACE is not allowed", "allowed: POST, GET"]),
        Case::get("v4 UUID", "/vm/tasks/3f2b7c1e-9a4d-4e2b-8c1f-5d6e7f8a9b0c").expect(404, "not_found", None, &["not found"]),
    ];
    for bad in ["61", "-1", "1.5", "soon", "99999999999999999999"] {
        for path in [format!("/vm/tasks/{existing_id}"), format!("/vm/tasks/{existing_id}/status")] {
            let expected = format!("must be whole seconds from 0 to 60, got \"{bad}\"");
            cases.push(Case::get(format!("{path} wait={bad}"), format!("{path}?wait={bad}")).expect(
                400,
                "invalid_field",
                Some("wait"),
                &[&expected],
            ));
        }
    }
    for bad in ["1001", "-5", "ten"] {
        let expected = format!("must be an integer from 1 to 1000, got \"{bad}\"");
        cases.push(Case::get(format!("limit={bad}"), format!("/vm/tasks?limit={bad}")).expect(
            400,
            "invalid_field",
            Some("limit"),
            &[&expected],
        ));
    }
    for body in [json!([]), json!("stop_vm"), json!(3)] {
        cases.push(Case::submit(format!("body {body}"), body).expect(
            400,
            "invalid_field",
            Some("body"),
            &["must be a JSON object with `type` and `payload`"],
        ));
    }
    for name in ["..", ".", ".hidden", "-rf"] {
        cases.push(Case::submit(format!("vmName {name}"), stop(name)).expect(
            400,
            "invalid_field",
            Some("payload.vmName"),
            &["must not start with '.' or '-'"],
        ));
    }
    for kind in vm_task_types::OperationKind::ALL {
        let payload = if kind.as_str() == "run_command" { json!({"command": "ls"}) } else { json!({}) };
        let expected = format!("invalid {kind} payload: missing field `vmName`");
        cases.push(
            Case::submit(format!("{kind} without vmName"), json!({"type": kind.as_str(), "payload": payload})).expect(
                400,
                "invalid_field",
                Some("payload"),
                &[&expected],
            ),
        );
    }
    // Every id route: a non-UUID is a 400 naming `id`, an unknown UUID a 404.
    for (worker, method, path, token, body) in id_routes() {
        for bad in ["not-a-uuid", "0190b5a43b7c7def8abc0123456789ab", "0190b5a4-3b7c-7def-8abc-0123456789ag"] {
            let mut case =
                Case::new(format!("{method} {path} with id {bad}"), worker, method, path.replace("{id}", bad), token);
            if let Some(body) = &body {
                case = case.json(body);
            }
            let expected = format!("id: \"{bad}\" is not a UUID");
            cases.push(case.expect(400, "invalid_field", Some("id"), &[&expected, bad]));
        }
        let mut case = Case::new(
            format!("{method} {path} with an unknown id"),
            worker,
            method,
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
    let genuine = fixture.genuine_cursor.as_str();
    let tampered = {
        let mut chars: Vec<char> = genuine.chars().collect();
        if let Some(last) = chars.last_mut() {
            *last = if *last == '0' { '1' } else { '0' };
        }
        chars.into_iter().collect::<String>()
    };
    let other_key = crate::auth::sign_cursor(b"not-the-secret", "task:");
    for forged in [
        "task:000".to_owned(),
        "abc.def".to_owned(),
        tampered,
        format!("00{genuine}"),
        genuine.replace('.', ""),
        other_key,
    ] {
        cases.push(Case::get(format!("forged cursor {forged}"), format!("/vm/tasks?cursor={forged}")).expect(
            400,
            "invalid_cursor",
            Some("cursor"),
            &["cursor is not one this API issued"],
        ));
    }
    cases
}
