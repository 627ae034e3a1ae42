//! `vmctl`: loads `.env`, parses the command line, runs the command, and exits with its code.

use std::process::ExitCode;

use clap::Parser;
use vmctl::{cli::Cli, error::CliError};

fn main() -> ExitCode {
    // Before parsing: clap reads API_URL and API_TOKEN from the environment `.env` adds to.
    // Variables already set win over the file.
    if let Err(error) = dotenvy::dotenv() {
        if !error.not_found() {
            return fail(&CliError::DotEnv { path: ".env".into(), reason: error.to_string() });
        }
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&CliError::Output(format!("cannot start the async runtime: {e}"))),
    };
    let mut stdout = std::io::stdout().lock();
    match runtime.block_on(vmctl::run(cli, &mut stdout)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => fail(&error),
    }
}

fn fail(error: &CliError) -> ExitCode {
    eprintln!("vmctl: {error}");
    ExitCode::from(error.exit_code())
}
