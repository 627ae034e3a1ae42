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
