//! Schemathesis against both workers under `wrangler dev`: generated valid and invalid requests
//! for every operation in `openapi.json`, checking that nothing answers 5xx and that every
//! answer (status, content type, headers, body) is the one the document describes.
//!
//! Run with `cargo xtask fuzz`, which installs schemathesis into `target/fuzz-venv`, builds the
//! workers and runs this test with `SCHEMATHESIS` set. Without `SCHEMATHESIS` the test says so
//! and does nothing, so `cargo xtask e2e` (which runs every ignored test) does not fuzz.
//!
//! Two passes, one per token: the client token covers the API worker's operations (tag `api`),
//! the consumer token the consumer worker's and the daemon's routes on the API worker (tags
//! `consumer` and `daemon`); `GET /vm/tasks/{id}/status` takes either and is in both. Each pass
//! runs schemathesis twice: the `examples`, `coverage` and `fuzzing` phases, then the
//! `stateful` phase (which chains real task ids from one call into the next) with `wait`
//! pinned to 0, since every long poll on a pending task would otherwise last up to a minute.
//!
//! Settings (environment): `FUZZ_MAX_EXAMPLES` (default 50 per operation and phase),
//! `FUZZ_SEED`, `FUZZ_CHECKS` (comma-separated, default [`CHECKS`]), `FUZZ_REPORT_DIR`
//! (default `target/fuzz-report`), `FUZZ_EXTRA_ARGS` (one schemathesis argument per line).

use std::{
    path::{Path, PathBuf},
    process::ExitStatus,
};

use serde_json::Value;
use stack::{random_token, repo_root, Stack, StackOptions};
use tokio::process::Command;

/// Every answer must be a non-5xx whose status, content type, documented headers and body
/// schema are the document's, and every request that violates the document must be refused.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection";

/// Schemathesis settings for every run: the statuses that count as refusing invalid input
/// (its default list lacks 413, which an oversized generated body rightly gets).
const CONFIG: &str = "[checks.negative_data_rejection]\nexpected-statuses = [400, 401, 404, 405, 409, 413, 415, 422]\n";

/// Added for the stateful phase: long polls on real (pending) tasks return at once.
const STATEFUL_CONFIG: &str = "[parameters]\n\"query.wait\" = 0\n";

struct Pass {
    name: &'static str,
    token: String,
    tags: &'static [&'static str],
}

struct Run {
    label: String,
    status: ExitStatus,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| default.to_owned())
}

#[tokio::test]
#[ignore = "schemathesis fuzzing: cargo xtask fuzz"]
async fn schemathesis_finds_no_server_errors_and_no_answers_outside_the_document() {
    let Some(schemathesis) = std::env::var_os("SCHEMATHESIS") else {
        eprintln!("SCHEMATHESIS is not set: not fuzzing (run `cargo xtask fuzz`)");
        return;
    };
    let root = repo_root();
    let max_examples = env_or("FUZZ_MAX_EXAMPLES", "50");
    let checks = env_or("FUZZ_CHECKS", CHECKS);
    let report_dir = PathBuf::from(env_or("FUZZ_REPORT_DIR", &root.join("target/fuzz-report").to_string_lossy()));
    let extra: Vec<String> = std::env::var("FUZZ_EXTRA_ARGS")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    std::fs::create_dir_all(&report_dir).expect("the report directory can be created");

    let (client, consumer) = (random_token("client"), random_token("consumer"));
    // No webhook secret: nothing is sent (each attempt is recorded as unsigned and retried).
    // The generated callbackUrls name hosts that do not resolve, and under wrangler dev a fetch
    // whose DNS lookup fails is a workerd internal error that restarts the worker, failing the
    // requests in flight with 503 "Your worker restarted mid-request" (seen in this test).
    let opts = StackOptions::edge_only().tokens(&client, &consumer).webhook_secret("");
    let stack = Stack::start(opts).await.expect("the stack starts");
    let gateway = stack.gateway_url();
    eprintln!("fuzzing {gateway}; stack logs in {}", stack.dir().display());

    // Schemathesis reads the document the API worker serves: it must be the repository's.
    let served: Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a client")
        .get(format!("{gateway}/openapi.json"))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("the served document is JSON");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(root.join("openapi.json")).expect("openapi.json"))
        .expect("openapi.json is JSON");
    assert!(
        served == file,
        "the API worker serves a stale openapi.json: rebuild it (cargo xtask build-worker api-worker)"
    );

    let config = report_dir.join("schemathesis.toml");
    let stateful_config = report_dir.join("schemathesis-stateful.toml");
    std::fs::write(&config, CONFIG).expect("the config can be written");
    std::fs::write(&stateful_config, format!("{CONFIG}{STATEFUL_CONFIG}")).expect("the config can be written");

    let passes = [
        Pass { name: "client", token: client.clone(), tags: &["api"] },
        Pass { name: "consumer", token: consumer.clone(), tags: &["consumer", "daemon"] },
    ];
    let mut runs = Vec::new();
    for pass in &passes {
        for (phases, config) in [("examples,coverage,fuzzing", &config), ("stateful", &stateful_config)] {
            let label = format!("{} token, {phases}", pass.name);
            eprintln!("\n=== schemathesis: {label} ===");
            let mut cmd = Command::new(&schemathesis);
            cmd.arg("--config-file")
                .arg(config)
                .arg("run")
                .arg(format!("{gateway}/openapi.json"))
                .args(["--url", &gateway])
                .args(["--header", &format!("Authorization: Bearer {}", pass.token)])
                .args(["--phases", phases])
                .args(["--checks", &checks])
                .args(["--max-examples", &max_examples])
                // One worker: with two, Hypothesis failed on Python 3.11.7 with "SystemError: AST
                // constructor recursion depth mismatch", apparently CPython's AST builder racing
                // between threads.
                .args(["--workers", "1"])
                .args(["--request-timeout", "70"])
                .args(["--generation-database", "none"])
                .arg("--no-color")
                .args(["--report", "junit"])
                .arg("--report-junit-path")
                .arg(report_dir.join(format!("{}-{}.xml", pass.name, phases.replace(',', "-"))));
            for tag in pass.tags {
                cmd.args(["--include-tag", tag]);
            }
            if let Ok(seed) = std::env::var("FUZZ_SEED") {
                cmd.args(["--seed", &seed]);
            }
            cmd.args(&extra).current_dir(&report_dir).kill_on_drop(true);
            let status = cmd
                .status()
                .await
                .unwrap_or_else(|e| panic!("could not run {}: {e}", Path::new(&schemathesis).display()));
            runs.push(Run { label, status });
        }
    }

    eprintln!("\n=== summary ===");
    for run in &runs {
        eprintln!(
            "{:<52} {}",
            run.label,
            if run.status.success() { "passed".to_owned() } else { run.status.to_string() }
        );
    }
    let failed: Vec<&str> = runs.iter().filter(|r| !r.status.success()).map(|r| r.label.as_str()).collect();
    if let Err(e) = stack.shutdown().await {
        eprintln!("the stack did not stop cleanly: {e:#}");
    }
    assert!(
        failed.is_empty(),
        "schemathesis found problems in: {failed:?} (details above; JUnit reports in {})",
        report_dir.display()
    );
}
