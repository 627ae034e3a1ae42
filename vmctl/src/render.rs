//! Human output: aligned tables and key/value blocks, as plain strings so tests read them.
//! `--json` output does not pass through here; it prints the API's own JSON.

use vm_task_types::{
    wire::{HostEntry, ListTasksResponse, TaskStatusResponse, VmStatusResponse, VmSummary},
    PortForward, Task, TaskResult, TaskSummary, TimelineEntry, Timestamp, VmState,
};

/// Columns padded to their widest cell; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `key  value` lines with the keys aligned; empty values are left out.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

/// A duration for people: `56ms`, `1.2s`, `2m05s`, `1h02m`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// The time of day of a timestamp, to the millisecond (`22:02:29.344`).
fn time_of_day(at: Timestamp) -> String {
    let text = at.to_string();
    text.get(11..23).map(str::to_owned).unwrap_or(text)
}

/// The state as Arrakis spells it (`RUNNING`), as in the API's JSON.
fn vm_state_name(state: VmState) -> &'static str {
    match state {
        VmState::Running => "RUNNING",
        VmState::Paused => "PAUSED",
        VmState::Stopped => "STOPPED",
        VmState::Deleted => "DELETED",
    }
}

fn ports(forwards: &[PortForward]) -> String {
    forwards
        .iter()
        .map(|p| format!("{}→{} {}", p.host_port, p.guest_port, p.description))
        .collect::<Vec<_>>()
        .join(", ")
}

fn opt<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn result_fields(result: Option<&TaskResult>) -> Vec<(&'static str, String)> {
    let Some(r) = result else { return Vec::new() };
    vec![
        ("vm state", opt(r.vm_state.map(vm_state_name))),
        ("ip", opt(r.ip.as_ref())),
        ("tap", opt(r.tap_device_name.as_ref())),
        ("ports", r.port_forwards.as_deref().map(ports).unwrap_or_default()),
        ("snapshot", opt(r.snapshot_id.as_ref())),
        ("exit code", opt(r.exit_code)),
        ("note", opt(r.note.as_ref())),
    ]
}

fn attempts(n: u32) -> String {
    if n == 1 {
        "1 attempt".into()
    } else {
        format!("{n} attempts")
    }
}

/// A finished (or `--no-wait`-submitted, or followed) task's status and result.
pub fn task_status(status: &TaskStatusResponse) -> String {
    let took = status.updated_at.millis_since(status.created_at);
    let mut pairs = vec![
        ("task", status.task_id.to_string()),
        ("type", status.kind.to_string()),
        ("vm", status.vm_name.clone()),
        ("server", status.target_server.clone()),
        ("status", format!("{} after {}, {}", status.status, duration(took), attempts(status.attempts))),
    ];
    pairs.extend(result_fields(status.result.as_ref()));
    pairs.push(("error", opt(status.error.as_ref())));
    fields(&pairs) + &output_block(status.result.as_ref())
}

/// A command's output, indented under the fields.
fn output_block(result: Option<&TaskResult>) -> String {
    let Some(output) = result.and_then(|r| r.output.as_ref()) else { return String::new() };
    let mut out = String::from("output:\n");
    for line in output.lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out
}

/// `vmctl task ID`: the record, then its timeline.
pub fn task_detail(task: &Task) -> String {
    let took = task.updated_at.millis_since(task.created_at);
    let mut pairs = vec![
        ("task", task.id.to_string()),
        ("type", task.kind().to_string()),
        ("vm", task.vm_name().to_owned()),
        ("server", task.target_server.clone()),
        ("status", format!("{} ({} since creation, {})", task.status, duration(took), attempts(task.attempts))),
        ("created", task.created_at.to_string()),
        ("updated", task.updated_at.to_string()),
        ("after task", opt(task.previous_task_id)),
        // A finished task keeps its last claim on the record; only a live one is news.
        (
            "claim",
            opt(task
                .claim
                .as_ref()
                .filter(|_| !task.status.is_terminal())
                .map(|c| format!("{} until {}", c.consumer_id, c.lease_expires_at))),
        ),
    ];
    pairs.extend(result_fields(task.result.as_ref()));
    pairs.push(("error", opt(task.error.as_ref())));
    let mut out = fields(&pairs) + &output_block(task.result.as_ref());
    out.push('\n');
    out.push_str(&timeline(&task.timeline, None));
    out
}

pub const TIMELINE_HEADERS: [&str; 6] = ["TIME", "STEP", "ACTOR", "EVENT", "FROM→TO", "MESSAGE"];

