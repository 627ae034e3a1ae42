//! The Arrakis REST surface: gorilla/mux-style routing (301 for unclean paths, text 404,
//! empty 405), the per-request pipeline (latency, hang, fault stage, log) and one handler per
//! endpoint with the real server's validation order and messages.
//!
//! Routing works on the percent-decoded path, as mux does by default, so `%2F` in a name
//! splits it into two segments and never reaches a handler, exactly like the real server.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde::Serialize;

use crate::config::Op;
use crate::fs::{resolve, FsError, SERVER_FILES};
use crate::gojson::{self, FieldType};
use crate::shell::{self, Program, Step};
use crate::sim::{Failure, LogEntry, Simulator};
use crate::world::{VmStatus, WireVmInfo};

/// Bodies are read whole; nothing legitimate comes near this.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Go's client error when the agent answers nothing within the proxy timeout.
const CLIENT_TIMEOUT: &str = "context deadline exceeded (Client.Timeout exceeded while awaiting headers)";
/// Characters Go's `url.URL.EscapedPath` escapes in a redirect's path.
const PATH_ESCAPE: &AsciiSet =
    &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'%').add(b'<').add(b'>').add(b'?').add(b'`').add(b'{').add(b'}');

/// Marks a response whose connection must be closed without sending it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropConnection;

/// What the simulator answers, before it becomes an HTTP response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// A handler's JSON (success or error body).
    Json { status: u16, body: String },
    /// mux's unknown-path answer.
    NotFound,
    /// mux's known-path-wrong-method answer.
    MethodNotAllowed,
    /// mux's redirect to the cleaned path.
    Redirect(String),
    /// No response at all.
    Drop,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorMessage<'a>,
}

#[derive(Serialize)]
struct ErrorMessage<'a> {
    message: &'a str,
}

#[derive(Serialize)]
struct Success {
    success: bool,
}

impl Reply {
    fn ok<T: Serialize>(value: &T) -> Self {
        Reply::Json { status: 200, body: gojson::go_encode(value) }
    }

    fn error(status: u16, message: &str) -> Self {
        Reply::Json { status, body: gojson::go_encode(&ErrorBody { error: ErrorMessage { message } }) }
    }

    fn success() -> Self {
        Reply::ok(&Success { success: true })
    }

    fn status(&self) -> Option<u16> {
        match self {
            Reply::Json { status, .. } => Some(*status),
            Reply::NotFound => Some(404),
            Reply::MethodNotAllowed => Some(405),
            Reply::Redirect(_) => Some(301),
            Reply::Drop => None,
        }
    }

    fn from_failure(failure: Failure) -> Self {
        match failure {
            Failure::Respond { status, message } => Reply::error(status, &message),
            Failure::Drop => Reply::Drop,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        match self {
            Reply::Json { status, body } => {
                let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
            Reply::NotFound => (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
                "404 page not found\n",
            )
                .into_response(),
            Reply::MethodNotAllowed => {
                let mut resp = Response::new(Body::empty());
                *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                resp
            }
            Reply::Redirect(location) => {
                let mut resp = Response::new(Body::empty());
                *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
                if let Ok(value) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, value);
                }
                resp
            }
            Reply::Drop => {
                // Served by our accept loop this closes the connection; under a plain axum
                // server it degrades to an empty 500.
                let mut resp = Response::new(Body::empty());
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                resp.extensions_mut().insert(DropConnection);
                resp
            }
        }
    }
}

/// Records a request in the log when finished, or as cancelled if the handler is dropped
/// because the client went away.
struct LogGuard {
    sim: Simulator,
    entry: Option<LogEntry>,
}

impl LogGuard {
    fn finish(mut self, reply: Reply) -> Reply {
        if let Some(mut entry) = self.entry.take() {
            entry.end_ms = self.sim.now_ms();
            entry.status = reply.status();
            entry.dropped = reply == Reply::Drop;
            self.sim.record(entry);
        }
        reply
    }

