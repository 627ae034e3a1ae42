//! The simulation over the real edge handlers: determinism, the invariants over many seeds,
//! and that a broken rule is caught.

use edge_model::sim::{self, Mode, Outcome, Settings};

#[test]
fn the_same_seed_prints_the_same_trace_twice() {
    for seed in [1, 17, 4242] {
        let (a, b) = (sim::run(seed), sim::run(seed));
        assert!(a.trace.len() > 20, "a run does something: {}", a.report());
        assert_eq!(a.report(), b.report(), "seed {seed} replays differently");
        assert_eq!(a.claim_latency_ms, b.claim_latency_ms);
    }
    assert_ne!(sim::run(1).trace, sim::run(2).trace, "different seeds, different runs");
    let durable = Settings::production().in_mode(Mode::Durable);
    for seed in [3, 99] {
        let (a, b) = (sim::run_with(seed, &durable), sim::run_with(seed, &durable));
        assert!(a.trace.iter().any(|l| l.contains("socket opened")), "the durable mode runs: {}", a.report());
        assert_eq!(a.report(), b.report(), "durable seed {seed} replays differently");
    }
}

/// The `durable` dispatch mode: one object per server runs the real `host-queue` state
/// machine (alarms at least once, evictions, pushes that may be lost with the socket), its KV
/// mirror writes go through production's KV model.
#[test]
fn durable_mode_keeps_every_invariant_over_300_seeds() {
    check_seeds(&strict(Settings::production().in_mode(Mode::Durable)), 0..300);
}

/// Durable mode before its fixes: seed 52 dead-lettered two tasks whose record was cached
/// absent at the consumer's location (one then ran after its VM's delete; now a hand-off that
/// finds no record waits half the propagation window); 49, 925, 2000, 2781, 2876 and 4741
/// failed in KV a task that its object ran or that a concurrent copy handed over (dead letters
/// now go to the object); 1896, 4698, 5203, 5376 and 6905 ran a VM's step after a
/// dead-lettered predecessor, ahead of the step before it (the daemon now follows
/// predecessors that never ran).
#[test]
fn durable_mode_seeds_of_the_fixed_findings_keep_every_invariant() {
    let durable = Settings::production().in_mode(Mode::Durable);
    for seed in [49, 52, 925, 1896, 2000, 2781, 2876, 4698, 4741, 5203, 5376, 6905] {
        let outcome = sim::run_with(seed, &durable);
        assert!(outcome.violations.is_empty(), "seed {seed}:\n{}", outcome.report());
    }
}

/// The edge over strongly consistent KV with production's limits, queue semantics and
/// faults, with a daemon that does not re-send a command after a lost attempt: what CI runs
/// on every `cargo test`.
#[test]
fn consistent_kv_keeps_every_invariant_over_300_seeds() {
    check_seeds(&strict(Settings::consistent()), 0..300);
}

/// Production's KV (caches, propagation, lagging lists) with production's
/// `KV_PROPAGATION_SECONDS`: a pending task's cancel is 202 until certain, a claim that may
/// read a record older than the last claim is held (16 of 10,000 seeds broke an invariant
/// before; RELIABILITY.md, "Production model").
#[test]
fn production_kv_keeps_every_invariant_over_300_seeds() {
    check_seeds(&strict(Settings::production()), 0..300);
}

/// Under production KV the VM registry write after queueing hits the 1 write/s limit when a
/// client submits a VM's next task within a second. Main answered that POST 503 although the
/// task was queued, so the client retried and the operation ran twice (3,091 such tasks in
/// 1,000 seeds at 8959c19); a POST is now answered 2xx once queued.
#[test]
fn production_kv_never_runs_a_task_whose_post_was_answered_with_an_error() {
    for seed in 0..100 {
        let outcome = sim::run(seed);
        let broken: Vec<&String> =
            outcome.violations.iter().filter(|v| sim::violation_kind(v) == "error-answer-but-ran").collect();
        assert!(broken.is_empty(), "seed {seed}: {broken:?}\n{}", outcome.report());
    }
}

