//! The simulation: clients, daemons, the queue consumer and the cron, each at a location,
//! calling the real `ApiService`/`ConsumerService` handlers over the KV and queue models, in
//! simulated time, with faults, all chosen by one seed.
//!
//! Time is a discrete-event loop: events wait in a heap ordered by (time, sequence number) and
//! each handler invocation runs to completion at its event's time (`futures::executor::block_on`;
//! a handler that sleeps moves only its own invocation clock). Nothing reads the wall clock,
//! iterates a hash map or spawns a thread, so one seed gives one run and one trace.
//!
//! Actors:
//! - **clients**, one per VM, submit its chain (launch, commands, maybe stop, delete) one POST
//!   after another from their location, retry a POST that failed or timed out with the same
//!   `Idempotency-Key`, and cancel some tasks after a random delay;
//! - **watchers** poll each accepted task from another location until it is terminal (the
//!   "visible as completed elsewhere" latency);
//! - **the queue** delivers batches to `buffer_batch` at a random location, and dead letters
//!   to `dead_letter_batch`;
//! - **the cron** runs `sweep` every minute at its location;
//! - **daemons**, one per server, run the consumer protocol (poll with the doorbell → check
//!   predecessor → claim → execute on an in-memory Arrakis → report), one task at a time.
//!   Its decisions are the real daemon's, `local_consumer::decide` called over simulated time:
//!   which listed task starts next (the daemon's `Scheduler`: oldest per VM, deferrals,
//!   finished and cancelled tasks remembered), whether a predecessor is out of the way
//!   (`decide::predecessor` along the chain), what a claim's answer means (`edge::answer`,
//!   `decide::claim_refused`, `decide::after_claim`: run, terminal, held, not visible yet with
//!   its backoff, no answer), what a report's answer means (`decide::after_report`:
//!   accepted, kept for the next claim, replaced by a failed report, retried), whether a
//!   claimed command may be sent (`decide::not_resent`, unless [`DaemonRules`] model the old
//!   daemon) and what a job's end does to the state (`Core::ended`: outcomes kept unreported,
//!   404s given up). The driver around them is
//!   still the model's own: one job at a time, polls at the doorbell interval instead of the
//!   long-poll loop, a report retried on its own schedule, lifecycle operations looking at the
//!   VM first (the executor's rule), claim ids fixed per process and task. The tokio loop
//!   (`Daemon` over its `Edge` and `Execute` traits) does not run here: its traits require
//!   `Send` futures and this world is single-threaded `Rc` state.
//!
//! In the `durable` dispatch mode ([`Mode::Durable`]) both workers put `host-queue`'s fronts
//! before their KV-mode services, as the real workers do: the queue consumer hands each batch
//! to its servers' objects (`ConsumerFront::deliver_batch`, the deployed handler), dead letters
//! go to the object, the cron reconciles; each object ([`crate::durable`]) lives at a location, runs the real
//! `HostQueue`, is evicted now and then, fires its alarm at least once (sometimes twice), and
//! writes its KV mirror through the production KV model; daemons keep a socket to their
//! object, take its pushes (lost with the socket at the loss rate, then reopened, and the
//! object sends what is claimable) and list over HTTP every `RELIST_SECONDS`.
//!
//! `SIM_DEBUG=1` adds each daemon listing to the trace.
//!
//! Faults from the seed: lost requests and responses, daemon crashes and restarts, partitions
//! between a daemon and the edge, daemons moving between locations, queue send failures and
//! failed consumer invocations, plus everything the KV and queue models do on their own.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::rc::Rc;
use std::time::Duration;

use futures::executor::block_on;
use host_queue::{
    front::{hand_off_directly, ApiFront, ConsumerFront, HandoffQueue},
    QueueConfig as ObjectConfig,
};
use serde_json::{json, Value};
use uuid::Uuid;
use vm_task_edge::{
    api::{ApiConfig, ApiService},
    auth::{Cors, Tokens},
    consumer::{ConsumerConfig, ConsumerService, Delivery},
    counting::OpCounters,
    http::{Request, Response},
    store::{BufferStore, TaskStore},
    Ids, QueueMessage, StoreError, TaskQueue,
};
use vm_task_types::{
    wire::{BufferedTask, ClaimResponse, CreateTaskResponse, ReadyTasksResponse, TaskStatusResponse},
    OperationKind, Task, TaskStatus, Timestamp,
};

use local_consumer::{
    decide::{self, AfterReport, Core, JobEnd, Predecessor, Start},
    edge::{self as daemon_edge, EdgeError},
};

use crate::durable::ObjectsModel;
use crate::kv::{Invocation, KvConfig, KvModel, Location};
use crate::queue::{QueueConfig, QueueModel};
use crate::rng::Rng;

const CLIENT_TOKEN: &str = "sim-client";
const CONSUMER_TOKEN: &str = "sim-consumer";
/// Simulated time starts at a realistic epoch so v7 ids and timestamps look like production.
const EPOCH_MS: u64 = 1_800_000_000_000;
/// Every accepted task must be terminal this long after it was accepted.
pub const TERMINAL_BOUND_MS: u64 = 20 * 60_000;
/// A run ends at the latest this long after the last client finished.
const SETTLE_MS: u64 = 40 * 60_000;
const LOCATIONS: [&str; 3] = ["ams", "iad", "sin"];

/// What one run found and measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub seed: u64,
    pub trace: Vec<String>,
    pub violations: Vec<String>,
    /// POST answered → first claim answered, per accepted task that was claimed.
    pub claim_latency_ms: Vec<u64>,
    /// The same for each VM's first task (its launch), which waits for no predecessor: the
    /// dispatch path alone (queue, buffer, listing, claim).
    pub first_claim_latency_ms: Vec<u64>,
    /// POST answered → a client at another location reads `completed`.
    pub visible_latency_ms: Vec<u64>,
    pub accepted: usize,
    pub sim_ms: u64,
}

impl Outcome {
    /// The seed, the violations and the trace, for a human.
    pub fn report(&self) -> String {
        let mut out = format!("seed {}: {} violation(s)\n", self.seed, self.violations.len());
        for v in &self.violations {
            out.push_str(&format!("  VIOLATION {v}\n"));
        }
        out.push_str("trace:\n");
        for line in &self.trace {
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

/// Runs one seed.
pub fn run(seed: u64) -> Outcome {
    run_with(seed, &Settings::production())
}

/// What the world is like: KV's consistency and limits, the edge's propagation setting, and
/// the daemon driver's rules.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kv: KvConfig,
    pub rules: DaemonRules,
    /// `KV_PROPAGATION_SECONDS` of both workers: production's 60 over production KV, 0 over
    /// strongly consistent KV (as on the one-location local stack).
    pub kv_propagation_secs: u64,
    /// `DISPATCH_MODE`.
    pub mode: Mode,
}

/// The dispatch mode (`DISPATCH_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Tasks buffered per server in KV, daemons polling a doorbell.
    Kv,
    /// One Durable Object per server owns its live tasks and pushes them to its daemon.
    Durable,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Kv => "kv",
            Mode::Durable => "durable",
        }
    }
}

impl Settings {
    /// The same world in dispatch mode `mode`.
    pub fn in_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
}

impl Settings {
    /// Production as Cloudflare documents it.
    pub fn production() -> Self {
        Self {
            kv: KvConfig::production(),
            rules: DaemonRules::default(),
            kv_propagation_secs: vm_task_edge::KV_PROPAGATION_SECS,
            mode: Mode::Kv,
        }
    }

    /// KV strongly consistent (every location reads the store, no cache, no lag), with
    /// production's per-key and per-invocation limits, queue behaviour and faults: what the
    /// native tests assume.
    pub fn consistent() -> Self {
        Self { kv: KvConfig::consistent(), rules: DaemonRules::default(), kv_propagation_secs: 0, mode: Mode::Kv }
    }
}

/// Runs one seed in the world `settings` describe.
pub fn run_with(seed: u64, settings: &Settings) -> Outcome {
    let mut sim = Sim::new(seed, settings);
    sim.run();
    sim.check();
    sim.outcome
}

// ---------------------------------------------------------------------------------------------
// Ports for one invocation

#[derive(Debug, Clone)]
struct SimIds {
    rng: Rc<RefCell<Rng>>,
    created: Rc<RefCell<Vec<Uuid>>>,
}

impl Ids for SimIds {
    fn random_bytes(&self) -> [u8; 16] {
        self.rng.borrow_mut().bytes16()
    }

    fn task_id(&self, now: Timestamp) -> Uuid {
        let bytes = self.random_bytes();
        let mut random = [0u8; 10];
        random.copy_from_slice(&bytes[..10]);
        let id = uuid::Builder::from_unix_timestamp_millis(now.as_millis(), &random).into_uuid();
        self.created.borrow_mut().push(id);
        id
    }
}

#[derive(Debug, Clone, Default)]
struct SimQueueSend {
    sent: Rc<RefCell<Vec<QueueMessage>>>,
    fail: bool,
}