    fn set(&mut self, f: impl FnOnce(&mut LogEntry)) {
        if let Some(entry) = self.entry.as_mut() {
            f(entry);
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(mut entry) = self.entry.take() {
            entry.end_ms = self.sim.now_ms();
            entry.cancelled = true;
            self.sim.record(entry);
        }
    }
}

/// The router fallback: every request outside `/_sim/`.
pub(crate) async fn entry(State(sim): State<Simulator>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // A body that cannot be read is as good as empty: decoding then fails with EOF.
    let body = axum::body::to_bytes(body, MAX_BODY).await.unwrap_or_default();
    handle(&sim, &parts.method, &parts.uri, body).await.into_response()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Health,
    Vms,
    Vm(String),
    Snapshots(String),
    Cmd(String),
    Files(String),
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        let name = |s: &str| (!s.is_empty()).then(|| s.to_string());
        match segments.as_slice() {
            ["v1", "health"] => Some(Route::Health),
            ["v1", "vms"] => Some(Route::Vms),
            ["v1", "vms", n] => name(n).map(Route::Vm),
            ["v1", "vms", n, "snapshots"] => name(n).map(Route::Snapshots),
            ["v1", "vms", n, "cmd"] => name(n).map(Route::Cmd),
            ["v1", "vms", n, "files"] => name(n).map(Route::Files),
            _ => None,
        }
    }

    fn vm_name(&self) -> Option<&str> {
        match self {
            Route::Vm(n) | Route::Snapshots(n) | Route::Cmd(n) | Route::Files(n) => Some(n),
            Route::Health | Route::Vms => None,
        }
    }

    /// The operation for `method` on this route; `None` is mux's 405.
    fn op(&self, method: &Method, body: &[u8]) -> Option<Op> {
        Some(match (self, method.as_str()) {
            (Route::Health, "GET") => Op::Health,
            (Route::Vms, "GET") => Op::List,
            (Route::Vms, "POST") => Op::Start,
            (Route::Vms, "DELETE") => Op::DeleteAll,
            (Route::Vm(_), "GET") => Op::Get,
            (Route::Vm(_), "DELETE") => Op::Delete,
            (Route::Vm(_), "PATCH") => match patch_status(body).as_deref() {
                Ok("stopped") => Op::Stop,
                Ok("paused") => Op::Pause,
                Ok("resume") => Op::Resume,
                _ => Op::Patch,
            },
            (Route::Snapshots(_), "POST") => Op::Snapshot,
            (Route::Cmd(_), "POST") => Op::Cmd,
            (Route::Files(_), "POST") => Op::Upload,
            (Route::Files(_), "GET") => Op::Download,
            _ => return None,
        })
    }
}

/// mux's `cleanPath`: `path.Clean`, keeping one trailing slash.
fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return "/".into();
    }
    let rooted = if p.starts_with('/') { p.to_string() } else { format!("/{p}") };
    let mut cleaned = resolve("/", &rooted);
    if rooted.ends_with('/') && cleaned != "/" {
        cleaned.push('/');
    }
    cleaned
}

