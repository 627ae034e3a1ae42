//! The [`Simulator`] handle: shared state, fault controls, the request log and the state dump
//! that in-process tests use directly and the `/_sim/` routes expose over HTTP.
//!
//! Locks are plain `std::sync::Mutex`es held only for short synchronous sections, never
//! across an `.await`; when two are needed the order is world, then control, then log.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigPatch, Op, SimConfig};
use crate::world::{WirePortForward, World};

/// The message of a random injected fault; clients must treat it as transient.
pub const INJECTED_FAULT: &str = "Internal Server Error: injected fault";

/// How an armed fault answers the next request of its operation, before it takes effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Failure {
    /// An error body `{"error":{"message":…}}` with this HTTP status.
    Respond { status: u16, message: String },
    /// Close the connection without any response, like the real server after a panic.
    Drop,
}

impl Failure {
    pub fn status(status: u16, message: impl Into<String>) -> Self {
        Failure::Respond { status, message: message.into() }
    }
}

/// SplitMix64: tiny, seedable, and good enough to pick which requests fail.
#[derive(Debug, Clone)]
pub(crate) struct Prng(u64);

impl Prng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Derives the list-shuffle seed from the fault seed.
const LIST_SALT: u64 = 0x005E_ED0F_115D;

/// Everything tests can arm or tune.
#[derive(Debug)]
pub(crate) struct Control {
    pub(crate) config: SimConfig,
    /// Draws one number per request that reaches the fault stage, so the fault pattern is a
    /// function of the seed and the request order only.
    fault_rng: Prng,
    /// Kept apart from `fault_rng` so list shuffling never shifts the fault sequence.
    pub(crate) list_rng: Prng,
    fail_next: BTreeMap<Op, std::collections::VecDeque<Failure>>,
    zombies: u32,
}

impl Control {
    fn new(config: SimConfig) -> Self {
        let seed = config.seed;
        Self {
            config,
            fault_rng: Prng::new(seed),
            list_rng: Prng::new(seed ^ LIST_SALT),
            fail_next: BTreeMap::new(),
            zombies: 0,
        }
    }

    fn reseed(&mut self, seed: u64) {
        self.fault_rng = Prng::new(seed);
        self.list_rng = Prng::new(seed ^ LIST_SALT);
    }
}

/// One request as the simulator saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    /// Arrival order, from 1.
    pub seq: u64,
    /// Milliseconds since the simulator was created (fractional, monotonic clock).
    pub start_ms: f64,
    pub end_ms: f64,
    pub method: String,
    /// The path as sent, still percent-encoded.
    pub path: String,
    pub query: Option<String>,
    /// `None` for router-level answers (404, 405, 301).
    pub op: Option<Op>,
    /// The decoded `{name}` path segment, or `vmName` of a POST /v1/vms.
    pub vm_name: Option<String>,
    /// `None` when no response was sent (dropped or cancelled).
    pub status: Option<u16>,
    /// A random fault, a fail-next or a zombie hook answered this request.
    pub fault_injected: bool,
    /// The simulator closed the connection without a response.
    pub dropped: bool,
    /// The client went away before the response was ready.
    pub cancelled: bool,
    /// The request body, cut at 4 KiB.
    pub request_body: String,
}

pub(crate) struct Inner {
    pub(crate) world: Mutex<World>,
    pub(crate) control: Mutex<Control>,
    log: Mutex<Vec<LogEntry>>,
    seq: AtomicU64,
    epoch: Instant,
    /// Ends background guest commands when the simulator's server shuts down.
    pub(crate) shutdown: CancellationToken,
}

