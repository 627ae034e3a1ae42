//! `simulate --seed N` replays one seed and prints its trace; `simulate --seeds N [--from S]`
//! runs seeds S..S+N and prints the violations found and the production dispatch latencies;
//! `--mode kv|durable` picks the dispatch mode (both by default).
//! `cargo xtask simulate` runs this in release mode.

use std::process::ExitCode;
use std::time::Instant;

use edge_model::sim::{self, Mode, Outcome, Settings};

const USAGE: &str = "usage: simulate [--mode kv|durable|both] [--consistent] --seed N | --seeds N [--from S]
  --mode               the dispatch mode (DISPATCH_MODE); both, one after the other, by default
  --consistent         KV strongly consistent (one cache-free store) with production's limits
  --command-resend     the daemon driver re-sends a command claimed again after a lost attempt
                       (local-consumer before it failed such commands; --no-command-resend, the
                       default now, is accepted)
  --kv-propagation-secs N  both workers' KV_PROPAGATION_SECONDS (default: 60 over production
                       KV, 0 with --consistent); 0 over production KV answers cancels at once
                       (the one-location rule), which the model shows running";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| -> Option<u64> {
        let i = args.iter().position(|a| a == name)?;
        args.get(i + 1)?.parse().ok()
    };
    let mut settings =
        if args.iter().any(|a| a == "--consistent") { Settings::consistent() } else { Settings::production() };
    if args.iter().any(|a| a == "--command-resend") {
        settings.rules.resend_commands_on_reclaim = true;
    }
    if let Some(secs) = value("--kv-propagation-secs") {
        settings.kv_propagation_secs = secs;
    }
    let modes = match args.iter().position(|a| a == "--mode").and_then(|i| args.get(i + 1)).map(String::as_str) {
        None | Some("both") => vec![Mode::Kv, Mode::Durable],
        Some("kv") => vec![Mode::Kv],
        Some("durable") => vec![Mode::Durable],
        Some(other) => {
            eprintln!("--mode {other:?}: expected kv, durable or both\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut clean = true;
    if let Some(seed) = value("--seed") {
        for mode in modes {
            let outcome = sim::run_with(seed, &settings.clone().in_mode(mode));
            println!("== mode {}", mode.name());
            print!("{}", outcome.report());
            clean &= outcome.violations.is_empty();
        }
        return if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let Some(count) = value("--seeds") else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let from = value("--from").unwrap_or(0);
    for mode in modes {
        let started = Instant::now();
        let mut summary = Summary::default();
        let settings = settings.clone().in_mode(mode);
        for seed in from..from + count {
            summary.add(sim::run_with(seed, &settings));
        }
        println!("== mode {} (replay a seed with --mode {} --seed N)", mode.name(), mode.name());
        summary.print(count, started.elapsed().as_secs_f64());
        clean &= summary.violating_seeds.is_empty();
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Default)]
struct Summary {
    violating_seeds: Vec<(u64, Vec<String>)>,
    claim: Vec<u64>,
    first_claim: Vec<u64>,
    visible: Vec<u64>,
    accepted: usize,
    by_kind: std::collections::BTreeMap<String, usize>,
}

impl Summary {
    fn add(&mut self, outcome: Outcome) {
        self.claim.extend(&outcome.claim_latency_ms);
        self.first_claim.extend(&outcome.first_claim_latency_ms);
        self.visible.extend(&outcome.visible_latency_ms);
        self.accepted += outcome.accepted;
        for v in &outcome.violations {
            *self.by_kind.entry(sim::violation_kind(v).to_owned()).or_default() += 1;
        }
        if !outcome.violations.is_empty() {
            self.violating_seeds.push((outcome.seed, outcome.violations));
        }
    }

    fn print(&mut self, seeds: u64, secs: f64) {
        for (seed, violations) in &self.violating_seeds {
            println!("seed {seed}: {}", violations[0]);
            for v in &violations[1..] {
                println!("         {v}");
            }
        }
        println!(
            "{seeds} seeds, {} accepted tasks, {} violating seed(s) in {secs:.1} s",
            self.accepted,
            self.violating_seeds.len()
        );
        for (kind, n) in &self.by_kind {
            println!("  {n:>6} × {kind}");
        }
        for (name, xs) in [
            ("POST → claimed, a VM's first task", &mut self.first_claim),
            ("POST → claimed, every task", &mut self.claim),
            ("POST → completed, seen elsewhere", &mut self.visible),
        ] {
            xs.sort_unstable();
            println!(
                "{name}: p50 {:.1} s, p99 {:.1} s (n = {})",
                percentile(xs, 50.0) as f64 / 1000.0,
                percentile(xs, 99.0) as f64 / 1000.0,
                xs.len()
            );
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
