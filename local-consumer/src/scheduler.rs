//! Which buffered task to start next: oldest first, one at a time per VM, VMs in parallel.
//!
//! Pure bookkeeping over the latest listing, with no I/O, so the ordering rules are tested
//! directly. Per-VM order has two guards: a VM runs only its oldest listed task, and a task
//! whose `previousTaskId` this daemon has not seen finish is checked with the API before it is
//! claimed (see `decide::predecessor`), which covers a predecessor still in the queue.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use tokio::time::Instant;
use uuid::Uuid;
use vm_task_types::wire::BufferedTask;

/// Finished ids remembered, so a stale listing does not start a task twice.
const FINISHED_MEMORY: usize = 20_000;

/// `T` is the clock's reading: tokio's `Instant` in the daemon, simulated time in the
/// production model (`edge-model`), which runs this same bookkeeping.
#[derive(Debug)]
pub struct Scheduler<T = Instant> {
    /// Listed and not yet started, by id (v7 ids sort by creation time).
    waiting: BTreeMap<Uuid, BufferedTask>,
    running: HashMap<Uuid, String>,
    running_vms: HashSet<String>,
    not_before: HashMap<Uuid, T>,
    finished: HashSet<Uuid>,
    finished_order: VecDeque<Uuid>,
    /// The finished ones that were found cancelled (they never ran).
    cancelled: HashSet<Uuid>,
    /// Deferred tasks kept through listings that omit them (see [`Scheduler::defer_unlisted`]).
    unlisted: HashSet<Uuid>,
}

impl<T> Default for Scheduler<T> {
    fn default() -> Self {
        Self {
            waiting: BTreeMap::new(),
            running: HashMap::new(),
            running_vms: HashSet::new(),
            not_before: HashMap::new(),
            finished: HashSet::new(),
            finished_order: VecDeque::new(),
            cancelled: HashSet::new(),
            unlisted: HashSet::new(),
        }
    }
}

