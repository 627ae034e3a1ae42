//! Durable Objects as the `durable` dispatch mode uses them: one `HostQueueObject` per server
//! name, each running the real [`host_queue::HostQueue`] state machine, as the worker's shell
//! (`consumer-worker/src/host_queue_object.rs`) does, over a model of its storage.
//!
//! Each rule cites the Cloudflare documentation it models:
//!
//! - **One serialized owner per id.** "Durable Objects" (<https://developers.cloudflare.com/durable-objects/>):
//!   each object has a globally unique id, lives in one location, and handles its requests one
//!   at a time (input gates). Modelled as: each object has a location drawn from the seed, and
//!   every request is one synchronous [`host_queue::object::handle`] step.
//! - **Storage writes are transactional.** "Storage API"
//!   (<https://developers.cloudflare.com/durable-objects/api/storage-api/>): writes made without
//!   an intervening `await` are committed atomically (implicit transactions, output gates).
//!   Modelled as: a step's writes land in the object's store together; a restart loses only the
//!   in-memory copy ([`ObjectsModel::evict`]), and the next request reloads from the store.
//! - **Alarms fire at least once.** "Alarms" (<https://developers.cloudflare.com/durable-objects/api/alarms/>):
//!   one alarm per object (a new `setAlarm` replaces it); it is retried on failure and is
//!   guaranteed to run at least once, so it may run more than once. Modelled as: the simulation
//!   fires the alarm set last, and sometimes fires it a second time.
//! - **WebSocket messages can be lost with the connection.** "WebSockets"
//!   (<https://developers.cloudflare.com/durable-objects/best-practices/websockets/>): a
//!   hibernated socket survives the object's eviction, but a network failure closes it and
//!   nothing sent meanwhile arrives. Modelled in the simulation: a push may be lost, closing the
//!   daemon's socket; the daemon reconnects and the object sends what is claimable then.
//! - **The KV mirror is ordinary KV.** The object writes the task records clients read through
//!   the production KV model (from its location, 1 write per second per key, caches elsewhere).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use host_queue::{
    front::HostQueues,
    object::{self, Reply},
    HostQueue, MemoryStore, QueueConfig,
};
use vm_task_edge::store::TaskStore;
use vm_task_types::{wire::BufferedTask, Timestamp};

use crate::kv::{Invocation, KvModel, Location};

/// One server's object.
#[derive(Debug)]
struct Object {
    location: Location,
    /// Its durable storage: survives eviction.
    store: Option<MemoryStore>,
    /// The loaded queue (in memory while the object is awake).
    queue: Option<HostQueue<MemoryStore>>,
    /// Tells loads apart in the ready list's version, as the worker's shell does.
    instance: u64,
    /// The alarm as last set.
    alarm_at: Option<u64>,
}

/// What the objects asked the simulation to carry out after a step.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Ready tasks pushed to the server's daemons (server, tasks).
    pub pushes: Vec<(String, Vec<BufferedTask>)>,
    /// Alarms set (server, time; a time already past means "at once").
    pub alarms: Vec<(String, u64)>,
    /// KV mirror writes that were refused (429), for the trace.
    pub mirror_refusals: usize,
}

/// Every server's object. Clones share them.
#[derive(Debug, Clone)]
pub struct ObjectsModel {
    inner: Rc<RefCell<Inner>>,
}

#[derive(Debug)]
struct Inner {
    objects: BTreeMap<String, Object>,
    placement: BTreeMap<String, Location>,
    tasks_kv: KvModel,
    config: QueueConfig,
    outbox: Outbox,
    ops_per_invocation: u32,
}

impl ObjectsModel {
    /// `placement`: each server's object's location (0 for one not named).
    pub fn new(
        tasks_kv: KvModel,
        config: QueueConfig,
        placement: BTreeMap<String, Location>,
        ops_per_invocation: u32,
    ) -> Self {
        Self {
            inner: Rc::new(RefCell::new(Inner {
                objects: BTreeMap::new(),
                placement,
                tasks_kv,
                config,
                outbox: Outbox::default(),
                ops_per_invocation,
            })),
        }
    }

    /// The object of `server` as a worker at `now` reaches it.
    pub fn at(&self, now_ms: u64) -> ObjectsAt {
        ObjectsAt { model: self.clone(), now_ms }
    }

    /// Takes what the objects left to do.
    pub fn take_outbox(&self) -> Outbox {
        std::mem::take(&mut self.inner.borrow_mut().outbox)
    }

    pub fn location(&self, server: &str) -> Option<Location> {
        self.inner.borrow().objects.get(server).map(|o| o.location)
    }