async fn handle(sim: &Simulator, method: &Method, uri: &Uri, body: Bytes) -> Reply {
    let raw_path = uri.path();
    let decoded = percent_decode_str(raw_path).decode_utf8_lossy().into_owned();
    let start_ms = sim.now_ms();
    let mut guard = LogGuard {
        sim: sim.clone(),
        entry: Some(LogEntry {
            seq: sim.next_seq(),
            start_ms,
            end_ms: start_ms,
            method: method.to_string(),
            path: raw_path.to_string(),
            query: uri.query().map(str::to_string),
            op: None,
            vm_name: None,
            status: None,
            fault_injected: false,
            dropped: false,
            cancelled: false,
            request_body: truncate(&String::from_utf8_lossy(&body), 4096),
        }),
    };
    let cleaned = clean_path(&decoded);
    if cleaned != decoded {
        let mut location = utf8_percent_encode(&cleaned, PATH_ESCAPE).to_string();
        if let Some(q) = uri.query() {
            location.push('?');
            location.push_str(q);
        }
        return guard.finish(Reply::Redirect(location));
    }
    let Some(route) = Route::parse(&decoded) else {
        return guard.finish(Reply::NotFound);
    };
    let Some(op) = route.op(method, &body) else {
        return guard.finish(Reply::MethodNotAllowed);
    };
    let vm_name = match (&route, op) {
        (Route::Vms, Op::Start) => start_name(&body),
        _ => route.vm_name().map(str::to_string),
    };
    guard.set(|e| {
        e.op = Some(op);
        e.vm_name = vm_name;
    });

    let config = sim.config();
    if !matches!(op, Op::Start | Op::Snapshot) {
        sleep(config.latency_of(op)).await;
    }
    if config.hang_ops.contains(&op) {
        sleep(config.hang_for).await;
    }
    if let Some(failure) = sim.take_fault(op) {
        guard.set(|e| e.fault_injected = true);
        return guard.finish(Reply::from_failure(failure));
    }

    let name = route.vm_name().unwrap_or_default();
    let reply = match op {
        Op::Health => health(),
        Op::List => list(sim),
        Op::Start => {
            let (reply, zombie) = start(sim, &body).await;
            if zombie {
                guard.set(|e| e.fault_injected = true);
            }
            reply
        }
        Op::Get => match sim.world().get(name) {
            Ok(vm) => Reply::ok(&vm.wire()),
            Err(message) => Reply::error(500, &message),
        },
        Op::Stop | Op::Pause | Op::Resume | Op::Patch => patch(sim, name, &body),
        Op::Delete => match sim.world().delete(name) {
            Ok(()) => Reply::success(),
            Err(message) => Reply::error(500, &message),
        },
        Op::DeleteAll => {
            sim.world().delete_all();
            Reply::success()
        }
        Op::Snapshot => snapshot(sim, name, &body).await,
        Op::Cmd => cmd(sim, name, &body).await,
        Op::Upload => upload(sim, name, &body).await,
        Op::Download => download(sim, name, uri.query().unwrap_or_default()).await,
    };
    guard.finish(reply)
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn invalid_format(e: &str) -> Reply {
    Reply::error(400, &format!("Invalid request format: {e}"))
}

fn health() -> Reply {
    #[derive(Serialize)]
    struct Health {
        status: &'static str,
        timestamp: String,
    }
    Reply::ok(&Health { status: "healthy", timestamp: rfc3339_now() })
}

/// Current UTC time as RFC 3339 to the second, like Go's `time.RFC3339` on a UTC time.
fn rfc3339_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    vm_task_types::Timestamp(ms).to_rfc3339_secs()
}

fn list(sim: &Simulator) -> Reply {
    #[derive(Serialize)]
    struct List {
        // Go omits a nil slice, so zero VMs give `{}`.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        vms: Vec<WireVmInfo>,
    }
    let world = sim.world();
    let mut vms: Vec<WireVmInfo> = world.vms.values().map(|vm| vm.wire()).collect();
    vms.sort_by(|a, b| a.vm_name.cmp(&b.vm_name));
    let mut control = sim.control();
    if control.config.shuffle_list {
        // Fisher–Yates with the list PRNG: Go's map order is random on every call.
        for i in (1..vms.len()).rev() {
            let j = (control.list_rng.next_u64() % (i as u64 + 1)) as usize;
            vms.swap(i, j);
        }
    }
    Reply::ok(&List { vms })
}

const START_FIELDS: &[gojson::Field] = &[
    ("vmName", FieldType::String),
    ("kernel", FieldType::String),
    ("initramfs", FieldType::String),
    ("rootfs", FieldType::String),
    ("entryPoint", FieldType::String),
    ("snapshotId", FieldType::String),
];

