//! `stack dev`: the whole local system on well-known ports until Ctrl-C.
//!
//! `cargo xtask dev` builds everything and runs `stack dev`. State (KV contents, logs, tokens)
//! lives in `<repo>/.dev-state/` so tasks and tokens survive restarts. The benchmarks are their
//! own program, `crates/bench` (`cargo xtask bench`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use stack::{random_token, random_webhook_secret, repo_root, write_private, Stack, StackOptions};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "stack",
    about = "Runs the local stack: both workers under wrangler dev, the Arrakis simulator and the daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start everything on fixed ports, print URLs, tokens and example requests, and run until
    /// Ctrl-C or SIGTERM.
    Dev(DevArgs),
}

#[derive(Debug, clap::Args)]
struct DevArgs {
    /// The gateway's port: the API worker at `/`, the consumer worker at `/consumer`.
    #[arg(long, default_value_t = 8787)]
    port: u16,
    /// Directory for KV state, logs and tokens (default: `<repo>/.dev-state`).
    #[arg(long)]
    persist: Option<PathBuf>,
    /// A real Arrakis server; without it the simulator runs on `--sim-listen`.
    #[arg(long, env = "ARRAKIS_URL")]
    arrakis_url: Option<String>,
    #[arg(long, default_value = "127.0.0.1:7000")]
    sim_listen: SocketAddr,
    /// Servers the daemon serves (comma-separated). The first is also the workers'
    /// `DEFAULT_TARGET_SERVER`, so tasks may omit `targetServer`.
    #[arg(long, default_value = "production", value_delimiter = ',')]
    server_names: Vec<String>,
    /// The daemon's `/metrics` and `/healthz`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Worker var override, `NAME=VALUE` (repeatable), e.g. `--var BELL_CHECK_MS=250`.
    #[arg(long = "var", value_parser = parse_var)]
    vars: Vec<(String, String)>,
    /// Run the workers (and simulator) only; start a daemon yourself.
    #[arg(long)]
    no_daemon: bool,
    /// How often to fire the cron trigger (the lease sweep), in seconds.
    #[arg(long, default_value_t = 30)]
    cron_seconds: u64,
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    Ok((name.trim().to_owned(), value.to_owned()))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Dev(args) => dev(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stack: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dev(args: DevArgs) -> Result<()> {
    let root = repo_root();
    let state = args.persist.clone().unwrap_or_else(|| root.join(".dev-state"));
    std::fs::create_dir_all(&state).with_context(|| format!("could not create {}", state.display()))?;
    let tokens_file = state.join("tokens.env");
    let (client_token, consumer_token, webhook_secret) = dev_tokens(&tokens_file)?;

    let mut opts = StackOptions::default()
        .tokens(&client_token, &consumer_token)
        .webhook_secret(&webhook_secret)
        .dir(&state)
        .persist_to(state.join("wrangler"))
        .gateway_port(args.port)
        .metrics_addr(args.metrics_addr)
        .server_names(args.server_names.clone())
        .consumer_id("dev-consumer")
        .cron_every(Duration::from_secs(args.cron_seconds.max(1)))
        .sim_listen(args.sim_listen);
    if let Some(url) = &args.arrakis_url {
        opts = opts.arrakis_url(url);
    }
    if args.no_daemon {
        opts = opts.without_daemon();
    }
    if let Some(first) = args.server_names.first() {
        if !args.vars.iter().any(|(k, _)| k == "DEFAULT_TARGET_SERVER") {
            opts = opts.worker_var("DEFAULT_TARGET_SERVER", first);
        }
    }
    for (name, value) in &args.vars {
        opts = opts.worker_var(name, value);
    }

    let mut stack = Stack::start(opts).await?;
    print_banner(&stack, &args, &tokens_file);

    let mut term = signal(SignalKind::terminate()).context("could not listen for SIGTERM")?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = term.recv() => break Ok(()),
            _ = check.tick() => {
                if let Err(e) = stack.check_alive() {
                    break Err(e);
                }
            }
        }
    };
    eprintln!("stopping the stack...");
    let stopped = stack.shutdown().await;
    outcome?;
    stopped
}

/// The dev tokens and webhook secret from `tokens.env`, created with fresh random ones on
/// first use (a file from before webhooks gets a secret appended).
fn dev_tokens(path: &Path) -> Result<(String, String, String)> {
    if path.exists() {
        let text = std::fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?;
        let get = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let (Some(client), Some(consumer)) = (get("API_TOKEN"), get("CONSUMER_TOKEN")) else {
            bail!("{} must define API_TOKEN and CONSUMER_TOKEN (delete it to get new ones)", path.display())
        };
        if let Some(secret) = get("WEBHOOK_SECRET") {
            return Ok((client, consumer, secret));
        }
        let secret = random_webhook_secret();
        write_private(path, &format!("{}\nWEBHOOK_SECRET={secret}\n", text.trim_end()))?;
        return Ok((client, consumer, secret));
    }
    let (client, consumer, secret) =
        (random_token("dev-client"), random_token("dev-consumer"), random_webhook_secret());
    let text = format!(
        "# Tokens of the local dev stack (`cargo xtask dev`). Delete this file for new ones.\nAPI_TOKEN={client}\nCONSUMER_TOKEN={consumer}\n# Signs webhook deliveries (README \"Webhooks\").\nWEBHOOK_SECRET={secret}\n"
    );
    write_private(path, &text)?;
    Ok((client, consumer, secret))
}

fn print_banner(stack: &Stack, args: &DevArgs, tokens_file: &Path) {
    let api = stack.api_url();
    let token = stack.client_token();
    let arrakis_kind = if args.arrakis_url.is_some() { "external" } else { "simulator" };
    let daemon = if args.no_daemon {
        "not started (--no-daemon)".to_owned()
    } else {
        format!("{}/metrics", stack.metrics_url())
    };
    let server = args.server_names.first().map(String::as_str).unwrap_or("production");
    println!(
        r#"
Local stack is up. State and logs: {dir}

  API worker       {api}
  consumer worker  {consumer}
  Arrakis          {arrakis} ({arrakis_kind})
  daemon           {daemon}
  lease sweep      every {cron} s ({api}/__scheduled?cron=*+*+*+*+*)

  API token        {token}
  consumer token   {consumer_token}
  webhook secret   {webhook_secret}
  (kept in {tokens_file})

Try:
  curl -s {api}/health
  curl -s -X POST {api}/vm/tasks -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \
    -d '{{"type":"launch_vm","payload":{{"vmName":"test-vm-001","vmConfig":{{"memory":"2G"}},"targetServer":"{server}"}}}}'
  curl -s '{api}/vm/tasks/TASK_ID/status?wait=30' -H 'Authorization: Bearer {token}'

Ctrl-C stops everything.
"#,
        dir = stack.dir().display(),
        consumer = stack.consumer_url(),
        arrakis = stack.arrakis_url(),
        cron = args.cron_seconds.max(1),
        consumer_token = stack.consumer_token(),
        webhook_secret = stack.webhook_secret(),
        tokens_file = tokens_file.display(),
    );
}