/// One timeline row; `previous` is the entry before it (for the step's duration).
pub fn timeline_row(entry: &TimelineEntry, previous: Option<Timestamp>) -> Vec<String> {
    let step = match previous {
        Some(before) => format!("+{}", duration(entry.at.millis_since(before))),
        None => String::new(),
    };
    let change = match (entry.from, entry.to) {
        (Some(from), Some(to)) => format!("{from}→{to}"),
        (None, Some(to)) => format!("→{to}"),
        _ => String::new(),
    };
    vec![time_of_day(entry.at), step, entry.actor.clone(), entry.event.clone(), change, entry.message.clone()]
}

/// The timeline as a table; `before` is the timestamp preceding the first entry, if any.
pub fn timeline(entries: &[TimelineEntry], before: Option<Timestamp>) -> String {
    let mut previous = before;
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let row = timeline_row(e, previous);
            previous = Some(e.at);
            row
        })
        .collect();
    table(&TIMELINE_HEADERS, &rows)
}

/// `vmctl watch`: the task named once, then the timeline's header. Rows come one at a time,
/// so their columns have fixed widths instead of measured ones.
pub fn watch_header(task: &Task) -> String {
    let headers: Vec<String> = TIMELINE_HEADERS.iter().map(|h| h.to_string()).collect();
    format!("task {} {} {} on {}\n{}\n", task.id, task.kind(), task.vm_name(), task.target_server, fixed_row(&headers))
}

/// One `watch` row.
pub fn watch_row(entry: &TimelineEntry, previous: Option<Timestamp>) -> String {
    fixed_row(&timeline_row(entry, previous))
}

fn fixed_row(cells: &[String]) -> String {
    const WIDTHS: [usize; 5] = [12, 8, 16, 12, 22];
    let mut text = String::new();
    for (cell, width) in cells.iter().zip(WIDTHS) {
        text.push_str(&format!("{cell:<width$}  "));
    }
    text.push_str(cells.get(WIDTHS.len()).map(String::as_str).unwrap_or(""));
    text.trim_end().to_owned()
}

/// `vmctl tasks`.
pub fn task_list(tasks: &[TaskSummary]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.kind.to_string(),
                t.vm_name.clone(),
                t.status.to_string(),
                t.target_server.clone(),
                t.created_at.to_string(),
                duration(t.updated_at.millis_since(t.created_at)),
            ]
        })
        .collect();
    table(&["ID", "TYPE", "VM", "STATUS", "SERVER", "CREATED", "TOOK"], &rows)
}

/// The line after a listing: how to get the next page, and whether this one was cut short
/// by the API's scan budget.
pub fn next_page_hint(list: &ListTasksResponse, filtered: bool) -> Option<String> {
    let partial = if list.partial { "this page is partial (the API's scan budget ran out); " } else { "" };
    let same = if filtered { " (with the same filters)" } else { "" };
    list.cursor.as_ref().map(|c| format!("{partial}more: vmctl tasks --cursor {c}{same}"))
}

/// `vmctl hosts`.
pub fn host_list(hosts: &[HostEntry]) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            let r = &h.record;
            vec![
                r.server.clone(),
                r.consumer_id.clone(),
                r.host_name.clone(),
                if h.live { "yes".into() } else { "no".into() },
                format!("{}s ago", h.last_seen_secs_ago),
                format!("{}/{}", r.in_flight, r.concurrency),
                match r.arrakis_reachable {
                    Some(true) => "up".into(),
                    Some(false) => "down".into(),
                    None => "-".into(),
                },
                r.version.clone(),
            ]
        })
        .collect();
    table(&["SERVER", "CONSUMER", "HOST", "LIVE", "SEEN", "IN FLIGHT", "ARRAKIS", "VERSION"], &rows)
}

/// `vmctl ls`.
pub fn vm_list(vms: &[VmSummary]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            let state = v.state.map(vm_state_name).unwrap_or("-");
            vec![
                v.vm_name.clone(),
                v.server.clone(),
                if v.settled { state.to_owned() } else { format!("{state}?") },
                v.ip.clone().unwrap_or_else(|| "-".into()),
                format!("{} {}", v.last_task_kind, v.last_task_id),
                v.updated_at.to_string(),
            ]
        })
        .collect();
    table(&["NAME", "SERVER", "STATE", "IP", "LAST TASK", "UPDATED"], &rows)
}