impl TaskQueue for SimQueueSend {
    async fn send(&self, message: &QueueMessage) -> Result<(), StoreError> {
        if self.fail {
            return Err(StoreError::other("queue send failed (simulated)"));
        }
        self.sent.borrow_mut().push(message.clone());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The world

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    ClientPost {
        vm: usize,
    },
    Cancel {
        task: Uuid,
    },
    Watch {
        task: Uuid,
    },
    QueueDeliver,
    DlqDeliver,
    Sweep,
    /// `seq`: only the daemon's latest scheduled poll runs (a push brings it forward).
    DaemonPoll {
        d: usize,
        gen: u32,
        seq: u64,
    },
    /// The API worker's direct hand-off of new tasks to their objects (durable mode), after
    /// its answer; the tasks are kept in `direct`.
    DirectHandoff {
        key: u64,
    },
    /// Ready tasks pushed over the daemon's socket (durable mode), kept in `pushed`.
    DaemonPush {
        d: usize,
        gen: u32,
        key: u64,
    },
    /// A server's object alarm, set for `at`; `again` is a repeated firing.
    ObjectAlarm {
        server: String,
        at: u64,
        again: bool,
    },
    /// A server's object is evicted (its memory goes, its storage stays).
    ObjectEvict {
        server: String,
    },
    /// The daemon's current job claims its task.
    DaemonClaim {
        d: usize,
        gen: u32,
    },
    DaemonExecute {
        d: usize,
        gen: u32,
        key: u64,
    },
    DaemonDone {
        d: usize,
        gen: u32,
        task: Uuid,
        claim: Uuid,
        ok: bool,
        note: String,
    },
    DaemonReport {
        d: usize,
        gen: u32,
        task: Uuid,
        claim: Uuid,
        ok: bool,
        note: String,
        tries: u32,
    },
    DaemonCrash {
        d: usize,
    },
    DaemonRestart {
        d: usize,
    },
    DaemonMove {
        d: usize,
    },
}

/// One operation a client wants done: a step of a VM's chain.
#[derive(Debug, Clone)]
struct Op {
    vm: usize,
    step: usize,
    kind: OperationKind,
    body: Value,
    idempotency_key: String,
    tries: u32,
    first_post_at: Option<u64>,
    accepted: Option<Uuid>,
}

#[derive(Debug, Clone)]
struct Client {
    vm_name: String,
    server: String,
    location: Location,
    watcher_location: Location,
    ops: Vec<usize>,
    next: usize,
    done_at: Option<u64>,
}

#[derive(Debug, Clone)]
struct Accepted {
    op: usize,
    accepted_at: u64,
    cancel_ok: bool,
    /// A DELETE was answered 202 `cancel_requested` (and none 200).
    cancel_requested: bool,
    claimed_at: Option<u64>,
}

/// An outcome the daemon keeps to report when it claims the task again: ok, and its note.
type KeptOutcome = (bool, String);

#[derive(Debug)]
struct Daemon {
    server: String,
    location: Location,
    gen: u32,
    up: bool,
    /// The real daemon's decisions (`local_consumer::decide`) over simulated time (since the
    /// model's epoch): what is listed, deferred, finished, kept unreported, and what starts.
    core: Core<Duration, KeptOutcome>,
    /// The task being worked on (one at a time), and the outcome kept for it, if any.
    job: Option<(BufferedTask, Option<KeptOutcome>)>,
    claim_ids: BTreeMap<Uuid, Uuid>,
    partitions: Vec<(u64, u64)>,
    /// The doorbell value of the last listing, sent as `since`.
    bell: Option<String>,
    last_full_list: u64,
    /// When it last found or finished work (its polls are quicker for a while after).
    last_activity: u64,
    /// The scheduled poll that may run (later schedules replace earlier ones).
    poll_seq: u64,
    /// Whether the daemon is waiting for its next poll (not claiming, running or reporting):
    /// a push then brings the poll forward.
    idle: bool,
    /// Durable mode: the push socket to its server's object is open.
    connected: bool,
}

/// The start of the failed report that replaces one refused for its content (`deliver`).
const REPORT_CONTENT_REFUSED: &str = "the task ran, but the API refused its report";

/// `RELIST_SECONDS`: a listing without `since` this often, in case a ring was missed.
const RELIST_MS: u64 = 300_000;
/// How often an idle daemon's poll sees the doorbell checked (`BELL_CHECK_MS`), and a busy one's.
const IDLE_POLL_MS: u64 = 1_500;
const HOT_POLL_MS: u64 = 200;
/// A daemon polls quickly for this long after it found or finished work (its `hot` polls).
const HOT_FOR_MS: u64 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmState {
    Running,
    Stopped,
}

/// One request Arrakis received for a task.
#[derive(Debug, Clone)]
struct ArrakisCall {
    at: u64,
    task: Uuid,
    vm: String,
    /// Changed the VM (created, stopped, deleted it, ran a command); otherwise a look.
    mutating: bool,
}

/// What the network did to one request.
enum Net {
    /// Never reached the edge.
    RequestLost,
    /// The edge handled it; the caller never heard back.
    ResponseLost(Response),
    Answered(Response),
}

/// Choices of the daemon driver where the real daemon's behaviour is in question.
#[derive(Debug, Clone, Copy, Default)]
pub struct DaemonRules {
    /// Whether a command claimed again after a lost attempt (its daemon crashed, its lease
    /// expired) is sent to Arrakis again. `local-consumer` did until it failed such a command
    /// instead (`daemon::not_resent`); `true` models the old daemon.
    pub resend_commands_on_reclaim: bool,
}

struct Sim {
    rules: DaemonRules,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    rng: Rng,
    ids_rng: Rc<RefCell<Rng>>,
    tasks_kv: KvModel,
    buffer_kv: KvModel,
    queue: QueueModel,
    dlq: QueueModel,
    api_config: ApiConfig,
    consumer_config: ConsumerConfig,
    counters: OpCounters,
    kv_ops_limit: u32,
    /// How long after `now` the current event's last invocation answered.
    lag: u64,
    /// Claimed tasks waiting for their execution event.
    executions: BTreeMap<u64, (Task, Uuid)>,
    // Faults.
    loss_rate: f64,
    queue_send_fail_rate: f64,
    consumer_fail_rate: f64,
    cron_location: Location,
    // Actors.
    ops: Vec<Op>,
    clients: Vec<Client>,
    daemons: Vec<Daemon>,
    arrakis: BTreeMap<(String, String), VmState>,
    // Observations.
    created_by: BTreeMap<Uuid, (usize, u64)>,
    /// Tasks created by a POST the client saw answered with an error.
    error_answered: BTreeMap<Uuid, u16>,
    accepted: BTreeMap<Uuid, Accepted>,
    arrakis_log: Vec<ArrakisCall>,
    /// Task id → its KV key, found once in the model.
    task_keys: RefCell<BTreeMap<Uuid, Option<String>>>,
    mode: Mode,
    /// Durable mode: every server's object.
    objects: Option<ObjectsModel>,
    /// Pushes on their way to a daemon, by event key.
    pushed: BTreeMap<u64, Vec<BufferedTask>>,
    direct: BTreeMap<u64, Vec<Task>>,
    outcome: Outcome,
}

impl Sim {
    fn new(seed: u64, settings: &Settings) -> Self {
        let mut rng = Rng::new(seed);
        let locations = LOCATIONS.len();
        let tasks_kv = KvModel::new("TASK_STORAGE", locations, settings.kv.clone(), rng.next_u64());
        let buffer_kv = KvModel::new("TASK_BUFFER", locations, settings.kv.clone(), rng.next_u64());
        let queue = QueueModel::new(QueueConfig::production(), rng.next_u64());
        let dlq = QueueModel::new(
            QueueConfig { max_batch: 10, max_retries: 10, duplicate_rate: 0.0, ..QueueConfig::production() },
            rng.next_u64(),
        );
        let ids_rng = Rc::new(RefCell::new(Rng::new(rng.next_u64())));
        let api_config = ApiConfig {
            client_tokens: Tokens::parse(CLIENT_TOKEN),
            consumer_tokens: Tokens::parse(CONSUMER_TOKEN),
            cors: Cors::parse(""),
            default_target_server: None,
            cursor_secret: b"sim".to_vec(),
            wait_poll_ms: 1000,
            openapi: None,
            host_live_secs: 0,
            started_at: Timestamp(EPOCH_MS),
            kv_propagation_secs: settings.kv_propagation_secs,
            webhooks: Default::default(),
            records_in_messages: settings.mode == Mode::Durable,
        };
        let consumer_config = ConsumerConfig {
            consumer_tokens: Tokens::parse(CONSUMER_TOKEN),
            kv_propagation_secs: settings.kv_propagation_secs,
            ..ConsumerConfig::default()
        };
        let mut sim = Self {
            rules: settings.rules,
            now: EPOCH_MS,
            seq: 0,
            events: BinaryHeap::new(),
            loss_rate: [0.0, 0.01, 0.03][rng.range(0, 2) as usize],
            queue_send_fail_rate: [0.0, 0.02][rng.range(0, 1) as usize],
            consumer_fail_rate: [0.0, 0.05][rng.range(0, 1) as usize],
            cron_location: rng.range(0, locations as u64 - 1) as usize,
            rng,
            ids_rng,
            tasks_kv,
            buffer_kv,
            queue,
            dlq,
            api_config,
            consumer_config,
            counters: OpCounters::new(),
            kv_ops_limit: settings.kv.ops_per_invocation,
            lag: 0,
            executions: BTreeMap::new(),
            ops: Vec::new(),
            clients: Vec::new(),
            daemons: Vec::new(),
            arrakis: BTreeMap::new(),
            created_by: BTreeMap::new(),
            error_answered: BTreeMap::new(),
            accepted: BTreeMap::new(),
            arrakis_log: Vec::new(),
            task_keys: RefCell::default(),
            mode: settings.mode,
            objects: None,
            pushed: BTreeMap::new(),
            direct: BTreeMap::new(),
            outcome: Outcome { seed, ..Outcome::default() },
        };
        sim.plan();
        if sim.mode == Mode::Durable {
            sim.plan_objects();
        }
        sim
    }

