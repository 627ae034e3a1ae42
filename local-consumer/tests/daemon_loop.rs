//! The daemon's loop in-process, in simulated time (`tokio::time::pause`), over a fake edge
//! and a fake executor: ordering, concurrency, deferral, reaping, drain, and what it reports.

mod fake;

use std::{collections::HashMap, time::Duration};

use fake::{config, daemon, Call, FakeEdge, FakeExecutor};
use local_consumer::daemon::Flow;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vm_task_types::TaskStatus;

/// Steps `daemon` until `done` holds or `within` passes in simulated time.
async fn step_until<E, X>(
    daemon: &mut local_consumer::daemon::Daemon<E, X>,
    within: Duration,
    mut done: impl FnMut() -> bool,
) -> bool
where
    E: local_consumer::edge::Edge,
    X: local_consumer::executor::Execute,
{
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        match tokio::time::timeout_at(deadline, daemon.step()).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop) | Err(_) => return done(),
        }
    }
    true
}

#[tokio::test(start_paused = true)]
async fn one_task_per_vm_in_submission_order_and_at_most_max_concurrency_at_once() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_secs(3));
    let shutdown = CancellationToken::new();
    let mut ids = Vec::new();
    for round in 0..5 {
        for vm in ["a", "b", "c", "d"] {
            ids.push(edge.submit(vm, &format!("echo {vm}{round}")));
        }
    }
    let mut d = daemon(config(&["--max-concurrency", "3"]), &edge, &executor, &shutdown);
    assert!(step_until(&mut d, Duration::from_secs(600), || edge.all_terminal()).await, "all 20 tasks finish");

    let runs = executor.runs();
    assert_eq!(runs.len(), 20, "each task ran once");
    assert_eq!(executor.most_running(), 3, "three VMs at once, never more");
    let mut by_vm: HashMap<&str, Vec<&fake::Run>> = HashMap::new();
    for run in &runs {
        by_vm.entry(run.vm.as_str()).or_default().push(run);
    }
    for (vm, runs) in by_vm {
        let order: Vec<_> = runs.iter().map(|r| r.id).collect();
        let mut submitted: Vec<_> = order.clone();
        submitted.sort();
        assert_eq!(order, submitted, "VM {vm} ran its tasks in submission order");
        for pair in runs.windows(2) {
            assert!(pair[1].started >= pair[0].ended.unwrap(), "VM {vm} ran one task at a time");
        }
    }
    for id in ids {
        assert_eq!(edge.status(id), TaskStatus::Completed);
    }
}

/// In the durable mode tasks arrive pushed, a few at a time. Each pushed listing once made
/// the daemon list everything over HTTP as well (it took a push for a page cut at its limit):
/// a worker and an object request per task, on the task's path (bench: 13–30 ms each).
#[tokio::test(start_paused = true)]
async fn pushed_tasks_are_claimed_without_a_full_listing_each() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_millis(50));
    let shutdown = CancellationToken::new();
    edge.push();
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(edge.submit("vm", &format!("echo {i}")));
        let last = *ids.last().unwrap();
        assert!(step_until(&mut d, Duration::from_secs(10), || edge.status(last).is_terminal()).await);
        tokio::time::advance(Duration::from_secs(2)).await;
    }
    let full_listings = edge.calls().iter().filter(|(_, c)| matches!(c, Call::Ready { since: None })).count();
    assert_eq!(full_listings, 1, "only the first listing is a full one: {:?}", edge.calls());
    assert!(ids.iter().all(|&id| edge.status(id) == TaskStatus::Completed));
}

