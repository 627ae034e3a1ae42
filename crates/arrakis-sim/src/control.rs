//! The `/_sim/` control API for out-of-process tests; not part of Arrakis.
//!
//! | Route | Body | Answer |
//! |---|---|---|
//! | `GET /_sim/log` | | `{"entries":[LogEntry…]}` |
//! | `DELETE /_sim/log` | | `{"cleared":N}` |
//! | `GET /_sim/config` | | [`ConfigView`](crate::ConfigView) |
//! | `PUT /_sim/config` | [`ConfigPatch`](crate::ConfigPatch) | the new `ConfigView` |
//! | `POST /_sim/fail-next` | `{"op","status"?,"message"?,"drop"?,"count"?}` | `{"op","pending"}` |
//! | `POST /_sim/zombie-next` | `{"count"?}` or empty | `{"pendingZombies"}` |
//! | `POST /_sim/restart` | | `{"destroyed":N}` |
//! | `GET /_sim/state` | | [`StateView`](crate::StateView) |
//!
//! Bad bodies get 400 `{"error":"<why>"}`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{ConfigPatch, Op};
use crate::sim::{Failure, Simulator, INJECTED_FAULT};

pub(crate) fn routes() -> Router<Simulator> {
    Router::new()
        .route("/_sim/log", get(get_log).delete(clear_log))
        .route("/_sim/config", get(get_config).put(put_config))
        .route("/_sim/fail-next", post(fail_next))
        .route("/_sim/zombie-next", post(zombie_next))
        .route("/_sim/restart", post(restart))
        .route("/_sim/state", get(state))
}

fn bad_request(why: impl std::fmt::Display) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": why.to_string() }))).into_response()
}

/// Parses a JSON body; an empty body means `T::default()`.
fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(bad_request)
}

async fn get_log(State(sim): State<Simulator>) -> Response {
    Json(json!({ "entries": sim.log() })).into_response()
}

async fn clear_log(State(sim): State<Simulator>) -> Response {
    Json(json!({ "cleared": sim.clear_log() })).into_response()
}

async fn get_config(State(sim): State<Simulator>) -> Response {
    Json(sim.config().view()).into_response()
}

async fn put_config(State(sim): State<Simulator>, body: Bytes) -> Response {
    let patch: ConfigPatch = match parse(&body) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    match sim.apply_config(&patch) {
        Ok(config) => Json(config.view()).into_response(),
        Err(why) => bad_request(why),
    }
}

/// `POST /_sim/fail-next`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailNextRequest {
    pub op: Option<Op>,
    /// Default 500.
    pub status: Option<u16>,
    /// Default the injected-fault message.
    pub message: Option<String>,
    /// Close the connection without a response instead.
    #[serde(default)]
    pub drop: bool,
    /// How many of the next requests fail; default 1.
    pub count: Option<u32>,
}

async fn fail_next(State(sim): State<Simulator>, body: Bytes) -> Response {
    let req: FailNextRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(op) = req.op else {
        return bad_request("`op` is required");
    };
    let failure = if req.drop {
        Failure::Drop
    } else {
        let status = req.status.unwrap_or(500);
        if !(100..=599).contains(&status) {
            return bad_request(format!("status {status} is not an HTTP status"));
        }
        Failure::status(status, req.message.unwrap_or_else(|| INJECTED_FAULT.to_string()))
    };
    sim.fail_next_times(op, failure, req.count.unwrap_or(1));
    let pending = sim.state().pending_failures.get(&op).copied().unwrap_or(0);
    Json(json!({ "op": op, "pending": pending })).into_response()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZombieRequest {
    count: Option<u32>,
}

async fn zombie_next(State(sim): State<Simulator>, body: Bytes) -> Response {
    let req: ZombieRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    for _ in 0..req.count.unwrap_or(1) {
        sim.zombie_next();
    }
    Json(json!({ "pendingZombies": sim.state().pending_zombies })).into_response()
}

async fn restart(State(sim): State<Simulator>) -> Response {
    let destroyed = sim.state().vms.len();
    sim.restart();
    Json(json!({ "destroyed": destroyed })).into_response()
}

async fn state(State(sim): State<Simulator>) -> Response {
    Json(sim.state()).into_response()
}