impl<T: Copy + Ord> Scheduler<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a complete listing as the new view of what is buffered.
    pub fn offer(&mut self, listed: Vec<BufferedTask>) {
        let listed_ids: HashSet<Uuid> = listed.iter().map(|t| t.task_id).collect();
        let keep = |id: &Uuid| listed_ids.contains(id) || self.unlisted.contains(id);
        self.waiting.retain(|id, _| keep(id));
        self.not_before.retain(|id, _| keep(id) || self.running.contains_key(id));
        for task in listed {
            if !self.running.contains_key(&task.task_id) && !self.finished.contains(&task.task_id) {
                self.waiting.insert(task.task_id, task);
            }
        }
    }

    /// Adds tasks from a partial listing without dropping others.
    pub fn add(&mut self, listed: Vec<BufferedTask>) {
        for task in listed {
            if !self.running.contains_key(&task.task_id) && !self.finished.contains(&task.task_id) {
                self.waiting.insert(task.task_id, task);
            }
        }
    }

    /// The next task to start, if one may start now; it moves to running.
    pub fn next(&mut self, now: T) -> Option<BufferedTask> {
        let mut seen_vms = HashSet::new();
        let mut pick = None;
        for (id, task) in &self.waiting {
            // Only a VM's oldest waiting task is a candidate.
            if !seen_vms.insert(task.vm_name.as_str()) || self.running_vms.contains(&task.vm_name) {
                continue;
            }
            if self.not_before.get(id).is_some_and(|t| *t > now) {
                continue;
            }
            pick = Some(*id);
            break;
        }
        let task = self.waiting.remove(&pick?)?;
        self.unlisted.remove(&task.task_id);
        self.running.insert(task.task_id, task.vm_name.clone());
        self.running_vms.insert(task.vm_name.clone());
        Some(task)
    }

    /// The task finished here (or was found terminal): never start it again.
    pub fn finish(&mut self, id: Uuid) {
        self.release_vm(id);
        self.unlisted.remove(&id);
        self.not_before.remove(&id);
        if self.finished.insert(id) {
            self.finished_order.push_back(id);
            if self.finished_order.len() > FINISHED_MEMORY {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                    self.cancelled.remove(&old);
                }
            }
        }
    }

    /// The task could not start yet; try again at `at` if it is still listed.
    pub fn defer(&mut self, task: BufferedTask, at: T) {
        self.release_vm(task.task_id);
        self.not_before.insert(task.task_id, at);
        self.waiting.insert(task.task_id, task);
    }

    /// Like [`Scheduler::defer`], but the task is tried again at `at` even if listings no
    /// longer show it: its claim went unanswered and may have been granted, which takes it out
    /// of the ready listings (dropping it then left it stuck until that lease ended).
    pub fn defer_unlisted(&mut self, task: BufferedTask, at: T) {
        self.unlisted.insert(task.task_id);
        self.defer(task, at);
    }

    /// The task was found cancelled: never start it, and it is no finished predecessor.
    pub fn finish_cancelled(&mut self, id: Uuid) {
        self.finish(id);
        if self.finished.contains(&id) {
            self.cancelled.insert(id);
        }
    }

    pub fn has_finished(&self, id: Uuid) -> bool {
        self.finished.contains(&id)
    }

    /// Finished and not cancelled: as a predecessor, it is out of the way.
    pub fn has_finished_ran(&self, id: Uuid) -> bool {
        self.finished.contains(&id) && !self.cancelled.contains(&id)
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// When a deferred task becomes startable, if any waits on time alone. A task that waits
    /// for its VM (a task of the VM running, or an older one waiting) is not counted: its
    /// time coming does not make it startable, and waking for it would spin.
    pub fn next_wakeup(&self) -> Option<T> {
        let mut seen_vms = HashSet::new();
        self.waiting
            .iter()
            .filter(|(_, task)| seen_vms.insert(task.vm_name.as_str()) && !self.running_vms.contains(&task.vm_name))
            .filter_map(|(id, _)| self.not_before.get(id))
            .min()
            .copied()
    }

    fn release_vm(&mut self, id: Uuid) {
        if let Some(vm) = self.running.remove(&id) {
            self.running_vms.remove(&vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vm_task_types::{OperationKind, Timestamp};

    use super::*;

    fn task(ms: u64, vm: &str) -> BufferedTask {
        let id = uuid::Builder::from_unix_timestamp_millis(ms, &[0; 10]).into_uuid();
        BufferedTask {
            task_id: id,
            kind: OperationKind::RunCommand,
            vm_name: vm.into(),
            target_server: "production".into(),
            previous_task_id: None,
            created_at: Timestamp(ms),
            buffered_at: Timestamp(ms),
        }
    }

    /// A claim that got no answer may have been granted: the object then lists the task no
    /// more, and a full listing dropped it, so it stayed unclaimed by this daemon until its
    /// lease ended (found by the durable mode's wrangler-restart e2e: the listing that follows
    /// a reconnect's push came before the claim's retry). It is now tried again regardless.
    #[test]
    fn a_task_whose_claim_went_unanswered_is_retried_though_a_listing_omits_it() {
        let now = Instant::now();
        let mut s = Scheduler::new();
        let (a, b) = (task(1, "a"), task(2, "b"));
        s.offer(vec![a.clone(), b.clone()]);
        let started = s.next(now).unwrap();
        s.defer_unlisted(started, now + Duration::from_secs(2));
        let other = s.next(now).unwrap();
        s.defer(other, now + Duration::from_secs(2));
        s.offer(vec![]);
        let later = now + Duration::from_secs(3);
        assert_eq!(s.next(later).map(|t| t.task_id), Some(a.task_id), "the unanswered claim is tried again");
        assert!(s.next(later).is_none(), "a plain deferral follows the listing");
        s.offer(vec![]);
        assert_eq!(s.waiting(), 0, "once retried, it follows listings again");
    }

    #[test]
    fn one_task_per_vm_at_a_time_in_creation_order_and_vms_in_parallel() {
        let now = Instant::now();
        let mut s = Scheduler::new();
        let (a1, a2, b1) = (task(1, "a"), task(2, "a"), task(3, "b"));
        s.offer(vec![a2.clone(), b1.clone(), a1.clone()]);
        assert_eq!(s.next(now).unwrap().task_id, a1.task_id);
        assert_eq!(s.next(now).unwrap().task_id, b1.task_id, "b runs beside a");
        assert!(s.next(now).is_none(), "a2 waits for a1");
        s.finish(a1.task_id);
        assert_eq!(s.next(now).unwrap().task_id, a2.task_id);
    }

    #[test]
    fn finished_tasks_in_a_stale_listing_do_not_run_again() {
        let now = Instant::now();
        let mut s = Scheduler::new();
        let a1 = task(1, "a");
        s.offer(vec![a1.clone()]);
        let started = s.next(now).unwrap();
        s.offer(vec![a1.clone()]);
        assert!(s.next(now).is_none(), "running, not started twice");
        s.finish(started.task_id);
        s.offer(vec![a1]);
        assert!(s.next(now).is_none());
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn deferred_tasks_hold_their_vm_until_due() {
        let now = Instant::now();
        let mut s = Scheduler::new();
        let (a1, a2) = (task(1, "a"), task(2, "a"));
        s.offer(vec![a1.clone(), a2]);
        let t = s.next(now).unwrap();
        s.defer(t, now + Duration::from_secs(5));
        assert!(s.next(now).is_none(), "a2 may not overtake the deferred a1");
        assert_eq!(s.next_wakeup(), Some(now + Duration::from_secs(5)));
        assert_eq!(s.next(now + Duration::from_secs(5)).unwrap().task_id, a1.task_id);
    }

    #[test]
    fn a_due_task_whose_vm_is_busy_does_not_wake_the_loop() {
        let now = Instant::now();
        let mut s = Scheduler::new();
        let (a1, a2, b1) = (task(1, "a"), task(2, "a"), task(3, "b"));
        s.offer(vec![a2.clone()]);
        let second = s.next(now).unwrap();
        s.defer(second, now + Duration::from_millis(500));
        // The predecessor shows up and runs; the deferred successor falls due meanwhile.
        s.offer(vec![a1.clone(), a2.clone()]);
        assert_eq!(s.next(now).unwrap().task_id, a1.task_id);
        let later = now + Duration::from_secs(1);
        assert!(s.next(later).is_none(), "a2 waits for a1");
        assert_eq!(s.next_wakeup(), None, "a wake-up at a due time that starts nothing would spin the loop");
        s.offer(vec![a1.clone(), a2.clone(), b1.clone()]);
        let b = s.next(later).unwrap();
        s.defer(b, later + Duration::from_secs(3));
        assert_eq!(s.next_wakeup(), Some(later + Duration::from_secs(3)), "other VMs still count");
    }

    #[test]
    fn tasks_gone_from_the_listing_are_dropped() {
        let mut s = Scheduler::new();
        s.offer(vec![task(1, "a"), task(2, "b")]);
        s.offer(vec![task(2, "b")]);
        assert_eq!(s.waiting(), 1);
        assert_eq!(s.next(Instant::now()).unwrap().vm_name, "b");
    }
}
