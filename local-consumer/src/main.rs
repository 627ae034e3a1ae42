//! `local-consumer`: parses settings, sets up logging, runs the daemon until SIGTERM/SIGINT.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use local_consumer::config::{Cli, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // A `.env` beside the working directory, as the original daemon read; real environment
    // variables win.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let config = match cli.validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("local-consumer: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: in a file or the journal they are noise.
    let ansi = std::io::stdout().is_terminal();
    match config.log_format {
        LogFormat::Json => {
            tracing_subscriber::fmt().json().with_current_span(true).with_ansi(false).with_env_filter(filter).init()
        }
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("local-consumer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_handler(shutdown.clone()));
        local_consumer::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("local-consumer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn signal_handler(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    shutdown.cancel();
}