    /// Chooses the servers, VMs, chains and faults of this seed.
    fn plan(&mut self) {
        let servers = self.rng.range(1, 2) as usize;
        let locations = LOCATIONS.len() as u64;
        for s in 0..servers {
            let location = self.rng.range(0, locations - 1) as usize;
            let mut partitions = Vec::new();
            if self.rng.chance(0.3) {
                let start = self.rng.range(0, 120_000);
                partitions.push((EPOCH_MS + start, EPOCH_MS + start + self.rng.range(10_000, 120_000)));
            }
            self.daemons.push(Daemon {
                server: format!("host-{}", s + 1),
                location,
                gen: 0,
                up: true,
                core: Core::new(),
                job: None,
                claim_ids: BTreeMap::new(),
                partitions,
                bell: None,
                last_full_list: 0,
                last_activity: 0,
                poll_seq: 0,
                idle: true,
                connected: false,
            });
            let first_poll = self.rng.range(0, 1_000);
            self.poll_in(s, first_poll);
            if self.rng.chance(0.3) {
                let at = self.rng.range(5_000, 120_000);
                self.schedule(at, Event::DaemonCrash { d: s });
            }
            if self.rng.chance(0.3) {
                let at = self.rng.range(5_000, 120_000);
                self.schedule(at, Event::DaemonMove { d: s });
            }
        }
        let vms = self.rng.range(2, 5) as usize;
        for v in 0..vms {
            let vm_name = format!("vm-{}", v + 1);
            let server = self.daemons[self.rng.range(0, servers as u64 - 1) as usize].server.clone();
            let location = self.rng.range(0, locations - 1) as usize;
            let watcher_location = (location + 1 + self.rng.range(0, locations - 2) as usize) % locations as usize;
            let mut kinds = vec![OperationKind::LaunchVm];
            for _ in 0..self.rng.range(0, 3) {
                kinds.push(OperationKind::RunCommand);
            }
            if self.rng.chance(0.5) {
                kinds.push(OperationKind::StopVm);
            }
            kinds.push(OperationKind::DeleteVm);
            let mut ops = Vec::new();
            for (step, kind) in kinds.into_iter().enumerate() {
                let body = match kind {
                    OperationKind::LaunchVm => json!({"type": "launch_vm", "payload": {
                        "vmName": vm_name, "vmConfig": {"memory": "1G"}, "targetServer": server}}),
                    OperationKind::RunCommand => json!({"type": "run_command", "payload": {
                        "vmName": vm_name, "command": format!("echo step-{step}")}}),
                    other => json!({"type": other.as_str(), "payload": {"vmName": vm_name}}),
                };
                ops.push(self.ops.len());
                self.ops.push(Op {
                    vm: v,
                    step,
                    kind,
                    body,
                    idempotency_key: format!("{vm_name}-step-{step}"),
                    tries: 0,
                    first_post_at: None,
                    accepted: None,
                });
            }
            self.clients.push(Client { vm_name, server, location, watcher_location, ops, next: 0, done_at: None });
            let start = self.rng.range(0, 20_000);
            self.schedule(start, Event::ClientPost { vm: v });
        }
        let first_sweep = self.rng.range(1_000, 60_000);
        self.schedule(first_sweep, Event::Sweep);
        self.trace(format!(
            "plan: {} server(s) {:?}, {} VM(s), loss {:.0}%, queue send failures {:.0}%, consumer failures {:.0}%, cron at {}",
            servers,
            self.daemons.iter().map(|d| format!("{}@{}", d.server, LOCATIONS[d.location])).collect::<Vec<_>>(),
            vms,
            self.loss_rate * 100.0,
            self.queue_send_fail_rate * 100.0,
            self.consumer_fail_rate * 100.0,
            LOCATIONS[self.cron_location],
        ));
        for c in &self.clients.clone() {
            let kinds: Vec<&str> = c.ops.iter().map(|&o| self.ops[o].kind.as_str()).collect();
            self.trace(format!(
                "plan: {} on {} from {} (watched from {}): {}",
                c.vm_name,
                c.server,
                LOCATIONS[c.location],
                LOCATIONS[c.watcher_location],
                kinds.join(", ")
            ));
        }
    }

    /// Schedules `event` `delay_ms` after the current event's last answer: an invocation that
    /// waited (a handler pacing its writes) answers that much later.
    fn schedule(&mut self, delay_ms: u64, event: Event) {
        self.seq += 1;
        self.events.push(Reverse((self.now + self.lag + delay_ms, self.seq, event)));
    }

    /// Notes when an invocation finished: what follows it happens after that.
    fn answered(&mut self, inv: &Invocation) {
        self.lag = self.lag.max(inv.now().saturating_sub(self.now));
    }

    fn schedule_at(&mut self, at: u64, event: Event) {
        let delay = at.saturating_sub(self.now + self.lag);
        self.schedule(delay, event);
    }

    fn trace(&mut self, line: String) {
        let t = self.now + self.lag - EPOCH_MS;
        self.outcome.trace.push(format!("{:>4}.{:03}s {line}", t / 1000, t % 1000));
    }

    fn run(&mut self) {
        while let Some(Reverse((at, _, event))) = self.events.pop() {
            self.now = at;
            self.lag = 0;
            if self.finished() {
                break;
            }
            self.step(event);
        }
        self.outcome.sim_ms = self.now - EPOCH_MS;
    }

    /// All clients are done and every accepted task is terminal with nothing in flight, or the
    /// settle time is up.
    fn finished(&self) -> bool {
        let Some(last) = self.clients.iter().map(|c| c.done_at).collect::<Option<Vec<_>>>() else { return false };
        let last = last.into_iter().max().unwrap_or(self.now);
        if self.now > last + SETTLE_MS {
            return true;
        }
        self.now > last + 120_000
            && self.queue.is_empty()
            && self.dlq.is_empty()
            && self.daemons.iter().all(|d| d.up)
            && self.accepted.keys().all(|id| self.central_task(*id).is_some_and(|t| t.status.is_terminal()))
    }

