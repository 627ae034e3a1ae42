//! Task timelines: when each task was created, buffered, claimed and completed, and the splits
//! between those steps.

use std::collections::BTreeMap;

use vm_task_types::{Task, TaskStatus};

/// When a task passed each step, in ms since the epoch, from its timeline.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Phases {
    pub(crate) created: u64,
    pub(crate) buffered: u64,
    pub(crate) claimed: u64,
    pub(crate) done: u64,
}

pub(crate) fn phases(task: &Task) -> Option<Phases> {
    let at = |event: &str| task.event_at(event).map(|t| t.as_millis());
    Some(Phases {
        created: at("created")?,
        buffered: at("buffered")?,
        claimed: at("claimed")?,
        done: task.entered(TaskStatus::Completed).map(|t| t.as_millis())?,
    })
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Splits {
    pub(crate) post_completed: Vec<u64>,
    pub(crate) queued_buffered: Vec<u64>,
    pub(crate) buffered_claimed: Vec<u64>,
    pub(crate) claimed_completed: Vec<u64>,
    pub(crate) post_claimed: Vec<u64>,
}

impl Splits {
    pub(crate) fn of(tasks: &[Option<Task>]) -> Self {
        let mut s = Splits::default();
        for p in tasks.iter().flatten().filter(|t| t.status == TaskStatus::Completed).filter_map(phases) {
            s.post_completed.push(p.done.saturating_sub(p.created));
            s.queued_buffered.push(p.buffered.saturating_sub(p.created));
            s.buffered_claimed.push(p.claimed.saturating_sub(p.buffered));
            s.claimed_completed.push(p.done.saturating_sub(p.claimed));
            s.post_claimed.push(p.claimed.saturating_sub(p.created));
        }
        s
    }
}

/// When the last of `tasks` was buffered, claimed and completed, in ms after the first one was
/// created: shows which stage the run waited on.
pub(crate) fn phase_ends(tasks: &[Option<Task>]) -> Option<[u64; 3]> {
    let all: Vec<Phases> = tasks.iter().flatten().filter_map(phases).collect();
    let first = all.iter().map(|p| p.created).min()?;
    let last = |f: fn(&Phases) -> u64| all.iter().map(f).max().unwrap_or(first).saturating_sub(first);
    Some([last(|p| p.buffered), last(|p| p.claimed), last(|p| p.done)])
}

pub(crate) fn statuses(tasks: &[Option<Task>]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for task in tasks {
        let key = task.as_ref().map_or("unreadable".to_owned(), |t| t.status.to_string());
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}