fn start_name(body: &[u8]) -> Option<String> {
    let value = gojson::decode_first(body).ok()?;
    let fields = gojson::lenient(&value, "serverapi.StartVMRequest", START_FIELDS).ok()?;
    fields.string("vmName").filter(|n| !n.is_empty()).map(str::to_string)
}

/// POST /v1/vms. Returns the reply and whether the zombie hook fired.
async fn start(sim: &Simulator, body: &[u8]) -> (Reply, bool) {
    let fields =
        match gojson::decode_first(body).and_then(|v| gojson::lenient(&v, "serverapi.StartVMRequest", START_FIELDS)) {
            Ok(f) => f,
            Err(e) => return (invalid_format(&e), false),
        };
    let name = fields.string("vmName").unwrap_or_default().to_string();
    if name.is_empty() {
        return (Reply::error(400, "Empty vm name"), false);
    }
    let snapshot_id = fields.string("snapshotId").filter(|s| !s.is_empty()).map(str::to_string);
    let (result, zombie) = {
        let mut world = sim.world();
        let zombie = snapshot_id.is_none() && !world.vms.contains_key(&name) && sim.take_zombie();
        (world.start(&name, snapshot_id.as_deref(), zombie), zombie)
    };
    // Boot time: the VM is already registered (and listed) while this elapses.
    sleep(sim.config().latency_of(Op::Start)).await;
    match result {
        Ok((info, _)) => (Reply::ok(&info), zombie),
        Err(message) => (Reply::error(500, &message), zombie),
    }
}

fn patch_status(body: &[u8]) -> Result<String, String> {
    let value = gojson::decode_first(body)?;
    let fields = gojson::lenient(&value, "serverapi.V1VmsNamePatchRequest", &[("status", FieldType::String)])?;
    Ok(fields.string("status").unwrap_or_default().to_string())
}

fn patch(sim: &Simulator, name: &str, body: &[u8]) -> Reply {
    let status = match patch_status(body) {
        Ok(s) => s,
        Err(e) => return invalid_format(&e),
    };
    let result = match status.as_str() {
        "stopped" => sim.world().stop(name),
        "paused" => sim.world().pause(name),
        "resume" => sim.world().resume(name),
        other => return Reply::error(400, &format!("Invalid status value: {other}")),
    };
    match result {
        Ok(()) => Reply::success(),
        Err(message) => Reply::error(500, &message),
    }
}

async fn snapshot(sim: &Simulator, name: &str, body: &[u8]) -> Reply {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Snapshot {
        snapshot_id: String,
    }
    let id = match gojson::decode_first(body)
        .and_then(|v| gojson::lenient(&v, "struct { SnapshotId string }", &[("snapshotId", FieldType::String)]))
    {
        Ok(f) => f.string("snapshotId").unwrap_or_default().to_string(),
        Err(e) => return invalid_format(&e),
    };
    let incarnation = match sim.world().snapshot_begin(name, &id) {
        Ok(inc) => inc,
        Err(message) => return Reply::error(500, &message),
    };
    // The copy runs to completion even if the client gives up, as it does on the server, so
    // the VM is never left paused by a disconnect.
    let delay = sim.config().latency_of(Op::Snapshot);
    let task = {
        let sim = sim.clone();
        let (name, id) = (name.to_string(), id.clone());
        tokio::spawn(async move {
            sleep(delay).await;
            sim.world().snapshot_finish(&name, &id, incarnation)
        })
    };
    match task.await {
        Ok(Ok(())) => Reply::ok(&Snapshot { snapshot_id: id }),
        Ok(Err(message)) => Reply::error(500, &message),
        Err(_) => Reply::error(500, "Failed to create snapshot: simulator task failed"),
    }
}