    fn central_task(&self, id: Uuid) -> Option<Task> {
        let key = self
            .task_keys
            .borrow_mut()
            .entry(id)
            .or_insert_with(|| self.tasks_kv.find_key("task:", &id.to_string()))
            .clone()?;
        self.tasks_kv.central(&key).and_then(|v| serde_json::from_str(&v).ok())
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::ClientPost { vm } => self.client_post(vm),
            Event::Cancel { task } => self.cancel(task),
            Event::Watch { task } => self.watch(task),
            Event::QueueDeliver => self.deliver(false),
            Event::DlqDeliver => self.deliver(true),
            Event::Sweep => self.sweep(),
            Event::DaemonPoll { d, gen, seq } if self.alive(d, gen) && self.daemons[d].poll_seq == seq => {
                self.daemons[d].idle = false;
                self.daemon_poll(d)
            }
            Event::DirectHandoff { key } => {
                if let (Some(tasks), Some(objects)) = (self.direct.remove(&key), self.objects.clone()) {
                    block_on(hand_off_directly(&objects.at(self.now), tasks));
                    self.carry_out_objects();
                }
            }
            Event::DaemonPush { d, gen, key } => {
                if let Some(tasks) = self.pushed.remove(&key) {
                    if self.alive(d, gen) && self.daemons[d].connected {
                        self.daemon_pushed(d, tasks);
                    }
                }
            }
            Event::ObjectAlarm { server, at, again } => self.object_alarm(&server, at, again),
            Event::ObjectEvict { server } if self.objects.as_ref().is_some_and(|o| o.evict(&server)) => {
                self.trace(format!("object {server}: evicted (its storage and alarm stay)"));
            }
            Event::DaemonClaim { d, gen } if self.alive(d, gen) => self.daemon_claim(d),
            Event::DaemonExecute { d, gen, key } => {
                if let Some((task, claim)) = self.executions.remove(&key) {
                    if self.alive(d, gen) {
                        match self.daemons[d].job.as_ref().and_then(|(_, kept)| kept.clone()) {
                            Some((ok, note)) => {
                                let server = self.daemons[d].server.clone();
                                self.trace(format!(
                                    "{server}: claimed {} again: reports its kept outcome",
                                    short(task.id)
                                ));
                                self.daemon_report(d, task.id, claim, ok, note, 0);
                            }
                            None => self.execute(d, &task, claim),
                        }
                    }
                }
            }
            Event::DaemonDone { d, gen, task, claim, ok, note } if self.alive(d, gen) => {
                self.daemon_report(d, task, claim, ok, note, 0)
            }
            Event::DaemonReport { d, gen, task, claim, ok, note, tries } if self.alive(d, gen) => {
                self.daemon_report(d, task, claim, ok, note, tries)
            }
            Event::DaemonCrash { d } => {
                let daemon = &mut self.daemons[d];
                daemon.up = false;
                daemon.gen += 1;
                daemon.core = Core::new();
                daemon.job = None;
                daemon.claim_ids.clear();
                daemon.bell = None;
                daemon.connected = false;
                let server = daemon.server.clone();
                let down = self.rng.range(5_000, 90_000);
                self.trace(format!("{server}: daemon CRASHES, restarts in {} s", down / 1000));
                self.schedule(down, Event::DaemonRestart { d });
            }
            Event::DaemonRestart { d } => {
                self.daemons[d].up = true;
                let gen = self.daemons[d].gen;
                let server = self.daemons[d].server.clone();
                self.trace(format!("{server}: daemon restarts (process {gen})"));
                self.poll_in(d, 0);
            }
            Event::DaemonMove { d } => {
                let to = (self.daemons[d].location + 1) % LOCATIONS.len();
                self.daemons[d].location = to;
                let server = self.daemons[d].server.clone();
                self.trace(format!("{server}: daemon's requests now land at {}", LOCATIONS[to]));
            }
            _ => {} // An event of a daemon process that has since crashed.
        }
    }

    fn alive(&self, d: usize, gen: u32) -> bool {
        self.daemons[d].up && self.daemons[d].gen == gen
    }

    // -----------------------------------------------------------------------------------------
    // Calling the edge

    fn invocation(&self, location: Location) -> Invocation {
        Invocation::new(location, self.now, self.kv_ops_limit)
    }

    /// One API worker invocation: returns the response, the messages it queued and the task
    /// ids it created.
    fn api(&mut self, location: Location, request: Request) -> (Response, Vec<Uuid>) {
        let inv = self.invocation(location);
        let objects = self.objects.as_ref().map(|o| o.at(self.now));
        let sent = SimQueueSend { sent: Rc::default(), fail: self.rng.chance(self.queue_send_fail_rate) };
        let created = Rc::new(RefCell::new(Vec::new()));
        let service = ApiService {
            tasks: TaskStore::new(self.tasks_kv.at(&inv)),
            buffer: BufferStore::new(self.buffer_kv.at(&inv)),
            // As the API worker: in the durable mode a queued task goes straight to its object
            // after the answer (`Event::DirectHandoff`).
            queue: HandoffQueue::new(sent.clone(), objects.is_some()),
            clock: inv.clock(),
            ids: SimIds { rng: self.ids_rng.clone(), created: created.clone() },
            config: &self.api_config,
            counters: &self.counters,
        };
        // The durable mode's front first (`api-worker`): cancels, reports and waits go to the
        // task's object; anything it leaves is the KV mode's.
        let fronted = objects.as_ref().and_then(|queues| {
            let front = ApiFront {
                tasks: &service.tasks,
                queues,
                client_tokens: &self.api_config.client_tokens,
                consumer_tokens: &self.api_config.consumer_tokens,
            };
            block_on(front.handle(&request))
        });
        let response = match fronted {
            Some(response) => response,
            None => block_on(service.handle(request)),
        };
        let handoffs = service.queue.take_handoffs();
        drop(service);
        self.answered(&inv);
        self.carry_out_objects();
        // `waitUntil` work: a few milliseconds after the answer, or never (the isolate went).
        if !handoffs.is_empty() && !self.rng.chance(self.loss_rate) {
            self.seq += 1;
            let key = self.seq;
            self.direct.insert(key, handoffs);
            let delay = self.rng.range(1, 50);
            self.schedule(delay, Event::DirectHandoff { key });
        }
        for message in sent.sent.borrow().iter() {
            let at = self.queue.send(self.now, serde_json::to_value(message).unwrap_or_default());
            self.schedule_at(at, Event::QueueDeliver);
        }
        let created = created.borrow().clone();
        (response, created)
    }

