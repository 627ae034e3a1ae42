//! Prometheus text metrics and the `/healthz` endpoint, on a local port.
//!
//! Hand-rolled: a handful of counters, one gauge and one histogram do not justify a metrics
//! framework.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicI64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use arrakis_client::{ArrakisClient, ArrakisError};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use tokio_util::sync::CancellationToken;

use crate::edge::EdgeClient;

/// Upper bounds (seconds) of the task duration histogram.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Inner {
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
    durations: Mutex<BTreeMap<String, Histogram>>,
    in_flight: AtomicI64,
}

/// Cheap to clone; all clones share the figures.
#[derive(Debug, Clone, Default)]
pub struct Metrics(Arc<Inner>);

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn inc(&self, name: &'static str, label: &str) {
        let mut counters = self.0.counters.lock().unwrap_or_else(|p| p.into_inner());
        *counters.entry((name, label.to_owned())).or_default() += 1;
    }

    pub fn claimed(&self, operation: &str) {
        self.inc("local_consumer_tasks_claimed_total", operation);
    }

    pub fn finished(&self, operation: &str, completed: bool, took: Duration) {
        let name = if completed { "local_consumer_tasks_completed_total" } else { "local_consumer_tasks_failed_total" };
        self.inc(name, operation);
        let mut histograms = self.0.durations.lock().unwrap_or_else(|p| p.into_inner());
        let h = histograms.entry(operation.to_owned()).or_default();
        let secs = took.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    pub fn arrakis_error(&self, error: &ArrakisError) {
        let kind = match error {
            ArrakisError::NotFound { .. } => "not_found",
            ArrakisError::Api { .. } if error.is_transient() => "server_error",
            ArrakisError::Api { .. } => "refused",
            ArrakisError::Timeout { .. } => "timeout",
            ArrakisError::Connect { .. } => "connect",
            ArrakisError::Dropped { .. } => "dropped",
            ArrakisError::Protocol { .. } => "protocol",
            ArrakisError::InvalidName { .. } => "invalid_name",
        };
        self.inc("local_consumer_arrakis_errors_total", kind);
    }

    pub fn poll(&self, outcome: &str) {
        self.inc("local_consumer_polls_total", outcome);
    }

    pub fn edge_error(&self, call: &str) {
        self.inc("local_consumer_edge_errors_total", call);
    }

    pub fn in_flight_add(&self, delta: i64) {
        self.0.in_flight.fetch_add(delta, Relaxed);
    }

    pub fn in_flight(&self) -> i64 {
        self.0.in_flight.load(Relaxed)
    }

    /// The Prometheus text exposition of every figure.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let help = [
            ("local_consumer_tasks_claimed_total", "Tasks claimed, by operation."),
            ("local_consumer_tasks_completed_total", "Tasks reported completed, by operation."),
            ("local_consumer_tasks_failed_total", "Tasks reported failed, by operation."),
            ("local_consumer_arrakis_errors_total", "Failed Arrakis calls, by kind."),
            ("local_consumer_polls_total", "Polls of the consumer worker, by outcome."),
            ("local_consumer_edge_errors_total", "Failed calls to the workers, by call."),
        ];
        let label = |name: &str| match name {
            "local_consumer_arrakis_errors_total" => "kind",
            "local_consumer_polls_total" => "outcome",
            "local_consumer_edge_errors_total" => "call",
            _ => "operation",
        };
        let counters = self.0.counters.lock().unwrap_or_else(|p| p.into_inner());
        for (name, text) in help {
            let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} counter");
            for ((n, value), count) in counters.iter() {
                if *n == name {
                    let _ = writeln!(out, "{name}{{{}=\"{value}\"}} {count}", label(name));
                }
            }
        }
        drop(counters);
        let _ = writeln!(
            out,
            "# HELP local_consumer_in_flight Tasks being executed now.\n# TYPE local_consumer_in_flight gauge"
        );
        let _ = writeln!(out, "local_consumer_in_flight {}", self.in_flight());
        let name = "local_consumer_task_duration_seconds";
        let _ = writeln!(out, "# HELP {name} Time from claim to report, by operation.\n# TYPE {name} histogram");
        let histograms = self.0.durations.lock().unwrap_or_else(|p| p.into_inner());
        for (op, h) in histograms.iter() {
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(out, "{name}_bucket{{operation=\"{op}\",le=\"{bound}\"}} {}", h.counts[i]);
            }
            let _ = writeln!(out, "{name}_bucket{{operation=\"{op}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "{name}_sum{{operation=\"{op}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{operation=\"{op}\"}} {}", h.count);
        }
        out
    }
}

#[derive(Clone)]
struct HealthState {
    metrics: Metrics,
    edge: EdgeClient,
    arrakis: ArrakisClient,
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    edge: EdgeClient,
    arrakis: ArrakisClient,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(render)).route("/healthz", get(healthz)).with_state(HealthState {
        metrics,
        edge,
        arrakis,
    });
    use axum::serve::ListenerExt;
    // Nagle plus delayed ACK stalls small responses by 40 ms on loopback.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn render(State(state): State<HealthState>) -> impl IntoResponse {
    let mut text = state.metrics.render();
    state.edge.push_channel().render_metrics(&mut text);
    ([("content-type", "text/plain; version=0.0.4")], text)
}

/// 200 when both workers and Arrakis answer, 503 naming what does not.
async fn healthz(State(state): State<HealthState>) -> impl IntoResponse {
    let (edge, arrakis) = tokio::join!(state.edge.health(), async {
        tokio::time::timeout(Duration::from_secs(3), state.arrakis.health())
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()))
    });
    let check = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.clone(),
    };
    let healthy = edge.is_ok() && arrakis.is_ok();
    let body = serde_json::json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "workers": check(&edge),
        "arrakis": check(&arrakis),
        "inFlight": state.metrics.in_flight(),
    });
    (if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}