/// The VM a cmd/files call is proxied to.
struct GuestRef {
    ip: String,
    status: VmStatus,
    incarnation: u64,
    boot_gen: u64,
}

impl GuestRef {
    fn lookup(sim: &Simulator, name: &str, not_found_prefix: &str) -> Result<Self, Reply> {
        let world = sim.world();
        let vm = world.vms.get(name).ok_or_else(|| {
            Reply::error(500, &format!("{not_found_prefix}: rpc error: code = NotFound desc = vm not found: {name}"))
        })?;
        Ok(Self { ip: vm.ip_addr().to_string(), status: vm.status, incarnation: vm.incarnation, boot_gen: vm.boot_gen })
    }

    /// The guest of a VM whose agent can answer a request. For any other VM, after the proxy
    /// timeout, the 500 Arrakis gives: `failure(ip, detail)` is its message.
    async fn reachable(
        sim: &Simulator,
        name: &str,
        not_found_prefix: &str,
        failure: impl FnOnce(&str, &str) -> String,
    ) -> Result<Self, Reply> {
        let guest = Self::lookup(sim, name, not_found_prefix)?;
        if guest.status != VmStatus::Running {
            let detail = guest.unreachable(sim).await;
            return Err(Reply::error(500, &failure(&guest.ip, &detail)));
        }
        Ok(guest)
    }

    /// Waits out the proxy timeout for a guest that cannot answer and returns Go's error
    /// detail. A stopped guest's address stops answering ARP, so the dial fails with "no route
    /// to host" rather than a timeout (inferred); both take the proxy timeout here.
    async fn unreachable(&self, sim: &Simulator) -> String {
        sleep(sim.config().proxy_timeout).await;
        if self.status == VmStatus::Stopped {
            format!("dial tcp {}:4031: connect: no route to host", self.ip)
        } else {
            CLIENT_TIMEOUT.to_string()
        }
    }
}

const CMD_FIELDS: &[gojson::Field] = &[("cmd", FieldType::String), ("blocking", FieldType::Bool)];

async fn cmd(sim: &Simulator, name: &str, body: &[u8]) -> Reply {
    #[derive(Serialize)]
    struct CmdResponse {
        error: String,
        output: String,
    }
    let fields =
        match gojson::decode_first(body).and_then(|v| gojson::strict(&v, "VmCommandRequest", &["cmd"], CMD_FIELDS)) {
            Ok(f) => f,
            Err(e) => return invalid_format(&e),
        };
    let command = fields.string("cmd").unwrap_or_default().to_string();
    if command.is_empty() {
        return Reply::error(400, "Command cannot be empty");
    }
    let blocking = fields.bool("blocking").unwrap_or(true);
    let guest = match GuestRef::reachable(sim, name, "Failed to execute command", |ip, detail| {
        format!("Failed to execute command: failed to execute request: Post \"http://{ip}:4031/cmd\": {detail}")
    })
    .await
    {
        Ok(g) => g,
        Err(reply) => return reply,
    };
    let url = format!("http://{}:4031/cmd", guest.ip);
    if !shell::precheck(&command) {
        return Reply::error(500, "Failed to execute command: request failed with status: 400");
    }
    let program = Program::new(&command, name);
    let task = tokio::spawn(run_program(sim.clone(), name.to_string(), guest.incarnation, guest.boot_gen, program));
    if !blocking {
        return Reply::ok(&CmdResponse {
            error: String::new(),
            output: format!("Command '/usr/bin/bash -c {command}' started in background"),
        });
    }
    match tokio::time::timeout(sim.config().proxy_timeout, task).await {
        Ok(Ok(Some((output, code)))) => Reply::ok(&CmdResponse {
            error: if code == 0 { String::new() } else { format!("exit status {code}") },
            output,
        }),
        // The guest vanished mid-command (destroyed, stopped or restarted).
        Ok(_) => {
            Reply::error(500, &format!("Failed to execute command: failed to execute request: Post \"{url}\": EOF"))
        }
        // The command keeps running in the guest; only the proxy call gives up.
        Err(_) => Reply::error(
            500,
            &format!("Failed to execute command: failed to execute request: Post \"{url}\": {CLIENT_TIMEOUT}"),
        ),
    }
}

