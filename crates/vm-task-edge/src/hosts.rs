//! The host registry: which daemons serve which server names, and whether they are live.
//!
//! A daemon adds a few query parameters about itself to a long poll every
//! `HOST_REPORT_SECONDS` (120 by default, not every poll), and the consumer worker writes one
//! record per server name it serves, `host:{server}:{consumerId}` in `TASK_BUFFER`, with the
//! record as listing metadata, plus `hostseen:{server}` (the time, for the POST's check). An
//! idle host therefore costs two KV writes per server name every two minutes (43,200 a month,
//! about $0.22 at $5 per million); `GET /hosts` lists metadata without reading records, and a
//! POST reads one key (a read, ten times cheaper than a list). Writing is best effort: a failed or refused
//! write is retried by the next report, and never fails the poll.
//!
//! Liveness is the last-seen age against `HOST_LIVE_SECONDS` (300 by default: two missed
//! reports and a long poll's wait).

use vm_task_types::{validate, wire::HostRecord, FieldError, Timestamp};

use crate::{http::Request, keys, AppError, KvStore};

/// Default `HOST_LIVE_SECONDS`.
pub const HOST_LIVE_SECS_DEFAULT: u64 = 300;
/// Longest host name, version or consumer id accepted in a report.
const REPORT_FIELD_MAX: usize = 128;
/// KV metadata holds at most 1,024 bytes; the servers list is cut to stay under this.
const METADATA_BYTES_MAX: usize = 1_000;

/// The daemon's report in a poll's query, or `None` when the poll carries none (`hostName`
/// absent). `servers` are the poll's, already checked against the caller's token.
pub(crate) fn report_in(request: &Request, servers: &[String], now: Timestamp) -> Result<Option<HostRecord>, AppError> {
    let text = |name: &str, required: bool| -> Result<String, AppError> {
        let value = request.query_param(name).unwrap_or("");
        let bad =
            (required && value.is_empty()) || value.len() > REPORT_FIELD_MAX || value.chars().any(|c| c.is_control());
        if bad {
            return Err(AppError::invalid_field(FieldError::new(
                name,
                format!("must be 1 to {REPORT_FIELD_MAX} printable characters, got {value:?}"),
            )));
        }
        Ok(value.to_owned())
    };
    let number = |name: &str| -> Result<u32, AppError> {
        let raw = request.query_param(name).unwrap_or("0");
        raw.parse::<u32>()
            .map_err(|_| AppError::invalid_field(FieldError::new(name, format!("must be a whole number, got {raw:?}"))))
    };
    let arrakis_reachable = match request.query_param("arrakis") {
        None => None,
        Some("up") => Some(true),
        Some("down") => Some(false),
        Some(other) => {
            return Err(AppError::invalid_field(FieldError::new(
                "arrakis",
                format!("must be up or down, got {other:?}"),
            )))
        }
    };
    // Every report field is checked whenever it is sent, also on a poll that carries no
    // report, so a malformed one is a 400 as `openapi.json` says (found by schemathesis).
    for name in ["consumerId", "hostName", "version"] {
        if request.query_param(name).is_some() {
            text(name, false)?;
        }
    }
    let (concurrency, in_flight) = (number("concurrency")?, number("inFlight")?);
    if request.query_param("hostName").is_none() {
        return Ok(None);
    }
    if servers.is_empty() {
        return Err(AppError::invalid_field(FieldError::new("server", "is required with `hostName`")));
    }
    Ok(Some(HostRecord {
        server: String::new(),
        consumer_id: text("consumerId", true)?,
        host_name: text("hostName", true)?,
        version: text("version", false)?,
        concurrency,
        servers: servers.to_vec(),
        in_flight,
        arrakis_reachable,
        last_seen: now,
    }))
}

/// The durable mode's poll carries the same report: checked and written exactly as the KV
/// mode's poll does, by the worker (the host queue objects play no part, so a report wakes no
/// object). Returns the KV operations spent.
pub async fn record_from_poll<K: KvStore>(
    kv: &K,
    request: &Request,
    servers: &[String],
    now: Timestamp,
) -> Result<u64, AppError> {
    Ok(match report_in(request, servers, now)? {
        Some(report) => record(kv, &report).await,
        None => 0,
    })
}

/// Writes the report once per server name; failures are ignored (see the module doc).
/// Returns the KV operations spent.
pub(crate) async fn record<K: KvStore>(kv: &K, report: &HostRecord) -> u64 {
    let mut fitted = report.clone();
    while fitted.servers.len() > 1 && metadata_len(&fitted) > METADATA_BYTES_MAX {
        fitted.servers.pop();
    }
    let mut ops = 0;
    for server in &report.servers {
        let record = HostRecord { server: server.clone(), ..fitted.clone() };
        let Ok(metadata) = serde_json::to_value(&record) else { continue };
        ops += 2;
        let _ = kv.put(&keys::host(server, &record.consumer_id), "", Some(&metadata)).await;
        let _ = kv.put(&keys::host_seen(server), &report.last_seen.as_millis().to_string(), None).await;
    }
    ops
}

fn metadata_len(record: &HostRecord) -> usize {
    serde_json::to_vec(&HostRecord { server: "x".repeat(validate::Limits::NAME_MAX), ..record.clone() })
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// Every host record under `server`'s prefix (all servers' when `None`), by server name then
/// consumer id; at most `pages` KV list operations.
pub(crate) async fn list<K: KvStore>(kv: &K, server: Option<&str>, pages: usize) -> Result<Vec<HostRecord>, AppError> {
    let prefix = match server {
        Some(server) => keys::host_prefix(server),
        None => keys::HOST_PREFIX.to_owned(),
    };
    let mut records = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..pages {
        let page = kv.list(&prefix, 1000, cursor.as_deref()).await?;
        records.extend(page.keys.into_iter().filter_map(|k| k.metadata.and_then(|m| serde_json::from_value(m).ok())));
        match page.cursor.filter(|_| !page.list_complete) {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(records)
}

/// Whether a record seen at `last_seen` is live at `now`.
pub(crate) fn is_live(last_seen: Timestamp, now: Timestamp, live_secs: u64) -> bool {
    now.millis_since(last_seen) <= live_secs * 1000
}

/// When any host last reported for `server` (the POST's check: one read).
pub(crate) async fn last_seen<K: KvStore>(kv: &K, server: &str) -> Result<Option<Timestamp>, AppError> {
    Ok(kv.get(&keys::host_seen(server)).await?.and_then(|ms| ms.parse().ok()).map(Timestamp))
}

/// The POST's warning when no live host serves `server`, `None` when one does.
pub(crate) fn unserved_warning(
    last_seen: Option<Timestamp>,
    server: &str,
    now: Timestamp,
    live_secs: u64,
) -> Option<String> {
    let who = match last_seen {
        Some(seen) if is_live(seen, now, live_secs) => return None,
        Some(seen) => {
            format!("no live host serves server {server:?} (the last was seen {} s ago)", now.millis_since(seen) / 1000)
        }
        None => format!("no host has polled for server {server:?}"),
    };
    Some(format!(
        "{who}; the task stays queued until one does, and fails if none claims it within MAX_QUEUED_SECONDS (7 days unless the deployment changed it)"
    ))
}

/// Validates `GET /hosts?server=`.
pub(crate) fn server_filter(request: &Request) -> Result<Option<&str>, AppError> {
    match request.query_param("server") {
        None => Ok(None),
        Some(server) => {
            validate::check_server_name("server", server)?;
            Ok(Some(server))
        }
    }
}