/// `vmctl vm NAME`.
pub fn vm_status(vm: &VmStatusResponse) -> String {
    fields(&[
        ("vm", vm.vm_name.clone()),
        ("server", vm.server.clone()),
        ("state", opt(vm.state.map(vm_state_name))),
        ("ip", opt(vm.ip.as_ref())),
        ("ports", vm.port_forwards.as_deref().map(ports).unwrap_or_default()),
        ("state from", opt(vm.state_task_id)),
        ("last task", format!("{} {} ({})", vm.last_task_id, vm.last_task_kind, vm.last_task_status)),
        ("updated", vm.updated_at.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;
    use vm_task_types::{Operation, OperationKind, TaskStatus, TimelineEvent, VmRef};

    fn entry(at: u64, actor: &str, event: &str, to: Option<TaskStatus>, from: Option<TaskStatus>) -> TimelineEntry {
        TimelineEntry { at: Timestamp(at), actor: actor.into(), event: event.into(), from, to, message: String::new() }
    }

    #[test]
    fn tables_align_columns_and_do_not_pad_the_last() {
        let text = table(&["A", "BB", "C"], &[vec!["long-cell".into(), "x".into(), "tail".into()]]);
        assert_eq!(text, "A          BB  C\nlong-cell  x   tail\n");
    }

    #[test]
    fn durations_read_naturally_at_every_scale() {
        assert_eq!(duration(56), "56ms");
        assert_eq!(duration(1_234), "1.2s");
        assert_eq!(duration(125_000), "2m05s");
        assert_eq!(duration(3_720_000), "1h02m");
    }

    #[test]
    fn the_timeline_shows_each_step_with_the_time_since_the_one_before() {
        use TaskStatus::*;
        let base = 1_795_000_000_000; // 2026-11-18T...
        let entries = vec![
            TimelineEntry {
                message: "queued for server production".into(),
                ..entry(base, "api", "created", None, None)
            },
            entry(base + 56, "consumer-worker", "buffered", None, None),
            entry(base + 1_256, "host-a", "claimed", Some(Processing), Some(Pending)),
            entry(base + 3_456, "host-a", "completed", Some(Completed), Some(Processing)),
        ];
        let text = timeline(&entries, None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("TIME") && lines[0].contains("FROM→TO"), "{text}");
        assert!(lines[1].contains("api") && lines[1].ends_with("queued for server production"), "{text}");
        assert!(lines[2].contains("+56ms"), "{text}");
        assert!(lines[3].contains("+1.2s") && lines[3].contains("pending→processing"), "{text}");
        assert!(lines[4].contains("+2.2s") && lines[4].contains("processing→completed"), "{text}");
        assert_eq!(&lines[1][..12], &Timestamp(base).to_string()[11..23]);
    }

    #[test]
    fn a_task_detail_shows_result_error_output_and_timeline() {
        let mut task = Task {
            id: Uuid::nil(),
            operation: Operation::StopVm(VmRef { vm_name: "vm-1".into(), target_server: None }),
            status: TaskStatus::Completed,
            target_server: "production".into(),
            previous_task_id: None,
            created_at: Timestamp(1_000),
            updated_at: Timestamp(2_500),
            attempts: 1,
            claim: Some(vm_task_types::Claim {
                claim_id: Uuid::nil(),
                consumer_id: "host-a".into(),
                claimed_at: Timestamp(1_100),
                lease_expires_at: Timestamp(181_100),
            }),
            result: Some(TaskResult {
                vm_state: Some(VmState::Stopped),
                output: Some("a\nb\n".into()),
                ..Default::default()
            }),
            error: None,
            callback_url: None,
            gen: 3,
            timeline: vec![entry(1_000, "api", "created", None, None)],
        };
        task.record(Timestamp(2_500), "host-a", TimelineEvent::Completed, Some(TaskStatus::Completed), "");
        let text = task_detail(&task);
        assert!(text.contains("status    completed (1.5s since creation, 1 attempt)"), "{text}");
        assert!(text.contains("vm state  STOPPED"), "{text}");
        assert!(text.contains("output:\n  a\n  b\n"), "{text}");
        assert!(!text.contains("error"), "empty fields are left out: {text}");
        assert!(!text.contains("until"), "a finished task's old claim is not shown: {text}");
        assert!(text.contains("+1.5s"), "{text}");
    }

    #[test]
    fn a_listing_has_one_row_per_task_and_a_hint_for_the_next_page() {
        let summary = TaskSummary {
            id: Uuid::nil(),
            kind: OperationKind::LaunchVm,
            vm_name: "vm-1".into(),
            status: TaskStatus::Failed,
            target_server: "production".into(),
            created_at: Timestamp(0),
            updated_at: Timestamp(800),
            lease_expires_at: None,
        };
        let text = task_list(&[summary.clone(), summary]);
        assert_eq!(text.lines().count(), 3);
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .contains("launch_vm  vm-1  failed  production  1970-01-01T00:00:00.000Z  800ms"),
            "{text}"
        );
        let list = ListTasksResponse {
            success: true,
            tasks: vec![],
            count: 0,
            cursor: Some("abc".into()),
            list_complete: false,
            partial: false,
            scanned: None,
        };
        assert_eq!(next_page_hint(&list, false).as_deref(), Some("more: vmctl tasks --cursor abc"));
    }
}