/// The seeds that broke production KV before the daemon and the sweep were fixed (each one's
/// finding in RELIABILITY.md, "Production model"): 383 (a claim 404 dropped the task), 194 (the
/// sweep wrote `pending` over `completed` from a stale read), 124 (a command re-sent after a
/// crash), 60 (a cancelled predecessor let step 3 overtake step 1), 7405 (a predecessor not
/// yet visible taken as gone). Each broke an invariant on the code before its fix.
#[test]
fn production_kv_seeds_of_the_fixed_findings_keep_every_invariant() {
    for seed in [383, 194, 124, 60, 7405] {
        let outcome = sim::run(seed);
        assert!(outcome.violations.is_empty(), "seed {seed}:\n{}", outcome.report());
    }
}

/// Across locations a cancel answered 200 at once ran (the one-location rule,
/// `KV_PROPAGATION_SECONDS` = 0, over production KV): seeds 423 and 1697 of the 16 that broke
/// before. With production's 60 the cancel is 202 until certain, and the same seeds keep
/// every invariant; so do 1809 and 1822 (a re-claim wrote `processing` over `completed`) and
/// 6638, 7251, 8895 (the same, found once the cancels were fixed; 6638 ran a command twice),
/// which a claim held while the last claim may be unseen fixed.
#[test]
fn a_cancel_answered_200_across_locations_runs_and_the_202_rule_keeps_the_same_seeds_clean() {
    let mut one_location_rule = Settings::production();
    one_location_rule.kv_propagation_secs = 0;
    for seed in [423, 1697] {
        let outcome = sim::run_with(seed, &one_location_rule);
        assert!(
            outcome.violations.iter().any(|v| sim::violation_kind(v) == "cancelled-but-ran"),
            "seed {seed}:\n{}",
            outcome.report()
        );
    }
    for seed in [423, 1697, 1809, 1822, 6638, 7251, 8895] {
        let outcome = sim::run(seed);
        assert!(outcome.violations.is_empty(), "seed {seed}:\n{}", outcome.report());
    }
    let cancels_requested =
        (0..50).map(sim::run).filter(|o| o.trace.iter().any(|l| l.contains("→ 202 (cancel_requested)"))).count();
    assert!(cancels_requested > 0, "some seed's cancel is answered 202");
}

/// `cargo test -p edge-model --release -- --ignored ten_thousand`.
#[test]
#[ignore = "10,000 seeds: about a minute in release mode"]
fn ten_thousand_seeds_keep_every_invariant_over_consistent_kv() {
    check_seeds(&strict(Settings::consistent()), 0..10_000);
}

/// The checks can fail: the daemon as it was re-sent a command after its daemon crashed
/// mid-task, and some seed of the first few hundred crashes a daemon at that moment.
#[test]
fn a_command_re_sent_after_a_crash_is_caught_as_reaching_arrakis_twice() {
    let mut settings = Settings::consistent();
    settings.rules.resend_commands_on_reclaim = true; // local-consumer before `not_resent`
    let caught = (0..300).map(|seed| sim::run_with(seed, &settings)).find(|o| {
        o.violations.iter().any(|v| sim::violation_kind(v) == "reached-arrakis-twice" && v.contains("run_command"))
    });
    let caught = caught.expect("no seed in 0..300 re-sent a command");
    let report = caught.report();
    assert!(report.contains("CRASHES"), "the trace shows the crash:\n{report}");
}

fn strict(settings: Settings) -> Settings {
    assert!(!settings.rules.resend_commands_on_reclaim, "the daemon never re-sends a command");
    settings
}

fn check_seeds(settings: &Settings, seeds: std::ops::Range<u64>) {
    let mut failures: Vec<Outcome> = Vec::new();
    for seed in seeds {
        let outcome = sim::run_with(seed, settings);
        assert!(outcome.accepted > 0, "seed {seed} accepted nothing:\n{}", outcome.report());
        if !outcome.violations.is_empty() {
            failures.push(outcome);
        }
    }
    if let Some(first) = failures.first() {
        let seeds: Vec<u64> = failures.iter().map(|o| o.seed).collect();
        panic!(
            "{} seed(s) broke an invariant: {seeds:?}\nreplay with `cargo xtask simulate --seed {}`:\n{}",
            failures.len(),
            first.seed,
            first.report()
        );
    }
}
