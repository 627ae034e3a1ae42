//! `HostQueueObject`: the Durable Object of the `durable` dispatch mode, one per server name
//! (binding `HOST_QUEUE`). A thin shell around [`host_queue::HostQueue`]: it loads the queue
//! from SQLite when it wakes, runs one queue step per request, then carries out the step's
//! effects: pushes to the daemon's hibernated WebSocket, the task records due in KV, the
//! alarm. Long polls and `?wait` are loops over the in-memory queue (no storage reads).

use std::cell::{Cell, RefCell};

use host_queue::{
    object::{self, Reply},
    Effects, HostQueue, Push, QueueConfig,
};
use vm_task_edge::Clock;
use vm_task_types::Timestamp;
use worker::{
    durable_object, DurableObject, Env, Request, Response, State, WebSocket, WebSocketIncomingMessage, WebSocketPair,
};
use worker_glue::{durable::SqlHostStore, number, WorkerClock};

/// How often a waiting request looks at the in-memory queue again.
const WAIT_STEP_MS: u64 = 10;

#[durable_object]
pub struct HostQueueObject {
    state: State,
    env: Env,
    queue: RefCell<Option<HostQueue<SqlHostStore>>>,
    /// Tells this load of the object apart in the ready list's version.
    instance: u64,
    /// The alarm as last set, to skip setting it again.
    alarm_at: Cell<Option<u64>>,
    /// Task records (id, gen) being written to KV now. Concurrent requests each run
    /// `after_step`, and the mirror stays due until its write returns: without this, two wrote
    /// the same terminal record and each write queued the task's webhook (the e2e test
    /// `webhooks::each_terminal_task_is_delivered_once_signed_within_2_s` got a completed task's
    /// event twice in the durable mode).
    writing: RefCell<std::collections::HashSet<(u128, u64)>>,
}

impl DurableObject for HostQueueObject {
    fn new(state: State, env: Env) -> Self {
        // Pings are answered by the runtime without waking the object (no billed duration).
        if let Ok(pair) = worker::worker_sys::WebSocketRequestResponsePair::new("ping", "pong") {
            state.set_websocket_auto_response(&pair);
        }
        Self {
            state,
            env,
            queue: RefCell::new(None),
            instance: WorkerClock.now().as_millis(),
            alarm_at: Cell::new(None),
            writing: RefCell::new(std::collections::HashSet::new()),
        }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let url = req.url()?;
        let path = url.path().to_owned();
        let query = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
        let wait_ms: u64 = query("wait_ms").and_then(|v| v.parse().ok()).unwrap_or(0).min(60_000);
        let method = req.inner().method();
        let reply = match (method.as_str(), path.as_str()) {
            ("GET", "/connect") => return self.accept_daemon(),
            ("GET", "/ready") => {
                let since = query("since");
                self.wait(wait_ms, |queue, instance| {
                    let list = object::ready_list(queue, instance);
                    (since.as_deref() != Some(list.version.as_str()), Reply::json(200, &list))
                })
                .await
            }
            ("GET", p) if p.starts_with("/tasks/") => {
                let id = p.trim_start_matches("/tasks/").to_owned();
                let id = id.parse().map_err(|_| worker::Error::RustError(format!("bad task id {id:?}")))?;
                self.wait(wait_ms, |queue, instance| {
                    // Finished, and in KV as well (or waiting on KV's write limit), so a list
                    // read after this answer agrees with it.
                    let now = WorkerClock.now();
                    let finished = queue.task(id).is_some_and(|t| t.status.is_terminal()) && queue.kv_settled(id, now);
                    (finished, object::handle(queue, instance, "GET", &format!("/tasks/{id}"), &[], WorkerClock.now()))
                })
                .await
            }
            _ => {
                let body = req.bytes().await.unwrap_or_default();
                let now = WorkerClock.now();
                self.step(|queue, instance| object::handle(queue, instance, &method, &path, &body, now))
                    .unwrap_or_else(|unavailable| unavailable)
            }
        };
        self.after_step().await;
        Response::ok(reply.body).map(|r| r.with_status(reply.status))
    }

    async fn alarm(&self) -> worker::Result<Response> {
        self.alarm_at.set(None);
        let now = WorkerClock.now();
        let _ = self.step(|queue, _| queue.on_alarm(now));
        self.after_step().await;
        Response::ok("")
    }

    async fn websocket_message(&self, ws: WebSocket, message: WebSocketIncomingMessage) -> worker::Result<()> {
        // Anything but the auto-answered ping asks for the ready list again.
        if let WebSocketIncomingMessage::String(_) = message {
            if let Ok(tasks) = self.step(|queue, _| queue.ready()) {
                let _ = ws.send_with_str(serde_json::to_string(&Push::Ready { tasks }).unwrap_or_default());
            }
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

impl HostQueueObject {
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
    /// answers 503.
    fn step<T>(&self, op: impl FnOnce(&mut HostQueue<SqlHostStore>, u64) -> T) -> Result<T, Reply> {
        let mut slot = self.queue.borrow_mut();
        let queue = slot.get_or_insert_with(|| {
            HostQueue::load(SqlHostStore::open(self.state.storage().sql()), queue_config(&self.env))
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
        Ok(out)
    }

    /// Repeats `check` every few ms until it says done or `wait_ms` passes, and answers its
    /// last reply.
    async fn wait(
        &self,
        wait_ms: u64,
        mut check: impl FnMut(&mut HostQueue<SqlHostStore>, u64) -> (bool, Reply),
    ) -> Reply {
        let deadline = WorkerClock.now().plus_millis(wait_ms);
        loop {
            let (done, reply) = match self.step(&mut check) {
                Ok(checked) => checked,
                Err(unavailable) => return unavailable,
            };
            let now = WorkerClock.now();
            if done || now >= deadline {
                return reply;
            }
            WorkerClock.sleep_ms(WAIT_STEP_MS.min(deadline.millis_since(now))).await;
        }
    }

    /// Carries out what the last steps left to do: pushes, KV records due, the alarm.
    async fn after_step(&self) {
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
                for task in mirror {
                    // Another request's after_step is writing this version already.
                    if !self.writing.borrow_mut().insert((task.id.as_u128(), task.gen)) {
                        continue;
                    }
                    let written = tasks.save(&task).await;
                    self.writing.borrow_mut().remove(&(task.id.as_u128(), task.gen));
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
            }
        }
        let next = self.queue.borrow().as_ref().and_then(|q| q.next_alarm()).map(Timestamp::as_millis);
        if next != self.alarm_at.get() {
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
