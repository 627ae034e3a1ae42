//! `HostQueueObject`: the Durable Object of the `durable` dispatch mode, one per server name
//! (binding `HOST_QUEUE`). A thin shell around [`host_queue::HostQueue`]: it loads the queue
//! from SQLite when it wakes, runs one queue step per request, then carries out the step's
//! effects after replying: pushes to the daemon's hibernated WebSocket, the task records due
//! in KV, the alarm. Long polls and `?wait` wait on the in-memory queue (no storage reads)
//! and are woken by every change, not by polling.
//!
//! What Cloudflare bills the object for is counted into the worker's `/stats`
//! ([`crate::COUNTERS`]: the object runs in the worker's isolate on the local stack): each
//! request, alarm and WebSocket message it wakes for, its rows read and written, and the
//! wall-clock time some event was in progress (the billed duration).

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
};

use futures::channel::oneshot;
use host_queue::{
    object::{self, Reply},
    Effects, HostQueue, Push, QueueConfig,
};
use vm_task_edge::Clock;
use vm_task_types::{wire::HostCall, Timestamp};
use worker::{
    durable_object, DurableObject, Env, Request, Response, State, WebSocket, WebSocketIncomingMessage, WebSocketPair,
};
use worker_glue::{durable::SqlHostStore, number, WorkerClock};

use crate::COUNTERS;

#[durable_object]
pub struct HostQueueObject {
    inner: Rc<Inner>,
}

/// The object's state, shared with the work it leaves running after a reply (KV writes, the
/// alarm), which must outlive the request.
struct Inner {
    state: State,
    env: Env,
    queue: RefCell<Option<HostQueue<SqlHostStore>>>,
    /// Tells this load of the object apart in the ready list's version.
    instance: u64,
    /// The alarm as last set, to skip setting it again.
    alarm_at: Cell<Option<u64>>,
    /// Whether an effects pass is running; another is then folded into it, so a task's KV
    /// record has one write in flight at a time and an older version never lands last.
    effects_running: Cell<bool>,
    effects_again: Cell<bool>,
    /// Waiting requests (`?wait`, long polls), woken after every change.
    waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Events in progress, and since when some has been (for the billed duration).
    in_flight: Cell<u32>,
    active_since: Cell<u64>,
}

/// Marks the object active from its creation until dropped; the time with at least one event
/// (or work left running after a reply) in progress is counted once, however many overlap.
struct Active(Rc<Inner>);

impl Active {
    fn begin(inner: &Rc<Inner>) -> Self {
        if inner.in_flight.get() == 0 {
            inner.active_since.set(WorkerClock.now().as_millis());
        }
        inner.in_flight.set(inner.in_flight.get() + 1);
        Active(inner.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let inner = &self.0;
        inner.in_flight.set(inner.in_flight.get().saturating_sub(1));
        if inner.in_flight.get() == 0 {
            COUNTERS.count_do_active_ms(WorkerClock.now().as_millis().saturating_sub(inner.active_since.get()));
        }
    }
}

impl DurableObject for HostQueueObject {
    fn new(state: State, env: Env) -> Self {
        // Pings are answered by the runtime without waking the object (no billed duration).
        if let Ok(pair) = worker::worker_sys::WebSocketRequestResponsePair::new("ping", "pong") {
            state.set_websocket_auto_response(&pair);
        }
        let inner = Inner {
            state,
            env,
            queue: RefCell::new(None),
            instance: WorkerClock.now().as_millis(),
            alarm_at: Cell::new(None),
            effects_running: Cell::new(false),
            effects_again: Cell::new(false),
            waiters: RefCell::new(Vec::new()),
            in_flight: Cell::new(0),
            active_since: Cell::new(0),
        };
        Self { inner: Rc::new(inner) }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let inner = &self.inner;
        let _active = Active::begin(inner);
        COUNTERS.count_do_request();
        let url = req.url()?;
        let path = url.path().to_owned();
        let query = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
        let wait_ms: u64 = query("wait_ms").and_then(|v| v.parse().ok()).unwrap_or(0).min(60_000);
        let method = req.inner().method();
        let reply = match (method.as_str(), path.as_str()) {
            ("GET", "/connect") => return inner.accept_daemon(),
            ("GET", "/ready") => {
                let since = query("since");
                inner
                    .wait(wait_ms, |queue, instance| {
                        let list = object::ready_list(queue, instance);
                        (since.as_deref() != Some(list.version.as_str()), Reply::json(200, &list))
                    })
                    .await
            }
            ("GET", p) if p.starts_with("/tasks/") => {
                let id = p.trim_start_matches("/tasks/").to_owned();
                let id = id.parse().map_err(|_| worker::Error::RustError(format!("bad task id {id:?}")))?;
                inner
                    .wait(wait_ms, |queue, instance| {
                        // Finished, and in KV as well (or waiting on KV's write limit), so a list
                        // read after this answer agrees with it.
                        let now = WorkerClock.now();
                        let finished =
                            queue.task(id).is_some_and(|t| t.status.is_terminal()) && queue.kv_settled(id, now);
                        (finished, object::handle(queue, instance, "GET", &format!("/tasks/{id}"), &[], now))
                    })
                    .await
            }
            _ => {
                let body = req.bytes().await.unwrap_or_default();
                let now = WorkerClock.now();
                inner
                    .step(|queue, instance| object::handle(queue, instance, &method, &path, &body, now))
                    .unwrap_or_else(|unavailable| unavailable)
            }
        };
        // The step is stored (the runtime holds the reply until its SQLite writes are
        // durable); what it left to do (pushes, KV records, the alarm) runs after the reply,
        // off the caller's path.
        inner.spawn_effects();
        Response::ok(reply.body).map(|r| r.with_status(reply.status))
    }