#[tokio::test(start_paused = true)]
async fn finished_jobs_are_reaped_as_they_end() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_millis(10));
    let shutdown = CancellationToken::new();
    for i in 0..300 {
        edge.submit(&format!("vm{}", i % 50), "true");
    }
    let mut d = daemon(config(&["--max-concurrency", "8"]), &edge, &executor, &shutdown);
    let finished = step_until(&mut d, Duration::from_secs(600), || edge.all_terminal()).await;
    assert!(finished);
    // Let the loop see the last jobs end (their reports are in; their ends are events).
    step_until(&mut d, Duration::from_secs(1), || false).await;
    assert_eq!(executor.runs().len(), 300);
    assert_eq!(d.running(), 0, "no finished job stays in the join set");
    assert_eq!(d.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_task_held_by_another_claim_is_deferred_until_the_lease_ends_without_spinning() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_millis(100));
    let shutdown = CancellationToken::new();
    let held = edge.submit("a", "echo held");
    let other = edge.submit("b", "echo other");
    edge.hold(held, Duration::from_secs(20));
    let start = Instant::now();
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    assert!(step_until(&mut d, Duration::from_secs(120), || edge.all_terminal()).await);

    let claims: Vec<Instant> =
        edge.calls().into_iter().filter(|(_, c)| *c == Call::Claim(held)).map(|(at, _)| at).collect();
    assert_eq!(claims.len(), 2, "one refused claim, one after the lease: {claims:?}");
    assert!(claims[1] - start >= Duration::from_secs(20), "retried only once the lease ended");
    let runs = executor.runs();
    assert_eq!(runs.iter().find(|r| r.id == other).unwrap().started, start, "the other VM was not held up");
    assert_eq!(edge.status(held), TaskStatus::Completed);
}

#[tokio::test(start_paused = true)]
async fn a_task_waits_for_a_predecessor_it_has_not_seen_finish() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_secs(1));
    let shutdown = CancellationToken::new();
    // The predecessor is not listed yet (still in the queue, say); the API says it is pending.
    let first = edge.submit("a", "echo 1");
    let second = edge.submit_after("a", "echo 2", Some(first));
    edge.set_listed(first, false);
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    step_until(&mut d, Duration::from_secs(10), || false).await;
    assert!(executor.runs().is_empty(), "the successor waits");
    let checks = edge.calls().iter().filter(|(_, c)| *c == Call::TaskStatus(first)).count();
    assert!((5..=40).contains(&checks), "checked the predecessor every half second or so, not in a spin: {checks}");
    edge.set_listed(first, true);
    assert!(step_until(&mut d, Duration::from_secs(120), || edge.all_terminal()).await);
    let runs = executor.runs();
    assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), [first, second]);
    assert!(runs[1].started >= runs[0].ended.unwrap());
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_the_running_task_and_claims_nothing_new() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_secs(30));
    let shutdown = CancellationToken::new();
    let first = edge.submit("a", "echo 1");
    let second = edge.submit("a", "echo 2");
    let d = daemon(config(&[]), &edge, &executor, &shutdown);
    let run = tokio::spawn(d.run());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(executor.runs().len(), 1, "the first task is running");
    shutdown.cancel();
    let stopped_at = {
        run.await.unwrap();
        Instant::now()
    };
    assert_eq!(edge.status(first), TaskStatus::Completed, "the running task finished and reported");
    assert_eq!(edge.status(second), TaskStatus::Pending, "the next one was left for later");
    assert!(!edge.calls().iter().any(|(_, c)| *c == Call::Claim(second)));
    assert!(stopped_at - executor.runs()[0].started >= Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn the_drain_timeout_abandons_a_task_that_runs_too_long() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_secs(600));
    let shutdown = CancellationToken::new();
    let id = edge.submit("a", "sleep 600");
    let d = daemon(config(&["--drain-timeout-seconds", "60"]), &edge, &executor, &shutdown);
    let run = tokio::spawn(d.run());
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.cancel();
    let cancelled_at = Instant::now();
    run.await.unwrap();
    assert_eq!(Instant::now() - cancelled_at, Duration::from_secs(60));
    assert_eq!(edge.status(id), TaskStatus::Processing, "left to its lease, not reported");
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_a_task_runs() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_secs(95));
    let shutdown = CancellationToken::new();
    let id = edge.submit("a", "sleep 95");
    let mut d = daemon(config(&["--lease-seconds", "30"]), &edge, &executor, &shutdown);
    assert!(step_until(&mut d, Duration::from_secs(200), || edge.all_terminal()).await);
    let heartbeats = edge.calls().iter().filter(|(_, c)| *c == Call::Heartbeat(id)).count();
    assert_eq!(heartbeats, 9, "every 10 s of a 95 s run");
}

/// The run of `id` and the calls made after it ended.
fn after_run(edge: &FakeEdge, executor: &FakeExecutor, id: uuid::Uuid) -> Vec<Call> {
    let ended = executor.runs().iter().find(|r| r.id == id).unwrap().ended.unwrap();
    edge.calls().into_iter().filter(|(at, _)| *at >= ended).map(|(_, c)| c).collect()
}

