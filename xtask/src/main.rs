//! `cargo xtask <command>`: the one command surface of this repository.
//!
//! Kept to `std` and `anyhow` so that `cargo xtask build-worker`, which `wrangler` runs as
//! each worker's build command, compiles in seconds. Commands that drive running services
//! delegate: `dev` to the `stack` crate's binary, `e2e`, `soak` and `fuzz` to its `e2e` test
//! binary, `bench` to the `bench` crate's binary.

use std::{
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{bail, ensure, Context, Result};

/// Tool versions the build is pinned to. wasm-bindgen's comes from Cargo.lock.
const WORKER_BUILD_VERSION: &str = "0.8.7";
const WORKERS: [&str; 2] = ["api-worker", "consumer-worker"];

const HELP: &str = "\
cargo xtask <command>

  setup              install pinned tools: wasm32 target, wasm-bindgen-cli, worker-build, npm packages,
                     and Debian's chromium for the dashboard's browser test (as root, when missing)
  build-worker NAME  build one worker to wasm (api-worker | consumer-worker); skipped when up to date
  build              setup, then build both workers and the native binaries (daemon, simulator, vmctl)
  --mode kv|durable  (dev, e2e, bench) the workers' DISPATCH_MODE on the stacks they start
  dev                run the whole local stack (workers, Arrakis simulator, daemon) until Ctrl-C
  test               the full test suite: lint, native tests, end-to-end tests on the local stack,
                     and `wrangler deploy --dry-run` of both workers
  lint               cargo fmt --check and clippy -D warnings (native and wasm32)
  e2e                end-to-end tests only (builds first)
  bench              benchmarks on the local stack, both dispatch modes side by side unless --mode
                     names one; prints Markdown tables (not part of `test`; ~10 min)
  soak               2,000 tasks over 100 VMs with injected faults; prints RELIABILITY.md's figures
  diagrams           render diagrams/*.dot to SVG (needs Graphviz: apt-get install graphviz)
  simulate           the production model (crates/edge-model): --seed N replays one seed with its
                     trace; --seeds N [--from S] runs N seeds, prints violations and latencies;
                     --mode kv|durable (both by default), --consistent, --kv-propagation-secs N
  fuzz               schemathesis against both workers on a local stack (venv in target/fuzz-venv);
                     [--max-examples N] [--seed N] [-- SCHEMATHESIS ARGS...]
";

/// `--mode kv|durable` (dev, e2e, soak, bench): the workers' `DISPATCH_MODE` on every stack
/// they start, passed as `STACK_DISPATCH_MODE`. Taken out of `args`.
fn take_mode(args: &mut Vec<String>) -> Result<Option<String>> {
    let Some(at) = args.iter().position(|a| a == "--mode") else { return Ok(None) };
    let mode = args.get(at + 1).cloned().context("--mode needs a value: kv or durable")?;
    ensure!(mode == "kv" || mode == "durable", "--mode must be kv or durable, got {mode:?}");
    args.drain(at..at + 2);
    Ok(Some(mode))
}

/// A command that runs stacks, in `mode` when one was given.
fn stack_command(program: &str, mode: &Option<String>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(mode) = mode {
        cmd.env("STACK_DISPATCH_MODE", mode);
    }
    cmd
}

fn main() -> Result<()> {
    let mut args: Vec<String> = env::args().skip(1).collect();
    let mode = take_mode(&mut args)?;
    let root = project_root();
    env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("setup") => setup(&root),
        Some("build-worker") => {
            let name = args.get(1).context("usage: cargo xtask build-worker <api-worker|consumer-worker>")?;
            build_worker(&root, name)
        }
        Some("build") => build(&root),
        Some("lint") => lint(),
        Some("test") => test(&root),
        Some("e2e") => {
            build(&root)?;
            e2e(&mode)
        }
        Some("dev") => {
            build(&root)?;
            run(stack_command("cargo", &mode)
                .args(["run", "--release", "-q", "-p", "stack", "--bin", "stack", "--", "dev"])
                .args(&args[1..]))
        }
        Some("bench") => {
            build(&root)?;
            // The report prints the command as typed, which only this process knows.
            let typed = std::iter::once("cargo xtask bench").chain(args[1..].iter().map(String::as_str));
            let typed = typed.collect::<Vec<_>>().join(" ");
            // Both modes unless one is given; the bench sets each stack's mode itself.
            let modes = mode.clone().unwrap_or_else(|| "kv,durable".into());
            let typed = match &mode {
                Some(mode) => format!("{typed} --mode {mode}"),
                None => typed,
            };
            run(Command::new("cargo")
                .args(["run", "--release", "-q", "-p", "bench", "--", "--command", &typed, "--mode", &modes])
                .args(&args[1..]))
        }
        Some("diagrams") => diagrams(&root),
        Some("soak") => {
            build(&root)?;
            run(Command::new("cargo").args([
                "test",
                "--release",
                "-p",
                "stack",
                "--test",
                "e2e",
                "--",
                "--ignored",
                "--nocapture",
                "soak::",
            ]))
        }
        Some("simulate") => run(Command::new("cargo")
            .args(["run", "--release", "-q", "-p", "edge-model", "--bin", "simulate", "--"])
            .args(&args[1..])),
        Some("fuzz") => fuzz(&root, &args[1..]),
        Some("help" | "--help" | "-h") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown command {other:?}\n\n{HELP}"),
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", describe(cmd));
    let status = cmd.status().with_context(|| format!("could not start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(OsStr::to_string_lossy).collect::<Vec<_>>().join(" ")
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Installs what a fresh machine lacks, skipping what is present at the pinned version.
fn setup(root: &Path) -> Result<()> {
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !targets.lines().any(|t| t == "wasm32-unknown-unknown") {
        run(Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]))?;
    }

    let bindgen = locked_version(root, "wasm-bindgen")?;
    if output(Command::new("wasm-bindgen").arg("--version")).as_deref() != Some(&format!("wasm-bindgen {bindgen}")) {
        // `--locked` reproduces the CLI's own lockfile; fall back when the registry mirror
        // lacks one of its exact versions.
        let locked =
            run(Command::new("cargo").args(["install", "wasm-bindgen-cli", "--version", &bindgen, "--locked"]));
        if locked.is_err() {
            run(Command::new("cargo").args(["install", "wasm-bindgen-cli", "--version", &bindgen]))?;
        }
    }
    if output(Command::new("worker-build").arg("--version")).as_deref() != Some(WORKER_BUILD_VERSION) {
        run(Command::new("cargo").args(["install", "worker-build", "--version", WORKER_BUILD_VERSION, "--locked"]))?;
    }

    install_chromium()?;

    // npm ci wipes node_modules: run it only when package-lock.json changed since the last one,
    // so that running stacks (which load wrangler from node_modules) are not disturbed.
    let wanted = fs::read(root.join("package-lock.json")).context("package-lock.json is missing")?;
    let stamp_path = root.join("node_modules/.installed-lock-hash");
    let stamp = format!("{:016x}", fnv1a(&wanted));
    if fs::read_to_string(&stamp_path).ok().as_deref() != Some(stamp.as_str())
        || !root.join("node_modules/.bin/wrangler").exists()
    {
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]))?;
        fs::write(&stamp_path, &stamp)?;
    }
    Ok(())
}

/// The dashboard's browser test drives Debian's `chromium` headless. Installed with apt when
/// missing and running as root (CI runs `.ci/run` as root on a fresh machine); otherwise a
/// note, and that one test fails saying what is missing.
fn install_chromium() -> Result<()> {
    if Path::new("/usr/bin/chromium").exists() {
        return Ok(());
    }
    let root = output(Command::new("id").arg("-u")).as_deref() == Some("0");
    if !root || output(Command::new("apt-get").arg("--version")).is_none() {
        eprintln!(
            "note: /usr/bin/chromium is missing; the dashboard's browser test needs it (apt-get install chromium)"
        );
        return Ok(());
    }
    let candidate = output(Command::new("apt-cache").args(["policy", "chromium"])).unwrap_or_default();
    if !candidate.contains("Candidate:") || candidate.contains("Candidate: (none)") {
        run(Command::new("apt-get").args(["update"]))?;
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "chromium"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// FNV-1a: a stable fingerprint for change detection (not for security).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn locked_version(root: &Path, package: &str) -> Result<String> {
    let lock = fs::read_to_string(root.join("Cargo.lock"))?;
    let marker = format!("name = \"{package}\"\nversion = \"");
    let start = lock.find(&marker).with_context(|| format!("{package} is not in Cargo.lock"))? + marker.len();
    Ok(lock[start..].split('"').next().unwrap_or_default().to_owned())
}

/// Builds a worker with worker-build, pointing it at local tools instead of downloads.
fn build_worker(root: &Path, name: &str) -> Result<()> {
    if !WORKERS.contains(&name) {
        bail!("unknown worker {name:?}; expected one of {WORKERS:?}");
    }
    let crate_dir = root.join(name);
    let out = crate_dir.join("build/worker/shim.mjs");
    let sources = [
        root.join("crates/vm-task-types"),
        root.join("crates/vm-task-edge"),
        root.join("crates/worker-glue"),
        // The durable mode's queue and fronts, in both workers.
        root.join("crates/host-queue"),
        crate_dir.join("src"),
        crate_dir.join("Cargo.toml"),
        root.join("Cargo.lock"),
        root.join("openapi.json"),
    ];
    if let Ok(built) = fs::metadata(&out).and_then(|m| m.modified()) {
        if sources.iter().all(|s| newest_mtime(s) <= built) {
            eprintln!("{name}: up to date");
            return Ok(());
        }
    }
    let mut cmd = Command::new("worker-build");
    cmd.arg("--release").current_dir(&crate_dir);
    for (var, path) in [("ESBUILD_BIN", "node_modules/.bin/esbuild"), ("WASM_OPT_BIN", "node_modules/.bin/wasm-opt")] {
        let tool = root.join(path);
        if env::var_os(var).is_none() && tool.exists() {
            cmd.env(var, tool);
        }
    }
    if env::var_os("WASM_BINDGEN_BIN").is_none() {
        if let Some(home) = env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        {
            let bin = home.join("bin/wasm-bindgen");
            if bin.exists() {
                cmd.env("WASM_BINDGEN_BIN", bin);
            }
        }
    }
    run(&mut cmd)
}

fn newest_mtime(path: &Path) -> SystemTime {
    let own = fs::metadata(path).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
    if !path.is_dir() {
        return own;
    }
    let Ok(entries) = fs::read_dir(path) else { return own };
    entries
        .flatten()
        .filter(|e| !matches!(e.file_name().to_str(), Some("target" | "build" | "node_modules")))
        .map(|e| newest_mtime(&e.path()))
        .fold(own, SystemTime::max)
}

fn build(root: &Path) -> Result<()> {
    setup(root)?;
    for worker in WORKERS {
        build_worker(root, worker)?;
    }
    run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "arrakis-sim",
        "-p",
        "local-consumer",
        "-p",
        "stack",
        "-p",
        "vmctl",
    ]))
}

fn lint() -> Result<()> {
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--exclude",
        "api-worker",
        "--exclude",
        "consumer-worker",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo").args([
        "clippy",
        "--target",
        "wasm32-unknown-unknown",
        "-p",
        "api-worker",
        "-p",
        "consumer-worker",
        "--",
        "-D",
        "warnings",
    ]))
}

fn test(root: &Path) -> Result<()> {
    build(root)?;
    lint()?;
    run(Command::new("cargo").args([
        "test",
        "--workspace",
        "--exclude",
        "api-worker",
        "--exclude",
        "consumer-worker",
    ]))?;
    e2e(&None)?;
    for config in ["wrangler-api.toml", "wrangler-consumer.toml"] {
        run(Command::new("npx").args(["wrangler", "deploy", "--dry-run", "-c", config, "--outdir", "target/dry-run"]))?;
    }
    eprintln!("all checks passed");
    Ok(())
}

/// End-to-end tests: they start their own stacks from the release binaries and wasm builds.
/// Tests that drive the KV mode's own machinery (the buffer listing, the minute cron's lease
/// sweep, a buffered task's cancel window before a daemon polls): skipped in the durable mode,
/// whose counterparts are `crates/host-queue`'s native tests (lease alarm, cancel atomic with
/// claims, reconcile of lost messages).
const KV_MODE_ONLY_TESTS: [&str; 4] = [
    "edge::every_operation_round_trips_through_both_workers",
    "edge::an_expired_lease_returns_the_task_to_pending_via_the_cron",
    "edge::tasks_survive_a_wrangler_restart",
    "trust::a_cancelled_buffered_task_never_reaches_the_simulator",
];

fn e2e(mode: &Option<String>) -> Result<()> {
    // The soak and the fuzzing have their own commands (`cargo xtask soak`, `cargo xtask fuzz`).
    let mut args = vec!["test", "--release", "-p", "stack", "--test", "e2e", "--", "--ignored", "--test-threads=2"];
    args.extend(["--skip", "soak::", "--skip", "fuzz::"]);
    if mode.as_deref() == Some("durable") {
        for test in KV_MODE_ONLY_TESTS {
            args.extend(["--skip", test]);
        }
    }
    run(stack_command("cargo", mode).args(args))
}

/// Renders every `diagrams/*.dot` to an SVG beside it.
fn diagrams(root: &Path) -> Result<()> {
    let dir = root.join("diagrams");
    let mut sources: Vec<PathBuf> =
        fs::read_dir(&dir)?.flatten().map(|e| e.path()).filter(|p| p.extension() == Some(OsStr::new("dot"))).collect();
    sources.sort();
    for source in sources {
        run(Command::new("dot").arg("-Tsvg").arg(&source).arg("-o").arg(source.with_extension("svg")))?;
    }
    Ok(())
}

/// Schemathesis against both workers on an edge-only stack (`crates/stack/tests/e2e/fuzz.rs`),
/// from a venv in `target/fuzz-venv` made from `requirements-fuzz.txt`.
fn fuzz(root: &Path, args: &[String]) -> Result<()> {
    const USAGE: &str = "usage: cargo xtask fuzz [--max-examples N] [--seed N] [-- SCHEMATHESIS ARGS...]";
    let mut settings = Vec::new();
    let mut extra = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--max-examples" => settings.push(("FUZZ_MAX_EXAMPLES", args.next().context(USAGE)?.clone())),
            "--seed" => settings.push(("FUZZ_SEED", args.next().context(USAGE)?.clone())),
            "--" => extra.extend(args.by_ref().cloned()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }

    let venv = root.join("target/fuzz-venv");
    let requirements_path = root.join("requirements-fuzz.txt");
    let requirements = fs::read_to_string(&requirements_path).context("requirements-fuzz.txt is missing")?;
    let stamp = venv.join("requirements-fuzz.installed");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(requirements.as_str()) {
        if !venv.join("bin/pip").exists() {
            let python = env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
            run(Command::new(python).args(["-m", "venv"]).arg(&venv))?;
        }
        run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "-r"]).arg(&requirements_path))?;
        fs::write(&stamp, &requirements)?;
    }
    run(Command::new(venv.join("bin/openapi-spec-validator")).arg(root.join("openapi.json")))?;

    setup(root)?;
    for worker in WORKERS {
        build_worker(root, worker)?;
    }
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--release", "-p", "stack", "--test", "e2e", "--", "--ignored", "--nocapture", "fuzz::"])
        .env("SCHEMATHESIS", venv.join("bin/schemathesis"));
    for (name, value) in settings {
        cmd.env(name, value);
    }
    if !extra.is_empty() {
        cmd.env("FUZZ_EXTRA_ARGS", extra.join("\n"));
    }
    run(&mut cmd)
}