    async fn alarm(&self) -> worker::Result<Response> {
        let inner = &self.inner;
        let _active = Active::begin(inner);
        COUNTERS.count_do_request();
        inner.alarm_at.set(None);
        let now = WorkerClock.now();
        let _ = inner.step(|queue, _| queue.on_alarm(now));
        inner.clone().effects().await;
        Response::ok("")
    }

    async fn websocket_message(&self, ws: WebSocket, message: WebSocketIncomingMessage) -> worker::Result<()> {
        let _active = Active::begin(&self.inner);
        COUNTERS.count_do_ws_message();
        let WebSocketIncomingMessage::String(text) = message else { return Ok(()) };
        // A claim, heartbeat, release or report: answered on the socket, after which its
        // effects (the KV record, pushes) run as after an HTTP request.
        if let Ok(call) = serde_json::from_str::<HostCall>(&text) {
            let now = WorkerClock.now();
            let reply = self
                .inner
                .step(|queue, instance| object::handle_call(queue, instance, &call, now))
                .unwrap_or_else(|unavailable| unavailable);
            let _ = ws.send_with_str(object::answer(call.call, reply));
            self.inner.spawn_effects();
            return Ok(());
        }
        // Anything else but the auto-answered ping asks for the ready list again.
        if let Ok(tasks) = self.inner.step(|queue, _| queue.ready()) {
            let _ = ws.send_with_str(serde_json::to_string(&Push::Ready { tasks }).unwrap_or_default());
        }
        Ok(())
    }

    async fn websocket_close(&self, ws: WebSocket, code: usize, reason: String, _clean: bool) -> worker::Result<()> {
        let code = if code == 1005 || code == 1006 { 1000 } else { code as u16 };
        let _ = ws.close(Some(code), Some(reason));
        Ok(())
    }

    async fn websocket_error(&self, _ws: WebSocket, error: worker::Error) -> worker::Result<()> {
        worker::console_warn!("host queue websocket error: {error}");
        Ok(())
    }
}

impl Inner {
    /// A daemon's WebSocket: accepted for hibernation, then sent what is claimable now, so a
    /// daemon that reconnects gets every task it may have missed.
    fn accept_daemon(&self) -> worker::Result<Response> {
        let pair = WebSocketPair::new()?;
        self.state.accept_web_socket(&pair.server);
        if let Ok(tasks) = self.step(|queue, _| queue.ready()) {
            let _ = pair.server.send_with_str(serde_json::to_string(&Push::Ready { tasks }).unwrap_or_default());
        }
        Response::from_websocket(pair.client)
    }

    /// One queue step, loading the queue first if this object just woke. A storage failure
    /// drops the in-memory queue (the next step reloads it from storage, the truth) and
    /// answers 503. Waiting requests are woken to look again.
    fn step<T>(&self, op: impl FnOnce(&mut HostQueue<SqlHostStore>, u64) -> T) -> Result<T, Reply> {
        let out = {
            let mut slot = self.queue.borrow_mut();
            let queue = slot.get_or_insert_with(|| {
                HostQueue::load(SqlHostStore::open(self.state.storage().sql(), &COUNTERS), queue_config(&self.env))
            });
            let out = op(queue, self.instance);
            if let Some(failure) = queue.store().failure.clone() {
                *slot = None;
                worker::console_error!("host queue storage failed: {failure}");
                return Err(Reply::json(
                    503,
                    &serde_json::json!({"success": false, "code": "unavailable", "error": "host queue storage failed; retry"}),
                ));
            }
            out
        };
        self.wake_waiters();
        Ok(out)
    }

    fn wake_waiters(&self) {
        for waiter in self.waiters.borrow_mut().drain(..) {
            let _ = waiter.send(());
        }
    }