/// Runs a guest command to completion, sleeping in real (scaled) time, as long as the same
/// boot of the same VM is alive and nobody kills it. `None` when the guest went away first.
/// Background children it starts run as their own tasks.
/// A guest process run to its end: its output and exit status, `None` if the guest went away.
type ProcessFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Option<(String, i32)>> + Send>>;

fn run_program(sim: Simulator, name: String, incarnation: u64, boot_gen: u64, program: Program) -> ProcessFuture {
    // Boxed: a process spawns its children with this same function.
    Box::pin(run_process(sim, name, incarnation, boot_gen, program))
}

async fn run_process(
    sim: Simulator,
    name: String,
    incarnation: u64,
    boot_gen: u64,
    mut program: Program,
) -> Option<(String, i32)> {
    /// A sleeping process looks for signals this often (real time).
    const SIGNAL_CHECK: Duration = Duration::from_millis(50);
    let command = program_label(&program);
    loop {
        let (step, children) = {
            let mut world = sim.world();
            let vm = world.vms.get_mut(&name).filter(|vm| vm.incarnation == incarnation && vm.boot_gen == boot_gen)?;
            let pid = program.register(&mut vm.procs, &command);
            if let Some(signal) = vm.procs.pending_signal(pid) {
                vm.procs.exit(pid, 128 + signal);
                return Some((program.output().to_string(), 128 + signal));
            }
            let step = program.run_with(&mut vm.fs, &mut vm.procs);
            if let Step::Done(code) = step {
                vm.procs.exit(pid, code);
            }
            (step, program.take_spawned())
        };
        for child in children {
            tokio::spawn(run_program(sim.clone(), name.clone(), incarnation, boot_gen, child));
        }
        match step {
            Step::Done(code) => return Some((program.output().to_string(), code)),
            Step::Sleep(d) => {
                let scale = sim.config().time_scale;
                let scaled =
                    Duration::try_from_secs_f64(d.as_secs_f64() * scale).unwrap_or(crate::config::DEFAULT_HANG);
                let until = tokio::time::Instant::now() + scaled;
                // Sleep in slices so that a kill ends the process promptly.
                while tokio::time::Instant::now() < until {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until.min(tokio::time::Instant::now() + SIGNAL_CHECK)) => {}
                        _ = sim.inner.shutdown.cancelled() => return None,
                    }
                    let world = sim.world();
                    let signalled = world
                        .vms
                        .get(&name)
                        .filter(|vm| vm.incarnation == incarnation && vm.boot_gen == boot_gen)
                        .map(|vm| vm.procs.pending_signal(program.pid()).is_some());
                    match signalled {
                        None => return None,
                        Some(true) => break,
                        Some(false) => {}
                    }
                }
            }
        }
    }
}

/// The command line a process shows (`/_sim/state`): the agent's `bash -c` text.
fn program_label(program: &Program) -> String {
    program.label().to_string()
}

