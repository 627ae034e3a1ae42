//! `arrakis-sim`: the simulator as a standalone server for out-of-process tests.
//!
//! Prints `arrakis-sim listening on http://ADDR` on stdout once bound (harnesses wait for that
//! line), logs to stderr with tracing, and exits cleanly on SIGINT or SIGTERM.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use arrakis_sim::{parse_duration, parse_latencies, parse_ops, Op, SimConfig};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// An in-memory simulator of the Arrakis VM REST server.
#[derive(Debug, Parser)]
#[command(name = "arrakis-sim", version)]
struct Cli {
    /// Address to listen on. Loopback by default: the simulator has no authentication.
    #[arg(long, env = "ARRAKIS_SIM_LISTEN", default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// Per-operation latency, e.g. `start=200ms,cmd=10ms`. Operations: health, list, start,
    /// get, stop, pause, resume, patch, delete, delete_all, snapshot, cmd, upload, download.
    #[arg(long, value_parser = parse_latencies, default_value = "")]
    latency: BTreeMap<Op, Duration>,
    /// Probability in [0, 1] of an injected 500 per request.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Seed of the fault sequence.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Operations whose requests hang (comma-separated or repeated).
    #[arg(long, value_parser = parse_ops)]
    hang: Vec<BTreeSet<Op>>,
    /// How long a hung request sleeps before being handled.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    hang_for: Duration,
    /// cmd/files timeout against a paused or stopped VM, and the cap on blocking commands.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    proxy_timeout: Duration,
    /// Factor applied to guest `sleep` durations.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Host port range for port forwards, `FIRST-LAST`.
    #[arg(long, value_parser = parse_port_range, default_value = "3000-6000")]
    port_range: (u16, u16),
    /// Return GET /v1/vms in name order instead of shuffled.
    #[arg(long)]
    no_shuffle: bool,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
    let parse = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
    let (first, last) = (parse(a)?, parse(b)?);
    if first > last {
        return Err(format!("{s:?}: FIRST must not exceed LAST"));
    }
    Ok((first, last))
}

impl Cli {
    fn config(&self) -> anyhow::Result<SimConfig> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.error_rate),
            "--error-rate must be within [0, 1], got {}",
            self.error_rate
        );
        anyhow::ensure!(
            self.time_scale.is_finite() && self.time_scale >= 0.0,
            "--time-scale must be a non-negative number, got {}",
            self.time_scale
        );
        Ok(SimConfig {
            latency: self.latency.clone(),
            error_rate: self.error_rate,
            seed: self.seed,
            hang_ops: self.hang.iter().flatten().copied().collect(),
            hang_for: self.hang_for,
            proxy_timeout: self.proxy_timeout,
            time_scale: self.time_scale,
            port_range: self.port_range,
            shuffle_list: !self.no_shuffle,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = cli.config()?;
    let listener =
        tokio::net::TcpListener::bind(cli.listen).await.with_context(|| format!("cannot listen on {}", cli.listen))?;
    let addr = listener.local_addr().context("no local address")?;
    let sim = arrakis_sim::Simulator::new(config.clone());
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    tracing::info!(%addr, ?config, "serving");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "arrakis-sim listening on http://{addr}").context("stdout")?;
        out.flush().context("stdout")?;
    }
    arrakis_sim::serve(listener, sim.router(), shutdown).await;
    sim.shutdown();
    tracing::info!("stopped");
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT"),
        _ = term => tracing::info!("SIGTERM"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_build_a_config() {
        let cli = Cli::try_parse_from([
            "arrakis-sim",
            "--latency",
            "start=200ms,cmd=10ms",
            "--error-rate",
            "0.3",
            "--seed",
            "42",
            "--hang",
            "cmd",
            "--hang",
            "upload,download",
            "--hang-for",
            "120s",
            "--proxy-timeout",
            "1s",
            "--time-scale",
            "0.5",
        ])
        .unwrap();
        let c = cli.config().unwrap();
        assert_eq!(cli.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.latency_of(Op::Start), Duration::from_millis(200));
        assert_eq!((c.error_rate, c.seed), (0.3, 42));
        assert_eq!(c.hang_ops, [Op::Cmd, Op::Upload, Op::Download].into());
        assert_eq!(c.hang_for, Duration::from_secs(120));
        assert_eq!(c.proxy_timeout, Duration::from_secs(1));
        assert_eq!(c.time_scale, 0.5);
        assert!(Cli::try_parse_from(["arrakis-sim", "--error-rate", "2"]).unwrap().config().is_err());
        assert!(Cli::try_parse_from(["arrakis-sim", "--latency", "boot=1s"]).is_err());
    }
}