    /// Answers `check`'s reply once it says done, or when `wait_ms` has passed; looks again
    /// whenever the queue changed or a KV write finished (no polling).
    async fn wait(
        &self,
        wait_ms: u64,
        mut check: impl FnMut(&mut HostQueue<SqlHostStore>, u64) -> (bool, Reply),
    ) -> Reply {
        let deadline = WorkerClock.now().plus_millis(wait_ms);
        loop {
            // Registered before checking, so a change between the check and the wait wakes it.
            let (wake, woken) = oneshot::channel();
            let checked = {
                let mut slot = self.queue.borrow_mut();
                let queue = slot.get_or_insert_with(|| {
                    HostQueue::load(SqlHostStore::open(self.state.storage().sql(), &COUNTERS), queue_config(&self.env))
                });
                check(queue, self.instance)
            };
            let (done, reply) = checked;
            let now = WorkerClock.now();
            if done || now >= deadline {
                return reply;
            }
            self.waiters.borrow_mut().push(wake);
            let timeout = WorkerClock.sleep_ms(deadline.millis_since(now));
            futures::future::select(woken, Box::pin(timeout)).await;
        }
    }

    /// Runs [`Inner::effects`] without holding up the reply. The object stays in memory while
    /// it runs (pending I/O), and counts as active.
    fn spawn_effects(self: &Rc<Self>) {
        let inner = self.clone();
        worker::wasm_bindgen_futures::spawn_local(async move {
            let _active = Active::begin(&inner);
            inner.effects().await;
        });
    }

    /// Carries out what the steps left to do, until nothing is left: pushes, KV records due,
    /// the alarm. One pass at a time; a pass asked for meanwhile is folded into the running one.
    async fn effects(self: Rc<Self>) {
        if self.effects_running.replace(true) {
            self.effects_again.set(true);
            return;
        }
        loop {
            self.effects_again.set(false);
            self.effects_pass().await;
            if !self.effects_again.get() {
                break;
            }
        }
        self.effects_running.set(false);
    }

    async fn effects_pass(&self) {
        let now = WorkerClock.now();
        let Ok(Effects { mirror, push }) = self.step(|queue, _| queue.effects(now)) else { return };
        if !push.is_empty() {
            let message = serde_json::to_string(&Push::Ready { tasks: push }).unwrap_or_default();
            for ws in self.state.get_websockets() {
                let _ = ws.send_with_str(&message);
            }
        }
        if !mirror.is_empty() {
            // Leases ending, never-claimed tasks and cancels make tasks terminal here: the
            // mirror write that carries it queues the task's webhooks.
            let (config, _) = crate::config(&self.env);
            if let Ok(tasks) = crate::task_store(&self.env, &config.webhooks) {
                let writes = mirror.into_iter().map(|task| {
                    let tasks = &tasks;
                    async move {
                        let written = tasks.save(&task).await;
                        let now = WorkerClock.now();
                        // A 429 or any other failure: tried again after the window.
                        let _ = self.step(|queue, _| match &written {
                            Ok(()) => queue.mirrored(&task, now),
                            Err(_) => queue.mirror_refused(task.id, now),
                        });
                        if let Err(e) = written {
                            worker::console_warn!("task record {} not written to KV yet: {e}", task.id);
                        }
                    }
                });
                futures::future::join_all(writes).await;
            }
        }
        let next = self.queue.borrow().as_ref().and_then(|q| q.next_alarm()).map(Timestamp::as_millis);
        // Setting the alarm is a storage write (a commit). It is moved only earlier: one that
        // rings before it is needed costs a wake that finds little to do and sets the next.
        let set = self.alarm_at.get().filter(|at| *at > WorkerClock.now().as_millis());
        let change = match (next, set) {
            (Some(next), Some(set)) => next < set,
            (None, None) => false,
            _ => true,
        };
        if change {
            self.alarm_at.set(next);
            let storage = self.state.storage();
            let outcome = match next {
                Some(at) => storage.set_alarm(at.saturating_sub(WorkerClock.now().as_millis()).max(1) as i64).await,
                None => storage.delete_alarm().await,
            };
            if let Err(e) = outcome {
                self.alarm_at.set(None);
                worker::console_error!("host queue alarm not set: {e}");
            }
        }
    }
}

fn queue_config(env: &Env) -> QueueConfig {
    let defaults = QueueConfig::default();
    QueueConfig {
        max_attempts: number(env, "MAX_ATTEMPTS", defaults.max_attempts as u64) as u32,
        lease_default_secs: number(env, "LEASE_SECONDS", defaults.lease_default_secs),
        lease_min_secs: number(env, "MIN_LEASE_SECONDS", defaults.lease_min_secs),
        lease_max_secs: number(env, "MAX_LEASE_SECONDS", defaults.lease_max_secs),
        max_queued_secs: number(env, "MAX_QUEUED_SECONDS", defaults.max_queued_secs),
        retain_secs: defaults.retain_secs,
    }
}