async fn upload(sim: &Simulator, name: &str, body: &[u8]) -> Reply {
    let files = match gojson::decode_first(body).and_then(|v| gojson::upload_files(&v)) {
        Ok(f) => f,
        Err(e) => return invalid_format(&e),
    };
    if files.is_empty() {
        return Reply::error(400, "No files provided for upload");
    }
    let guest = match GuestRef::reachable(sim, name, "Failed to upload files", |ip, detail| {
        format!("Failed to upload files: rpc error: code = Internal desc = failed to execute request: Post \"http://{ip}:4031/files\": {detail}")
    })
    .await
    {
        Ok(g) => g,
        Err(reply) => return reply,
    };
    let ip = &guest.ip;
    let mut world = sim.world();
    let Some(vm) = world.vms.get_mut(name).filter(|vm| vm.incarnation == guest.incarnation) else {
        return Reply::error(500, &format!("Failed to upload files: rpc error: code = Internal desc = failed to execute request: Post \"http://{ip}:4031/files\": EOF"));
    };
    for (path, content) in files {
        if path.is_empty() {
            continue;
        }
        let abs = if path.starts_with('/') { resolve("/", &path) } else { resolve(SERVER_FILES, &path) };
        // The first failure stops the loop; earlier files stay written.
        if vm.fs.write(&abs, &content, false).is_err() {
            return Reply::error(
                500,
                "Failed to upload files: rpc error: code = Internal desc = request failed with status: 500",
            );
        }
    }
    Reply::Json { status: 200, body: "{}\n".into() }
}

/// Go's `url.Values.Get`: the first value of `key`, `+` as space, percent-decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
        (decode(k) == key).then(|| decode(v))
    })
}

async fn download(sim: &Simulator, name: &str, query: &str) -> Reply {
    #[derive(Serialize)]
    struct File {
        content: String,
        error: String,
        path: String,
    }
    #[derive(Serialize)]
    struct Files {
        files: Vec<File>,
    }
    let paths = query_value(query, "paths").unwrap_or_default();
    if paths.is_empty() {
        return Reply::error(400, "Missing 'paths' query parameter");
    }
    let reachable = GuestRef::reachable(sim, name, "Failed to download files", |ip, detail| {
        format!("Failed to download files: rpc error: code = Internal desc = failed to execute request: Get \"http://{ip}:4031/files?paths={paths}\": {detail}")
    });
    if let Err(reply) = reachable.await {
        return reply;
    }
    let world = sim.world();
    let Some(vm) = world.vms.get(name) else {
        return Reply::error(
            500,
            &format!("Failed to download files: rpc error: code = NotFound desc = vm not found: {name}"),
        );
    };
    let files = paths
        .split(',')
        .map(|p| {
            // filepath.Join(base, filepath.Clean(p)): absolute paths land under the base too.
            let abs = if p.starts_with('/') {
                resolve(SERVER_FILES, resolve("/", p).trim_start_matches('/'))
            } else {
                resolve(SERVER_FILES, p)
            };
            let (content, error) = match vm.fs.read(&abs) {
                Ok(c) => (c.to_string(), String::new()),
                Err(FsError::IsADirectory) => {
                    (String::new(), format!("Failed to read file: read {abs}: is a directory"))
                }
                Err(e) => (String::new(), format!("Failed to read file: open {abs}: {}", e.go_text())),
            };
            File { content, error, path: p.to_string() }
        })
        .collect();
    Reply::ok(&Files { files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_clean_paths() {
        assert_eq!(Route::parse("/v1/vms/a b"), Some(Route::Vm("a b".into())));
        assert_eq!(Route::parse("/v1/vms/"), None);
        assert_eq!(Route::parse("/v1/vms/a/b"), None);
        assert_eq!(Route::parse("/v1/vms/x/files"), Some(Route::Files("x".into())));
        assert_eq!(clean_path("/v1//vms"), "/v1/vms");
        assert_eq!(clean_path("/v1/vms/"), "/v1/vms/");
        assert_eq!(clean_path("/v1/vms/../health"), "/v1/health");
    }

    #[test]
    fn query_values_decode_like_go() {
        assert_eq!(query_value("paths=a%2Cb,c&x=1", "paths").as_deref(), Some("a,b,c"));
        assert_eq!(query_value("x=1&paths=a+b&paths=c", "paths").as_deref(), Some("a b"));
        assert_eq!(query_value("x=1", "paths"), None);
    }

    #[test]
    fn timestamps_are_rfc3339_seconds() {
        let ts = rfc3339_now();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    }
}