    fn consumer_service<'a>(
        &'a self,
        inv: &Invocation,
    ) -> ConsumerService<'a, crate::kv::SimKv, crate::kv::SimKv, crate::kv::InvocationClock, SimIds> {
        ConsumerService {
            tasks: TaskStore::new(self.tasks_kv.at(inv)),
            buffer: BufferStore::new(self.buffer_kv.at(inv)),
            clock: inv.clock(),
            ids: SimIds { rng: self.ids_rng.clone(), created: Rc::default() },
            config: &self.consumer_config,
            counters: &self.counters,
        }
    }

    fn consumer(&mut self, location: Location, request: Request) -> Response {
        let inv = self.invocation(location);
        let service = self.consumer_service(&inv);
        let registry = self.buffer_kv.at(&inv);
        let fronted = self.objects.as_ref().map(|o| o.at(self.now)).and_then(|queues| {
            let front =
                ConsumerFront::new(&service.tasks, &queues, &registry, &self.consumer_config, Timestamp(self.now));
            block_on(front.handle(&request))
        });
        let response = match fronted {
            Some(response) => response,
            None => block_on(service.handle(request)),
        };
        self.answered(&inv);
        self.carry_out_objects();
        response
    }

    /// Durable mode: the objects' pushes (each may be lost with the daemon's socket) and alarms.
    fn carry_out_objects(&mut self) {
        let Some(objects) = self.objects.clone() else { return };
        let outbox = objects.take_outbox();
        for (server, at) in outbox.alarms {
            self.schedule_at(at.max(self.now + self.lag + 1), Event::ObjectAlarm { server, at, again: false });
        }
        for (server, tasks) in outbox.pushes {
            for d in 0..self.daemons.len() {
                let daemon = &self.daemons[d];
                if daemon.server != server || !daemon.up || !daemon.connected {
                    continue;
                }
                let partitioned = daemon.partitions.iter().any(|&(from, to)| (from..to).contains(&self.now));
                if partitioned || self.rng.chance(self.loss_rate) {
                    self.daemons[d].connected = false;
                    self.trace(format!("{server}: push of {} task(s) LOST; the socket closed", tasks.len()));
                    continue;
                }
                self.seq += 1;
                let key = self.seq;
                self.pushed.insert(key, tasks.clone());
                let gen = self.daemons[d].gen;
                let delay = self.rng.range(20, 300);
                self.schedule(delay, Event::DaemonPush { d, gen, key });
            }
        }
    }

    /// Durable mode: one firing of a server's object alarm. Only the alarm set last fires (a
    /// new `setAlarm` replaces it), and sometimes it fires twice (at least once).
    fn object_alarm(&mut self, server: &str, at: u64, again: bool) {
        let Some(objects) = self.objects.clone() else { return };
        if !again && !objects.alarm_is(server, at) {
            return;
        }
        block_on(objects.alarm(server, self.now));
        if !again && self.rng.chance(0.05) {
            let delay = self.rng.range(0, 2_000);
            self.trace(format!("object {server}: alarm fires again in {delay} ms (at least once)"));
            self.schedule(delay, Event::ObjectAlarm { server: server.to_owned(), at, again: true });
        }
        self.carry_out_objects();
    }

    /// Durable mode: where each server's object lives, and when some are evicted.
    fn plan_objects(&mut self) {
        let locations = LOCATIONS.len() as u64;
        let placement: BTreeMap<String, Location> = (0..self.daemons.len())
            .map(|d| (self.daemons[d].server.clone(), self.rng.range(0, locations - 1) as usize))
            .collect();
        let config = ObjectConfig { lease_min_secs: self.consumer_config.lease_min_secs, ..ObjectConfig::default() };
        self.objects = Some(ObjectsModel::new(self.tasks_kv.clone(), config, placement.clone(), self.kv_ops_limit));
        for server in placement.keys() {
            if self.rng.chance(0.3) {
                let at = self.rng.range(5_000, 150_000);
                self.schedule(at, Event::ObjectEvict { server: server.clone() });
            }
            self.trace(format!("plan: object {server} at {}", LOCATIONS[placement[server]]));
        }
    }

    /// A daemon's request through the network: lost in either direction, or partitioned.
    fn daemon_call(&mut self, d: usize, api: bool, request: Request) -> Net {
        let location = self.daemons[d].location;
        let partitioned = self.daemons[d].partitions.iter().any(|&(from, to)| (from..to).contains(&self.now));
        if partitioned || self.rng.chance(self.loss_rate) {
            return Net::RequestLost;
        }
        let response = if api { self.api(location, request).0 } else { self.consumer(location, request) };
        if self.rng.chance(self.loss_rate) {
            Net::ResponseLost(response)
        } else {
            Net::Answered(response)
        }
    }

    // -----------------------------------------------------------------------------------------
    // Clients

    fn client_post(&mut self, vm: usize) {
        let client = self.clients[vm].clone();
        let Some(&op_index) = client.ops.get(client.next) else { return };
        let op = self.ops[op_index].clone();
        self.ops[op_index].tries += 1;
        self.ops[op_index].first_post_at.get_or_insert(self.now);
        let request = Request::new("POST", "/vm/tasks")
            .bearer(CLIENT_TOKEN)
            .header("idempotency-key", &op.idempotency_key)
            .json_body(&op.body);
        let lost_request = self.rng.chance(self.loss_rate);
        let (net, created) = if lost_request {
            (Net::RequestLost, Vec::new())
        } else {
            let (response, created) = self.api(client.location, request);
            if self.rng.chance(self.loss_rate) {
                (Net::ResponseLost(response), created)
            } else {
                (Net::Answered(response), created)
            }
        };
        for id in &created {
            self.created_by.insert(*id, (op_index, self.now));
        }
        let label = format!("{} step {} {}", client.vm_name, op.step, op.kind.as_str());
        match net {
            Net::Answered(r) if r.status == 202 || r.status == 200 => {
                let Ok(body) = r.json_body::<CreateTaskResponse>() else { return };
                let task = body.task_id;
                self.trace(format!(
                    "client@{}: POST {label} → {} task {}",
                    LOCATIONS[client.location],
                    r.status,
                    short(task)
                ));
                self.ops[op_index].accepted = Some(task);
                self.accepted.entry(task).or_insert(Accepted {
                    op: op_index,
                    accepted_at: self.now + self.lag,
                    cancel_ok: false,
                    cancel_requested: false,
                    claimed_at: None,
                });
                if op.kind != OperationKind::LaunchVm && self.rng.chance(0.2) {
                    let delay = self.rng.range(0, 4_000);
                    self.schedule(delay, Event::Cancel { task });
                }
                self.schedule(2_000, Event::Watch { task });
                self.client_next(vm);
            }
            other => {
                let what = match &other {
                    Net::RequestLost => "request lost".to_owned(),
                    Net::ResponseLost(r) => format!("response {} lost", r.status),
                    Net::Answered(r) => format!("{} {}", r.status, body_text(r)),
                };
                if let Net::Answered(r) = &other {
                    for id in &created {
                        self.error_answered.insert(*id, r.status);
                    }
                }
                let tries = self.ops[op_index].tries;
                let retryable = match &other {
                    Net::Answered(r) => r.status >= 500 || r.status == 429,
                    _ => true,
                };
                self.trace(format!(
                    "client@{}: POST {label} (try {tries}) → {what}{}",
                    LOCATIONS[client.location],
                    if created.is_empty() { String::new() } else { format!(" [created {}]", short(created[0])) }
                ));
                if retryable && tries < 5 {
                    self.schedule(1_000 << tries.min(4), Event::ClientPost { vm });
                } else {
                    self.trace(format!("client@{}: gives up on {label}", LOCATIONS[client.location]));
                    self.client_next(vm);
                }
            }
        }
    }

    fn client_next(&mut self, vm: usize) {
        self.clients[vm].next += 1;
        if self.clients[vm].next >= self.clients[vm].ops.len() {
            self.clients[vm].done_at = Some(self.now);
        } else {
            // At least a round trip: a client's next POST never shares the millisecond of
            // the last (ids of one millisecond sort randomly, so the edge could not order them).
            let think = self.rng.range(20, 3_000);
            self.schedule(think, Event::ClientPost { vm });
        }
    }

    fn cancel(&mut self, task: Uuid) {
        let Some(accepted) = self.accepted.get(&task) else { return };
        let client = self.clients[self.ops[accepted.op].vm].clone();
        let (r, _) =
            self.api(client.location, Request::new("DELETE", &format!("/vm/tasks/{task}")).bearer(CLIENT_TOKEN));
        self.trace(format!(
            "client@{}: DELETE task {} → {} {}",
            LOCATIONS[client.location],
            short(task),
            r.status,
            status_of(&r)
        ));
        if let Some(a) = self.accepted.get_mut(&task) {
            match r.status {
                200 => a.cancel_ok = true,
                202 => a.cancel_requested = true,
                _ => {}
            }
        }
    }

    fn watch(&mut self, task: Uuid) {
        let Some(accepted) = self.accepted.get(&task).cloned() else { return };
        let location = self.clients[self.ops[accepted.op].vm].watcher_location;
        let (r, _) = self.api(location, Request::new("GET", &format!("/vm/tasks/{task}/status")).bearer(CLIENT_TOKEN));
        let status = r.json_body::<TaskStatusResponse>().ok().map(|s| s.status);
        match status {
            Some(s) if s.is_terminal() => {
                if s == TaskStatus::Completed {
                    self.outcome.visible_latency_ms.push((self.now + self.lag).saturating_sub(accepted.accepted_at));
                }
                self.trace(format!("watcher@{}: task {} is {s}", LOCATIONS[location], short(task)));
            }
            _ if self.now > accepted.accepted_at + TERMINAL_BOUND_MS => {}
            _ => self.schedule(5_000, Event::Watch { task }),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Queue and cron

    fn deliver(&mut self, dead_letters: bool) {
        let batch = if dead_letters { self.dlq.take_batch(self.now) } else { self.queue.take_batch(self.now) };
        if batch.is_empty() {
            return;
        }
        let location = self.rng.range(0, LOCATIONS.len() as u64 - 1) as usize;
        let bodies: Vec<Value> = batch.iter().map(|m| m.body.clone()).collect();
        let failed = self.rng.chance(self.consumer_fail_rate);
        let decisions = if failed {
            None
        } else {
            let inv = self.invocation(location);
            let service = self.consumer_service(&inv);
            let decisions = if let Some(queues) = self.objects.as_ref().map(|o| o.at(self.now)).filter(|_| dead_letters)
            {
                let registry = self.buffer_kv.at(&inv);
                let front =
                    ConsumerFront::new(&service.tasks, &queues, &registry, &self.consumer_config, Timestamp(self.now));
                block_on(front.dead_letter_batch(&bodies))
            } else if dead_letters {
                block_on(service.dead_letter_batch(&bodies))
            } else if let Some(queues) = self.objects.as_ref().map(|o| o.at(self.now)) {
                // The deployed queue handler: the batch to its servers' objects.
                let registry = self.buffer_kv.at(&inv);
                let front =
                    ConsumerFront::new(&service.tasks, &queues, &registry, &self.consumer_config, Timestamp(self.now));
                block_on(front.deliver_batch(&bodies, &self.consumer_config)).deliveries
            } else {
                block_on(service.buffer_batch(&bodies))
            };
            self.answered(&inv);
            self.carry_out_objects();
            Some(decisions)
        };
        let ids: Vec<String> = bodies.iter().filter_map(|b| b["taskId"].as_str()?.parse().ok()).map(short).collect();
        let acks = decisions.as_ref().map(|d| d.iter().filter(|x| **x == Delivery::Ack).count());
        let settled = if dead_letters {
            self.dlq.settle(self.now + self.lag, batch, decisions.as_deref())
        } else {
            self.queue.settle(self.now + self.lag, batch, decisions.as_deref())
        };
        self.trace(format!(
            "{}@{}: batch [{}] → {}{}",
            if dead_letters { "dlq" } else { "queue" },
            LOCATIONS[location],
            ids.join(" "),
            match acks {
                None => "invocation FAILED, all retried".to_owned(),
                Some(a) => format!("{a} acked, {} retried", settled.retried),
            },
            if settled.dead_lettered.is_empty() {
                String::new()
            } else {
                format!(", {} dead-lettered", settled.dead_lettered.len())
            },
        ));
        for body in settled.dead_lettered {
            if dead_letters {
                self.trace(format!("dlq: message for {} dropped after its retries", body["taskId"]));
            } else {
                let at = self.dlq.send(self.now, body);
                self.schedule_at(at, Event::DlqDeliver);
            }
        }
        let next = if dead_letters { self.dlq.next_available() } else { self.queue.next_available() };
        if let Some(at) = next {
            self.schedule_at(at, if dead_letters { Event::DlqDeliver } else { Event::QueueDeliver });
        }
    }

    fn sweep(&mut self) {
        let inv = self.invocation(self.cron_location);
        if let Some(queues) = self.objects.as_ref().map(|o| o.at(self.now)) {
            // The durable mode's cron: leases end by each object's alarm; tasks whose queue
            // message was lost are handed to their objects again.
            let service = self.consumer_service(&inv);
            let registry = self.buffer_kv.at(&inv);
            let front =
                ConsumerFront::new(&service.tasks, &queues, &registry, &self.consumer_config, Timestamp(self.now));
            let look_back = self.consumer_config.max_queued_secs + 86_400;
            let recovered = block_on(front.reconcile(
                Timestamp(self.now),
                self.consumer_config.rebuffer_after_secs,
                look_back,
                900,
            ));
            self.answered(&inv);
            self.carry_out_objects();
            match recovered {
                Ok(0) => {}
                Ok(n) => self
                    .trace(format!("cron@{}: reconcile: {n} task(s) handed over again", LOCATIONS[self.cron_location])),
                Err(e) => self.trace(format!("cron@{}: reconcile failed: {e}", LOCATIONS[self.cron_location])),
            }
            return self.schedule(60_000, Event::Sweep);
        }
        let report = block_on(self.consumer_service(&inv).sweep());
        self.answered(&inv);
        match report {
            Ok(r) if r.returned_to_ready + r.failed + r.cleaned + r.rebuffered + r.rung > 0 => self.trace(format!(
                "cron@{}: sweep: {} returned, {} failed, {} cleaned, {} rebuffered, {} rung",
                LOCATIONS[self.cron_location], r.returned_to_ready, r.failed, r.cleaned, r.rebuffered, r.rung
            )),
            Ok(_) => {}
            Err(e) => self.trace(format!("cron@{}: sweep failed: {e}", LOCATIONS[self.cron_location])),
        }
        self.schedule(60_000, Event::Sweep);
    }

    // -----------------------------------------------------------------------------------------
    // Daemons

    fn poll_later(&mut self, d: usize, ms: u64) {
        let jitter = self.rng.range(0, 200);
        self.poll_in(d, ms + jitter);
    }

    /// Schedules the daemon's next poll in `ms`, replacing any scheduled before.
    fn poll_in(&mut self, d: usize, ms: u64) {
        let gen = self.daemons[d].gen;
        self.seq += 1;
        let seq = self.seq;
        self.daemons[d].poll_seq = seq;
        self.daemons[d].idle = true;
        self.schedule(ms, Event::DaemonPoll { d, gen, seq });
    }

    /// The next poll, quick while the daemon is busy, at the doorbell interval when idle.
    fn poll_again(&mut self, d: usize) {
        let hot = self.now < self.daemons[d].last_activity + HOT_FOR_MS;
        self.poll_later(d, if hot { HOT_POLL_MS } else { IDLE_POLL_MS });
    }

    /// One `GET /tasks/ready` with the last doorbell as `since` (a full listing without it every
    /// `RELIST_SECONDS`): the daemon's long poll, one doorbell check per call. The listing
    /// answers only when the doorbell changed, as the daemon's location reads it.
    fn daemon_poll(&mut self, d: usize) {
        if self.mode == Mode::Durable {
            return self.daemon_poll_durable(d);
        }
        let server = self.daemons[d].server.clone();
        let full = self.daemons[d].bell.is_none() || self.now >= self.daemons[d].last_full_list + RELIST_MS;
        let since = if full { None } else { self.daemons[d].bell.clone() };
        let mut path = format!("/tasks/ready?server={server}&limit=100");
        if let Some(bell) = &since {
            path.push_str(&format!("&since={bell}"));
        }
        let ready = match self.daemon_call(d, false, Request::new("GET", &path).bearer(CONSUMER_TOKEN)) {
            Net::Answered(r) if r.status == 200 => match r.json_body::<ReadyTasksResponse>() {
                Ok(ready) => ready,
                Err(_) => return self.poll_later(d, 1_000),
            },
            Net::Answered(_) => return self.poll_later(d, 1_000),
            _ => return self.poll_later(d, 5_000),
        };
        if since.as_deref() != Some(ready.bell.as_str()) {
            if full {
                self.daemons[d].last_full_list = self.now;
            }
            if std::env::var_os("SIM_DEBUG").is_some() {
                let ids: Vec<String> = ready.tasks.iter().map(|t| short(t.task_id)).collect();
                self.trace(format!("{server}: listed [{}]", ids.join(" ")));
            }
            self.daemons[d].core.listed(ready.tasks, ready.list_complete);
        }
        self.daemons[d].bell = Some(ready.bell);
        self.pick_and_claim(d);
    }

    /// The durable mode's wait for work (`EdgeClient::ready`): pushes over the socket to the
    /// server's object while it is open, opened again (the object then sends everything
    /// claimable) when it closed; a full HTTP listing every `RELIST_SECONDS`.
    fn daemon_poll_durable(&mut self, d: usize) {
        let server = self.daemons[d].server.clone();
        let location = LOCATIONS[self.daemons[d].location];
        let partitioned = self.daemons[d].partitions.iter().any(|&(from, to)| (from..to).contains(&self.now));
        if partitioned && self.daemons[d].connected {
            self.daemons[d].connected = false;
            self.trace(format!("{server}@{location}: socket closed (partitioned)"));
        }
        if !self.daemons[d].connected {
            if partitioned || self.rng.chance(self.loss_rate) {
                return self.poll_later(d, 5_000);
            }
            let Some(objects) = self.objects.clone() else { return };
            let tasks = objects.connect(&server, self.now);
            self.carry_out_objects();
            let ids: Vec<String> = tasks.iter().map(|t| short(t.task_id)).collect();
            self.trace(format!("{server}@{location}: socket opened; the object sends [{}]", ids.join(" ")));
            let daemon = &mut self.daemons[d];
            daemon.connected = true;
            // A push (`EdgeClient::ready`): a partial listing.
            daemon.core.listed(tasks, false);
            daemon.last_full_list = self.now;
        } else if self.now >= self.daemons[d].last_full_list + RELIST_MS {
            let path = format!("/tasks/ready?server={server}&limit=1000");
            match self.daemon_call(d, false, Request::new("GET", &path).bearer(CONSUMER_TOKEN)) {
                Net::Answered(r) if r.status == 200 => {
                    if let Ok(ready) = r.json_body::<ReadyTasksResponse>() {
                        self.daemons[d].core.listed(ready.tasks, ready.list_complete);
                        self.daemons[d].last_full_list = self.now;
                    }
                }
                _ => return self.poll_later(d, 5_000),
            }
        }
        self.pick_and_claim(d);
    }

    /// Ready tasks pushed by the object: added to what the daemon knows; an idle daemon
    /// looks at once.
    fn daemon_pushed(&mut self, d: usize, tasks: Vec<BufferedTask>) {
        let server = self.daemons[d].server.clone();
        let ids: Vec<String> = tasks.iter().map(|t| short(t.task_id)).collect();
        self.trace(format!("{server}: pushed [{}]", ids.join(" ")));
        let daemon = &mut self.daemons[d];
        daemon.core.listed(tasks, false);
        daemon.last_activity = self.now;
        if daemon.idle {
            self.poll_later(d, 0);
        }
    }

    /// The daemon's clock reading for its decisions: simulated time since the model's epoch.
    fn clock(&self) -> Duration {
        Duration::from_millis(self.now)
    }

    /// Ends the daemon's current job so (`Daemon::job_ended`).
    fn job_ended(&mut self, d: usize, end: JobEnd<Duration, KeptOutcome>) {
        let now = self.clock();
        let daemon = &mut self.daemons[d];
        daemon.job = None;
        if matches!(end, JobEnd::Finished(_)) {
            daemon.last_activity = self.now;
        }
        daemon.core.ended(end, now);
    }

    /// Starts what the daemon's decisions say may start (`Daemon::start_runnable` with one
    /// slot): its predecessor checked with the API unless seen finishing here
    /// (`job`'s first step), then its claim; or polls again.
    fn pick_and_claim(&mut self, d: usize) {
        while self.daemons[d].job.is_none() {
            let now = self.clock();
            let Some(Start { task, previous_done, unreported }) = self.daemons[d].core.next(now) else { break };
            self.daemons[d].job = Some((task.clone(), unreported));
            if let Some(previous) = task.previous_task_id.filter(|_| !previous_done) {
                let checked = self.previous_finished(d, previous, task.created_at);
                if let Some(end) = decide::after_predecessor_check(task, checked, self.clock()) {
                    self.job_ended(d, end);
                    continue;
                }
            }
            let gen = self.daemons[d].gen;
            self.schedule(0, Event::DaemonClaim { d, gen });
            return;
        }
        self.poll_again(d);
    }

    /// `daemon::previous_finished`: asks the API about the predecessor, along the chain as
    /// `decide::predecessor` says.
    fn previous_finished(&mut self, d: usize, previous: Uuid, created_at: Timestamp) -> Result<bool, EdgeError> {
        let servers = [self.daemons[d].server.clone()];
        let mut previous = previous;
        for _ in 0..decide::CANCELLED_PREDECESSORS_MAX {
            let request = Request::new("GET", &format!("/vm/tasks/{previous}/status")).bearer(CONSUMER_TOKEN);
            let status = match self.daemon_call(d, true, request) {
                Net::Answered(r) if r.status == 404 => None,
                Net::Answered(r) => Some(daemon_edge::answer::<TaskStatusResponse>(r.status, &raw_text(&r), "status")?),
                other => return Err(EdgeError::Transient(net_text(&other))),
            };
            let verdict = decide::predecessor(status.as_ref(), &servers, created_at, Timestamp(self.now));
            if status.is_none() {
                let server = &servers[0];
                let what = if verdict == Predecessor::Done { "treated as finished" } else { "waiting" };
                self.trace(format!("{server}: predecessor {} not found (404): {what}", short(previous)));
            }
            match verdict {
                Predecessor::Done => return Ok(true),
                Predecessor::NotYet => return Ok(false),
                Predecessor::Before(before) => previous = before,
            }
        }
        Ok(false)
    }

    /// The current job's claim (`EdgeClient::claim`), and what its answer means
    /// (`decide::claim_refused`, `decide::after_claim`).
    fn daemon_claim(&mut self, d: usize) {
        let Some((entry, _)) = self.daemons[d].job.clone() else { return };
        let task = entry.task_id;
        let gen = self.daemons[d].gen;
        let claim_id = match self.daemons[d].claim_ids.get(&task) {
            Some(id) => *id,
            None => {
                let id = uuid::Builder::from_random_bytes(self.rng.bytes16()).into_uuid();
                self.daemons[d].claim_ids.insert(task, id);
                id
            }
        };
        let server = self.daemons[d].server.clone();
        let consumer_id = format!("{server}-p{gen}");
        let mut path = format!("/tasks/{task}/claim");
        if self.mode == Mode::Durable {
            // Names the object to ask (`EdgeClient::claim`).
            path.push_str(&format!("?server={server}"));
        }
        let request = Request::new("POST", &path).bearer(CONSUMER_TOKEN).json_body(&json!({
            "consumerId": consumer_id, "claimId": claim_id, "bufferedAt": entry.buffered_at,
        }));
        let location = LOCATIONS[self.daemons[d].location];
        let net = self.daemon_call(d, false, request);
        let answered = match &net {
            Net::Answered(r) => daemon_edge::answer::<ClaimResponse>(r.status, &raw_text(r), "claim")
                .map(|claim| local_consumer::edge::ClaimOutcome::Claimed(Box::new(claim)))
                .or_else(|e| decide::claim_refused(e, Timestamp(self.now))),
            other => Err(EdgeError::Transient(net_text(other))),
        };
        let claim = match decide::after_claim(entry, answered, self.clock()) {
            Ok(claim) => claim,
            Err(end) => {
                self.trace(format!(
                    "{server}@{location}: claim of {} → {}: {}",
                    short(task),
                    net_text(&net),
                    job_end_text(&end)
                ));
                self.job_ended(d, end);
                return self.poll_later(d, 200);
            }
        };
        self.trace(format!(
            "{server}@{location}: claimed task {} ({} {}, attempt {}, after {})",
            short(task),
            claim.task.vm_name(),
            claim.task.kind().as_str(),
            claim.task.attempts,
            claim.task.previous_task_id.map(short).unwrap_or_else(|| "nothing".into())
        ));
        self.daemons[d].last_activity = self.now;
        if let Some(a) = self.accepted.get_mut(&task) {
            if a.claimed_at.is_none() {
                a.claimed_at = Some(self.now + self.lag);
                // The direct hand-off can have the task claimed before its 202 reaches the client.
                let latency = (self.now + self.lag).saturating_sub(a.accepted_at);
                self.outcome.claim_latency_ms.push(latency);
                if self.ops[a.op].step == 0 {
                    self.outcome.first_claim_latency_ms.push(latency);
                }
            }
        }
        self.seq += 1;
        let key = self.seq;
        self.executions.insert(key, (claim.task, claim.claim_id));
        self.schedule(0, Event::DaemonExecute { d, gen, key });
    }

    /// Runs the task on the in-memory Arrakis: the effect happens now, the report when the
    /// work would have finished.
    fn execute(&mut self, d: usize, task: &Task, claim: Uuid) {
        let server = self.daemons[d].server.clone();
        let vm = task.vm_name().to_owned();
        let key = (server.clone(), vm.clone());
        let state = self.arrakis.get(&key).copied();
        let kind = task.kind();
        let (mutating, ok, note, duration) = match kind {
            OperationKind::LaunchVm => match state {
                Some(_) => (false, true, "already running: nothing to do".to_owned(), 100),
                None => {
                    self.arrakis.insert(key, VmState::Running);
                    (true, true, "launched".to_owned(), self.rng.range(1_000, 8_000))
                }
            },
            // The daemon's own rule (`decide::not_resent`), unless the old daemon is modelled.
            OperationKind::RunCommand
                if !self.rules.resend_commands_on_reclaim && decide::not_resent(task).is_some() =>
            {
                (false, false, "an earlier attempt may have run it; not re-sent".to_owned(), 50)
            }
            OperationKind::RunCommand => match state {
                Some(VmState::Running) => (true, true, "command ran".to_owned(), self.rng.range(100, 2_000)),
                _ => (false, false, "VM is not running".to_owned(), 50),
            },
            OperationKind::StopVm => match state {
                Some(VmState::Running) => {
                    self.arrakis.insert(key, VmState::Stopped);
                    (true, true, "stopped".to_owned(), self.rng.range(500, 3_000))
                }
                Some(VmState::Stopped) => (false, true, "already stopped".to_owned(), 50),
                None => (false, false, "VM not found".to_owned(), 50),
            },
            OperationKind::DeleteVm => match state {
                Some(_) => {
                    self.arrakis.remove(&key);
                    (true, true, "deleted".to_owned(), self.rng.range(500, 3_000))
                }
                None => (false, true, "already gone".to_owned(), 50),
            },
            _ => (false, true, "not modelled".to_owned(), 50),
        };
        self.arrakis_log.push(ArrakisCall { at: self.now, task: task.id, vm: vm.clone(), mutating });
        self.trace(format!(
            "{server}: arrakis {} {vm} for task {}: {note}{}",
            kind.as_str(),
            short(task.id),
            if mutating { "" } else { " (look only)" }
        ));
        let gen = self.daemons[d].gen;
        self.schedule(duration, Event::DaemonDone { d, gen, task: task.id, claim, ok, note });
    }

    fn daemon_report(&mut self, d: usize, task: Uuid, claim: Uuid, ok: bool, note: String, tries: u32) {
        let status = if ok { "completed" } else { "failed" };
        let mut body = json!({"status": status, "claimId": claim, "message": note});
        if !ok {
            body["error"] = json!(note);
        }
        let request = Request::new("PUT", &format!("/vm/tasks/{task}/status")).bearer(CONSUMER_TOKEN).json_body(&body);
        let server = self.daemons[d].server.clone();
        let location = LOCATIONS[self.daemons[d].location];
        let net = self.daemon_call(d, true, request);
        let answer = match &net {
            Net::Answered(r) => daemon_edge::answer::<Value>(r.status, &raw_text(r), "report").map(drop),
            other => Err(EdgeError::Transient(net_text(other))),
        };
        // The daemon's reading of the answer (`decide::after_report`); its retries are the
        // model's own schedule below.
        let content_refused_before = !ok && note.starts_with(REPORT_CONTENT_REFUSED);
        match decide::after_report(&answer, content_refused_before) {
            AfterReport::Accepted => {
                self.trace(format!("{server}@{location}: report {status} for {} → {}", short(task), net_text(&net)));
                self.job_ended(d, JobEnd::Finished(task));
                self.poll_later(d, 0);
            }
            AfterReport::Keep => {
                // The daemon keeps the outcome and reports it, without running the task again,
                // when it claims the task again (`JobEnd::Unreported`).
                self.trace(format!(
                    "{server}@{location}: report {status} for {} → {}: kept to report on the next claim",
                    short(task),
                    net_text(&net)
                ));
                self.keep_unreported(d, task, ok, note);
            }
            AfterReport::ReportFailedInstead => {
                self.trace(format!(
                    "{server}@{location}: report {status} for {} → {}: reported failed instead",
                    short(task),
                    net_text(&net)
                ));
                let gen = self.daemons[d].gen;
                let note = format!("{REPORT_CONTENT_REFUSED} ({})", net_text(&net));
                self.schedule(0, Event::DaemonReport { d, gen, task, claim, ok: false, note, tries: 0 });
            }
            AfterReport::Retry => {
                self.trace(format!(
                    "{server}@{location}: report {status} for {} (try {}) → {}",
                    short(task),
                    tries + 1,
                    net_text(&net)
                ));
                if tries < 20 {
                    let gen = self.daemons[d].gen;
                    let delay = (1_000u64 << tries.min(5)).min(30_000);
                    self.schedule(delay, Event::DaemonReport { d, gen, task, claim, ok, note, tries: tries + 1 });
                } else {
                    self.keep_unreported(d, task, ok, note);
                }
            }
        }
    }

    /// `JobEnd::Unreported`: the outcome is reported, not run again, on the next claim.
    fn keep_unreported(&mut self, d: usize, task: Uuid, ok: bool, note: String) {
        let at = Duration::from_millis(self.now + self.lag) + decide::UNREPORTED_RETRY;
        match self.daemons[d].job.clone() {
            Some((entry, _)) if entry.task_id == task => {
                self.job_ended(d, JobEnd::Unreported(entry, Box::new((ok, note)), at));
            }
            _ => {}
        }
        self.poll_later(d, 0);
    }

    // -----------------------------------------------------------------------------------------
    // Invariants

    fn check(&mut self) {
        let mut violations = Vec::new();
        // 1. Every accepted task reaches a terminal state within the bound.
        let first_terminal = self.first_terminal_writes();
        for (id, a) in &self.accepted {
            match self.central_task(*id) {
                Some(t) if t.status.is_terminal() => {
                    if let Some(&at) = first_terminal.get(id) {
                        if at > a.accepted_at + TERMINAL_BOUND_MS {
                            violations.push(format!(
                                "not-terminal-in-time: task {} became terminal {} s after it was accepted (bound {} s)",
                                short(*id),
                                (at - a.accepted_at) / 1000,
                                TERMINAL_BOUND_MS / 1000
                            ));
                        }
                    }
                }
                Some(t) => violations.push(format!(
                    "not-terminal-in-time: task {} ({} {}) accepted at {} s is still {} at the end ({} s)",
                    short(*id),
                    t.vm_name(),
                    t.kind().as_str(),
                    (a.accepted_at - EPOCH_MS) / 1000,
                    t.status,
                    (self.now - EPOCH_MS) / 1000
                )),
                None => {
                    violations.push(format!("not-terminal-in-time: task {} was accepted but has no record", short(*id)))
                }
            }
        }
        // 2. No operation reaches Arrakis twice (a look that changes nothing is a safe repeat).
        let mut changes_per_op: BTreeMap<usize, Vec<&ArrakisCall>> = BTreeMap::new();
        for call in self.arrakis_log.iter().filter(|c| c.mutating) {
            if let Some(&(op, _)) = self.created_by.get(&call.task) {
                changes_per_op.entry(op).or_default().push(call);
            }
        }
        for (op, calls) in &changes_per_op {
            if calls.len() > 1 {
                let o = &self.ops[*op];
                violations.push(format!(
                    "reached-arrakis-twice: {} step {} ({}) changed Arrakis {} times: {}",
                    self.clients[o.vm].vm_name,
                    o.step,
                    o.kind.as_str(),
                    calls.len(),
                    calls
                        .iter()
                        .map(|c| format!("task {} at {} s", short(c.task), (c.at - EPOCH_MS) / 1000))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        // 3. A cancel answered 200 never reaches Arrakis.
        for call in &self.arrakis_log {
            if self.accepted.get(&call.task).is_some_and(|a| a.cancel_ok) {
                violations.push(format!(
                    "cancelled-but-ran: task {} ({}) was cancelled with a 200 but reached Arrakis at {} s",
                    short(call.task),
                    call.vm,
                    (call.at - EPOCH_MS) / 1000
                ));
            }
        }
        // 3b. A cancel answered 202 ends cancelled only if the operation never reached Arrakis;
        //     otherwise the task ends with the operation's own result.
        for call in &self.arrakis_log {
            let requested = self.accepted.get(&call.task).is_some_and(|a| a.cancel_requested && !a.cancel_ok);
            if requested && self.central_task(call.task).is_some_and(|t| t.status == TaskStatus::Cancelled) {
                violations.push(format!(
                    "requested-cancel-ran: task {} ({}) had its cancel answered 202, ended cancelled, but reached Arrakis at {} s",
                    short(call.task),
                    call.vm,
                    (call.at - EPOCH_MS) / 1000
                ));
            }
        }
        // 4. A terminal state never changes (in last-write-wins order of the task's record).
        violations.extend(self.terminal_changes());
        // 5. Per-VM order: a VM's operations reach Arrakis in submission order.
        let mut last_step: BTreeMap<String, (usize, Uuid)> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for call in &self.arrakis_log {
            let Some(&(op, _)) = self.created_by.get(&call.task) else { continue };
            if !seen.insert(op) {
                continue;
            }
            let step = self.ops[op].step;
            if let Some(&(prev_step, prev_task)) = last_step.get(&call.vm) {
                if step < prev_step {
                    violations.push(format!(
                        "order: {}: step {step} (task {}) reached Arrakis after step {prev_step} (task {})",
                        call.vm,
                        short(call.task),
                        short(prev_task)
                    ));
                }
            }
            last_step.insert(call.vm.clone(), (step, call.task));
        }
        // 6. A task whose POST was answered with an error never runs: the client was told it
        //    was not accepted (and retries it).
        for call in &self.arrakis_log {
            if let Some(status) = self.error_answered.get(&call.task) {
                violations.push(format!(
                    "error-answer-but-ran: task {} ({}) reached Arrakis although its POST was answered {status}",
                    short(call.task),
                    call.vm
                ));
            }
        }
        violations.dedup();
        self.outcome.accepted = self.accepted.len();
        self.outcome.violations = violations;
    }

    fn record_status(value: &Option<String>) -> Option<TaskStatus> {
        value
            .as_ref()
            .and_then(|v| serde_json::from_str::<Value>(v).ok())
            .and_then(|v| v.get("status").and_then(|s| serde_json::from_value::<TaskStatus>(s.clone()).ok()))
    }

    fn first_terminal_writes(&self) -> BTreeMap<Uuid, u64> {
        let mut out = BTreeMap::new();
        for w in self.tasks_kv.write_log() {
            let Some(id) = task_of_key(&w.key) else { continue };
            if Self::record_status(&w.value).is_some_and(|s| s.is_terminal()) {
                out.entry(id).or_insert(w.at);
            }
        }
        out
    }

    fn terminal_changes(&self) -> Vec<String> {
        let mut by_key: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for w in self.tasks_kv.write_log() {
            if task_of_key(&w.key).is_some() {
                by_key.entry(w.key.clone()).or_default().push(w);
            }
        }
        let mut out = Vec::new();
        for (key, mut writes) in by_key {
            writes.sort_by_key(|w| w.stamp);
            let mut terminal: Option<(TaskStatus, u64, usize)> = None;
            for w in writes {
                let Some(status) = Self::record_status(&w.value) else { continue };
                match terminal {
                    Some((t, at, loc)) if status != t => {
                        out.push(format!(
                            "terminal-changed: task {} was {t} (written at {} s at {}) and then {status} (written at {} s at {})",
                            task_of_key(&key).map(short).unwrap_or_default(),
                            (at - EPOCH_MS) / 1000,
                            LOCATIONS[loc],
                            (w.at - EPOCH_MS) / 1000,
                            LOCATIONS[w.location]
                        ));
                        break;
                    }
                    None if status.is_terminal() => terminal = Some((status, w.at, w.location)),
                    _ => {}
                }
            }
        }
        out
    }
}

/// The invariant a violation message breaks: the text before its first colon.
pub fn violation_kind(violation: &str) -> &str {
    violation.split(':').next().unwrap_or(violation)
}

fn task_of_key(key: &str) -> Option<Uuid> {
    key.strip_prefix("task:").and_then(|rest| rest.rsplit(':').next()).and_then(|id| id.parse().ok())
}

fn short(id: Uuid) -> String {
    id.simple().to_string()[..8].to_owned() + "…" + &id.simple().to_string()[28..]
}

fn raw_text(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn body_text(r: &Response) -> String {
    let text = String::from_utf8_lossy(&r.body);
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    v.get("error")
        .and_then(|e| e.get("message").or(Some(e)))
        .map(|m| m.to_string())
        .unwrap_or_else(|| text.chars().take(120).collect())
}

fn status_of(r: &Response) -> String {
    let v: Value = r.json_body().unwrap_or(Value::Null);
    match v.get("status").and_then(Value::as_str) {
        Some(s) => format!("({s})"),
        None => format!("({})", body_text(r)),
    }
}

fn job_end_text<T, U>(end: &JobEnd<T, U>) -> &'static str {
    match end {
        JobEnd::Finished(_) => "finished",
        JobEnd::Cancelled(_) => "terminal: never again, vouches for no successor",
        JobEnd::Deferred(..) => "tried again later",
        JobEnd::Unreported(..) => "kept to report",
        JobEnd::NotVisible(_) => "not visible yet: retried with backoff",
        JobEnd::ClaimUnanswered(..) => "no answer: tried again whatever the listings say",
    }
}

fn net_text(net: &Net) -> String {
    match net {
        Net::RequestLost => "request lost".into(),
        Net::ResponseLost(r) => format!("response {} lost", r.status),
        Net::Answered(r) => format!("{} {}", r.status, body_text(r)),
    }
}