#[tokio::test(start_paused = true)]
async fn issue_11_a_75_kb_output_is_reported_with_its_head_tail_and_size() {
    let edge = FakeEdge::new();
    let output = format!("HEAD{}TAIL", "a".repeat(75_000));
    let executor = FakeExecutor::with_output(Duration::from_millis(100), Some(output.clone()));
    let shutdown = CancellationToken::new();
    let id = edge.submit("a", "cat f f f f f");
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    assert!(step_until(&mut d, Duration::from_secs(60), || edge.all_terminal()).await, "the task ends within a minute");

    assert_eq!(edge.status(id), TaskStatus::Completed);
    let result = edge.task(id).result.unwrap();
    let kept = result.output.unwrap();
    assert!(kept.starts_with("HEADaaa") && kept.ends_with("aaaTAIL"));
    assert!(kept.len() <= 32 * 1024 + 64, "MAX_OUTPUT_BYTES' default: {}", kept.len());
    assert_eq!(result.output_truncated, Some(true));
    assert_eq!(result.output_bytes, Some(output.len() as u64));
    let reports: Vec<_> =
        after_run(&edge, &executor, id).into_iter().filter(|c| matches!(c, Call::Report { .. })).collect();
    assert!(matches!(reports[..], [Call::Report { accepted: true, bytes, .. }] if bytes <= 64 * 1024), "{reports:?}");
}

#[tokio::test(start_paused = true)]
async fn issue_11_a_report_refused_for_its_content_ends_the_task_failed_with_the_reason() {
    let edge = FakeEdge::new();
    edge.refuse_output_with(422);
    let executor = FakeExecutor::new(Duration::from_millis(100));
    let shutdown = CancellationToken::new();
    let id = edge.submit("a", "echo refused");
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    assert!(step_until(&mut d, Duration::from_secs(60), || edge.all_terminal()).await, "not stuck in processing");

    let task = edge.task(id);
    assert_eq!(task.status, TaskStatus::Failed);
    let error = task.error.unwrap();
    assert!(error.contains("HTTP 422") && error.contains("refused"), "{error}");
    let statuses: Vec<(TaskStatus, bool)> = after_run(&edge, &executor, id)
        .into_iter()
        .filter_map(|c| match c {
            Call::Report { status, accepted, .. } => Some((status, accepted)),
            _ => None,
        })
        .collect();
    assert_eq!(statuses, [(TaskStatus::Completed, false), (TaskStatus::Failed, true)]);
    assert_eq!(executor.runs().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn issue_11_a_task_is_finished_only_once_a_report_is_accepted_and_its_lease_is_kept_meanwhile() {
    let edge = FakeEdge::new();
    // About a minute of failing reports, longer than the 30 s lease.
    edge.fail_reports(25);
    let executor = FakeExecutor::new(Duration::from_secs(1));
    let shutdown = CancellationToken::new();
    let id = edge.submit("a", "echo once");
    let mut d = daemon(config(&["--lease-seconds", "30"]), &edge, &executor, &shutdown);
    assert!(step_until(&mut d, Duration::from_secs(600), || edge.all_terminal()).await, "reported in the end");

    assert_eq!(edge.status(id), TaskStatus::Completed);
    assert_eq!(executor.runs().len(), 1, "the command ran once: a retried report does not run it again");
    let after = after_run(&edge, &executor, id);
    let failed = after.iter().filter(|c| matches!(c, Call::Report { accepted: false, .. })).count();
    assert_eq!(failed, 25);
    assert!(
        after.iter().filter(|c| **c == Call::Heartbeat(id)).count() >= 2,
        "heartbeats went on while reporting: {after:?}"
    );
    assert_eq!(edge.reports(id).len(), 1);
}

/// Production KV: a daemon's claim can reach a location the task's record has not reached yet
/// (up to 60 s), which answers 404. The daemon used to take that as "finished" and never
/// claimed the task again, leaving it pending for good (the production model's seed 383).
#[tokio::test(start_paused = true)]
async fn a_claim_answered_404_for_a_listed_task_is_retried_until_the_record_appears() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_millis(100));
    let shutdown = CancellationToken::new();
    let id = edge.submit("a", "echo late");
    edge.hide_record(id, Duration::from_secs(20));
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    assert!(step_until(&mut d, Duration::from_secs(120), || edge.all_terminal()).await, "the task ran");
    assert_eq!(edge.status(id), TaskStatus::Completed);
    let claims = edge.calls().iter().filter(|(_, c)| *c == Call::Claim(id)).count();
    assert!((3..=8).contains(&claims), "retried with backoff, not in a spin: {claims} claims");
}