    /// The object is evicted: its in-memory queue goes, its storage and alarm stay.
    pub fn evict(&self, server: &str) -> bool {
        let mut inner = self.inner.borrow_mut();
        let Some(object) = inner.objects.get_mut(server) else { return false };
        if let Some(queue) = object.queue.take() {
            object.store = Some(queue.into_store());
            return true;
        }
        false
    }

    /// The alarm set last, if it is `at` (a later `setAlarm` replaced an earlier one).
    pub fn alarm_is(&self, server: &str, at: u64) -> bool {
        self.inner.borrow().objects.get(server).is_some_and(|o| o.alarm_at == Some(at))
    }

    /// Runs one synchronous step on `server`'s object, loading it first if it sleeps.
    fn step<T>(&self, server: &str, now_ms: u64, op: impl FnOnce(&mut HostQueue<MemoryStore>, u64) -> T) -> T {
        let mut inner = self.inner.borrow_mut();
        let location = inner.placement.get(server).copied().unwrap_or(0);
        let config = inner.config.clone();
        let object = inner.objects.entry(server.to_owned()).or_insert_with(|| Object {
            location,
            store: Some(MemoryStore::new()),
            queue: None,
            instance: now_ms,
            alarm_at: None,
        });
        if object.queue.is_none() {
            let store = object.store.take().unwrap_or_default();
            object.instance = now_ms;
            object.queue = Some(HostQueue::load(store, config));
        }
        let instance = object.instance;
        op(object.queue.as_mut().expect("loaded above"), instance)
    }

    /// The alarm handler: `on_alarm`, then the step's effects.
    pub async fn alarm(&self, server: &str, now_ms: u64) {
        if let Some(object) = self.inner.borrow_mut().objects.get_mut(server) {
            object.alarm_at = None;
        }
        self.step(server, now_ms, |queue, _| queue.on_alarm(Timestamp(now_ms)));
        self.after_step(server, now_ms).await;
    }

    /// A daemon's socket is accepted: what is claimable now, sent on it at once.
    pub fn connect(&self, server: &str, now_ms: u64) -> Vec<BufferedTask> {
        self.step(server, now_ms, |queue, _| queue.ready())
    }

    /// The worker shell's `after_step`: pushes, the KV records due (written through the KV
    /// model from the object's location, 429s noted), the alarm.
    async fn after_step(&self, server: &str, now_ms: u64) {
        let now = Timestamp(now_ms);
        let effects = self.step(server, now_ms, |queue, _| queue.effects(now));
        let (kv, location, max_ops) = {
            let inner = self.inner.borrow();
            (inner.tasks_kv.clone(), inner.objects[server].location, inner.ops_per_invocation)
        };
        if !effects.push.is_empty() {
            self.inner.borrow_mut().outbox.pushes.push((server.to_owned(), effects.push));
        }
        if !effects.mirror.is_empty() {
            let invocation = Invocation::new(location, now_ms, max_ops);
            let tasks = TaskStore::new(kv.at(&invocation));
            for task in effects.mirror {
                let written = tasks.save(&task).await;
                self.step(server, now_ms, |queue, _| match &written {
                    Ok(()) => queue.mirrored(&task, now),
                    Err(_) => queue.mirror_refused(task.id, now),
                });
                if written.is_err() {
                    self.inner.borrow_mut().outbox.mirror_refusals += 1;
                }
            }
        }
        let next = self.step(server, now_ms, |queue, _| queue.next_alarm()).map(Timestamp::as_millis);
        let mut inner = self.inner.borrow_mut();
        let object = inner.objects.get_mut(server).expect("stepped above");
        if next != object.alarm_at {
            object.alarm_at = next;
            if let Some(at) = next {
                inner.outbox.alarms.push((server.to_owned(), at));
            }
        }
    }
}

/// The objects as reached from one worker invocation (its clock).
#[derive(Debug, Clone)]
pub struct ObjectsAt {
    model: ObjectsModel,
    now_ms: u64,
}

impl HostQueues for ObjectsAt {
    async fn call(&self, server: &str, method: &str, path: &str, body: Vec<u8>) -> Result<Reply, String> {
        // Waiting (`wait_ms`) is the shell's loop around steps; the model answers at once,
        // which is what a wait that finds its condition already true does.
        let path = path.split('?').next().unwrap_or_default().to_owned();
        let now = self.now_ms;
        let reply = self
            .model
            .step(server, now, |queue, instance| object::handle(queue, instance, method, &path, &body, Timestamp(now)));
        self.model.after_step(server, now).await;
        Ok(reply)
    }
}