/// A simulated Arrakis server. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Simulator {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Simulator {
    pub fn new(config: SimConfig) -> Self {
        let world = World::new(config.port_range);
        Self {
            inner: Arc::new(Inner {
                world: Mutex::new(world),
                control: Mutex::new(Control::new(config)),
                log: Mutex::new(Vec::new()),
                seq: AtomicU64::new(0),
                epoch: Instant::now(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    pub(crate) fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.inner.world)
    }

    pub(crate) fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.inner.control)
    }

    /// The current options.
    pub fn config(&self) -> SimConfig {
        self.control().config.clone()
    }

    /// Changes options in place. A changed seed restarts the fault sequence.
    pub fn update_config(&self, f: impl FnOnce(&mut SimConfig)) {
        let mut world = self.world();
        let mut control = self.control();
        let old_seed = control.config.seed;
        f(&mut control.config);
        control.config.error_rate = control.config.error_rate.clamp(0.0, 1.0);
        if control.config.seed != old_seed {
            let seed = control.config.seed;
            control.reseed(seed);
        }
        world.set_port_range(control.config.port_range);
    }

    /// Applies a `PUT /_sim/config` body. A `seed` field always restarts the fault sequence.
    pub fn apply_config(&self, patch: &ConfigPatch) -> Result<SimConfig, String> {
        let mut world = self.world();
        let mut control = self.control();
        let mut next = control.config.clone();
        next.apply(patch)?;
        control.config = next;
        if let Some(seed) = patch.seed {
            control.reseed(seed);
        }
        world.set_port_range(control.config.port_range);
        Ok(control.config.clone())
    }

    pub fn set_latency(&self, op: Op, delay: Duration) {
        self.update_config(|c| {
            c.latency.insert(op, delay);
        });
    }

    /// Sets the injected-500 probability and restarts the fault sequence from `seed`.
    pub fn set_error_rate(&self, rate: f64, seed: u64) {
        let mut control = self.control();
        control.config.error_rate = rate.clamp(0.0, 1.0);
        control.config.seed = seed;
        control.reseed(seed);
    }

    /// Makes requests for `ops` sleep `duration` before being handled; empty `ops` clears it.
    pub fn set_hang(&self, ops: impl IntoIterator<Item = Op>, duration: Duration) {
        let ops = ops.into_iter().collect();
        self.update_config(|c| {
            c.hang_ops = ops;
            c.hang_for = duration;
        });
    }

    /// Answers the next request of `op` with `failure` instead of handling it.
    pub fn fail_next(&self, op: Op, failure: Failure) {
        self.fail_next_times(op, failure, 1);
    }

    /// Like [`Simulator::fail_next`] for the next `count` requests of `op`.
    pub fn fail_next_times(&self, op: Op, failure: Failure, count: u32) {
        let mut control = self.control();
        let queue = control.fail_next.entry(op).or_default();
        for _ in 0..count {
            queue.push_back(failure.clone());
        }
    }

    /// The next start of a new name registers the VM (RUNNING, resources held) and then
    /// fails with the boot 500, leaving a zombie (§2.3).
    pub fn zombie_next(&self) {
        self.control().zombies += 1;
    }

    pub(crate) fn take_zombie(&self) -> bool {
        let mut control = self.control();
        if control.zombies > 0 {
            control.zombies -= 1;
            true
        } else {
            false
        }
    }

    /// The fault stage of a request: an armed failure for `op`, else a random draw.
    pub(crate) fn take_fault(&self, op: Op) -> Option<Failure> {
        let mut control = self.control();
        let draw = control.fault_rng.next_f64();
        if let Some(failure) = control.fail_next.get_mut(&op).and_then(|q| q.pop_front()) {
            return Some(failure);
        }
        (draw < control.config.error_rate).then(|| Failure::status(500, INJECTED_FAULT))
    }

    /// Destroys every VM and resets the allocators, as a server restart does; snapshots stay.
    pub fn restart(&self) {
        let mut world = self.world();
        let range = self.control().config.port_range;
        world.restart(range);
    }

    /// Every logged request so far, in arrival order.
    pub fn log(&self) -> Vec<LogEntry> {
        let mut entries = lock(&self.inner.log).clone();
        entries.sort_by_key(|e| e.seq);
        entries
    }

    /// Logged requests for one operation, in arrival order.
    pub fn log_for(&self, op: Op) -> Vec<LogEntry> {
        self.log().into_iter().filter(|e| e.op == Some(op)).collect()
    }

    pub fn clear_log(&self) -> usize {
        let mut log = lock(&self.inner.log);
        let n = log.len();
        log.clear();
        n
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn now_ms(&self) -> f64 {
        self.inner.epoch.elapsed().as_secs_f64() * 1000.0
    }

    pub(crate) fn record(&self, entry: LogEntry) {
        lock(&self.inner.log).push(entry);
    }

    /// A snapshot of the simulated server's state.
    pub fn state(&self) -> StateView {
        let world = self.world();
        let control = self.control();
        let mut vms: Vec<VmView> = world
            .vms
            .values()
            .map(|vm| {
                let wire = vm.wire();
                VmView {
                    vm_name: wire.vm_name,
                    status: wire.status,
                    ip: wire.ip,
                    tap_device_name: wire.tap_device_name,
                    port_forwards: wire.port_forwards,
                    cid: vm.cid,
                    restored: vm.restored,
                    files: vm.fs.file_paths(),
                    processes: vm
                        .procs
                        .running()
                        .map(|p| ProcessView { pid: p.pid, pgid: p.pgid, command: p.command.clone() })
                        .collect(),
                }
            })
            .collect();
        vms.sort_by(|a, b| a.vm_name.cmp(&b.vm_name));
        let snapshots = world
            .snapshots
            .iter()
            .filter_map(|(id, s)| {
                s.as_ref().map(|s| SnapshotView {
                    snapshot_id: id.clone(),
                    vm_name: s.orig_name.clone(),
                    ip: format!("10.20.1.{}/24", s.ip),
                    tap_device_name: format!("tap{}", s.tap),
                    cid: s.cid,
                })
            })
            .collect();
        StateView {
            vms,
            snapshots,
            next_host_port: world.next_host_port(),
            pending_zombies: control.zombies,
            pending_failures: control
                .fail_next
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(op, q)| (*op, q.len()))
                .collect(),
        }
    }

    /// A guest file's content, for assertions (absolute path, or relative to the agent's
    /// `/tmp/server_files`).
    pub fn vm_file(&self, vm_name: &str, path: &str) -> Option<String> {
        let world = self.world();
        let vm = world.vms.get(vm_name)?;
        let abs = crate::fs::resolve(crate::fs::SERVER_FILES, path);
        vm.fs.read(&abs).ok().map(str::to_string)
    }

    /// Ends background guest commands; the HTTP server is stopped through its handle.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

/// `GET /_sim/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateView {
    /// Sorted by name.
    pub vms: Vec<VmView>,
    /// Completed snapshots, sorted by id.
    pub snapshots: Vec<SnapshotView>,
    /// The next host port a forward would get.
    pub next_host_port: u32,
    pub pending_zombies: u32,
    pub pending_failures: BTreeMap<Op, usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmView {
    pub vm_name: String,
    pub status: String,
    pub ip: String,
    pub tap_device_name: String,
    pub port_forwards: Vec<WirePortForward>,
    pub cid: u32,
    pub restored: bool,
    /// Absolute paths of the guest's files.
    pub files: Vec<String>,
    /// The guest's running commands, by pid.
    #[serde(default)]
    pub processes: Vec<ProcessView>,
}

/// One running guest command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessView {
    pub pid: u32,
    pub pgid: u32,
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotView {
    pub snapshot_id: String,
    /// The VM it was taken from; restore only works under this name.
    pub vm_name: String,
    pub ip: String,
    pub tap_device_name: String,
    pub cid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_faults() {
        let pattern = |seed| {
            let sim = Simulator::new(SimConfig::default().with_error_rate(0.5, seed));
            (0..64).map(|_| sim.take_fault(Op::Health).is_some()).collect::<Vec<_>>()
        };
        assert_eq!(pattern(7), pattern(7));
        assert_ne!(pattern(7), pattern(8));
        let hits = pattern(7).iter().filter(|h| **h).count();
        assert!((16..=48).contains(&hits), "{hits} of 64");
    }

    #[test]
    fn fail_next_is_consumed_in_order() {
        let sim = Simulator::new(SimConfig::default());
        sim.fail_next_times(Op::Cmd, Failure::Drop, 2);
        sim.fail_next(Op::Cmd, Failure::status(503, "x"));
        assert_eq!(sim.take_fault(Op::Start), None);
        assert_eq!(sim.take_fault(Op::Cmd), Some(Failure::Drop));
        assert_eq!(sim.take_fault(Op::Cmd), Some(Failure::Drop));
        assert_eq!(sim.take_fault(Op::Cmd), Some(Failure::status(503, "x")));
        assert_eq!(sim.take_fault(Op::Cmd), None);
    }
}