/// A listed task whose record never appears (an orphaned entry) is not claimed for ever.
#[tokio::test(start_paused = true)]
async fn a_listed_task_whose_record_never_appears_is_given_up_after_minutes() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_millis(100));
    let shutdown = CancellationToken::new();
    let id = edge.submit("a", "echo never");
    edge.hide_record(id, Duration::from_secs(100_000));
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    step_until(&mut d, Duration::from_secs(3600), || false).await;
    let claims: Vec<Instant> =
        edge.calls().into_iter().filter(|(_, c)| *c == Call::Claim(id)).map(|(at, _)| at).collect();
    assert_eq!(claims.len(), 13, "the first claim and 12 retries");
    let span = *claims.last().unwrap() - claims[0];
    assert!(span >= Duration::from_secs(180) && span <= Duration::from_secs(300), "over about 4 minutes: {span:?}");
    assert!(executor.runs().is_empty());
}

/// README: "commands are never re-sent once they may have reached the guest". A command
/// claimed on its second attempt (the first one's daemon crashed mid-command) used to be sent
/// again (the production model's seed 124).
#[tokio::test(start_paused = true)]
async fn a_command_claimed_on_a_later_attempt_is_not_sent_again_and_ends_failed_with_the_reason() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_millis(100));
    let shutdown = CancellationToken::new();
    let id = edge.submit("a", "echo once");
    edge.lose_attempt(id);
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    assert!(step_until(&mut d, Duration::from_secs(60), || edge.all_terminal()).await);
    assert!(executor.runs().is_empty(), "the command was not sent again");
    assert_eq!(edge.status(id), TaskStatus::Failed);
    let error = edge.task(id).error.unwrap_or_default();
    assert!(error.contains("not re-sent") && error.contains("attempt 2"), "{error}");
}

/// Production model, durable mode: step 2's queue message was dead-lettered (failed, never
/// claimed) while step 1's was still on its way; taking a failed predecessor as "finished",
/// step 3 ran before step 1. A predecessor that failed unrun is followed back like a cancelled
/// one. Failed on the old rule (step 3 ran first).
#[tokio::test(start_paused = true)]
async fn a_predecessor_that_failed_without_running_does_not_let_a_task_overtake_the_one_before_it() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_secs(1));
    let shutdown = CancellationToken::new();
    let first = edge.submit("a", "echo 1");
    let second = edge.submit_after("a", "echo 2", Some(first));
    let third = edge.submit_after("a", "echo 3", Some(second));
    edge.dead_letter(second);
    edge.set_listed(second, false);
    edge.set_listed(first, false);
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    step_until(&mut d, Duration::from_secs(10), || false).await;
    assert!(executor.runs().is_empty(), "the third waits for the first, past the dead-lettered second");
    edge.set_listed(first, true);
    assert!(step_until(&mut d, Duration::from_secs(120), || edge.all_terminal()).await);
    let runs = executor.runs();
    assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), [first, third]);
    assert!(runs[1].started >= runs[0].ended.unwrap());
}

/// A VM's task whose predecessor was cancelled used to run as soon as the cancelled one was
/// terminal, ahead of the older task still pending (the production model's seed 60).
#[tokio::test(start_paused = true)]
async fn a_cancelled_predecessor_does_not_let_a_task_overtake_the_one_before_it() {
    let edge = FakeEdge::new();
    let executor = FakeExecutor::new(Duration::from_secs(1));
    let shutdown = CancellationToken::new();
    let first = edge.submit("a", "echo 1");
    let second = edge.submit_after("a", "echo 2", Some(first));
    let third = edge.submit_after("a", "echo 3", Some(second));
    edge.cancel(second);
    edge.set_listed(first, false);
    let mut d = daemon(config(&[]), &edge, &executor, &shutdown);
    step_until(&mut d, Duration::from_secs(10), || false).await;
    assert!(executor.runs().is_empty(), "the third waits for the first, past the cancelled second");
    edge.set_listed(first, true);
    assert!(step_until(&mut d, Duration::from_secs(120), || edge.all_terminal()).await);
    let runs = executor.runs();
    assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), [first, third]);
    assert!(runs[1].started >= runs[0].ended.unwrap());
}
