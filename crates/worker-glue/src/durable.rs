//! Adapters for the `durable` dispatch mode: the host queue's storage over a Durable Object's
//! SQLite, and stubs of the `HOST_QUEUE` namespace behind [`HostQueues`]. No decisions here.

use host_queue::{front::HostQueues, object::Reply, HostStore, StoredEntry};
use serde::Deserialize;
use uuid::Uuid;
use vm_task_edge::counting::OpCounters;
use worker::{Method, ObjectNamespace, RequestInit, SqlCursor, SqlStorage};

/// [`HostStore`] over the object's SQLite: one row per task, one per counter. A failed
/// statement is kept in `failure`; the object then drops its in-memory state and reloads from
/// storage (the truth) rather than go on from a state it could not save. Every statement's
/// rows read and written (what SQLite storage is billed in) go to `counters`.
pub struct SqlHostStore {
    sql: SqlStorage,
    counters: &'static OpCounters,
    pub failure: Option<String>,
}

#[derive(Deserialize)]
struct BodyRow {
    body: String,
}

#[derive(Deserialize)]
struct ValueRow {
    value: i64,
}

impl SqlHostStore {
    pub fn open(sql: SqlStorage, counters: &'static OpCounters) -> Self {
        let mut store = Self { sql, counters, failure: None };
        store.run("CREATE TABLE IF NOT EXISTS entries (id TEXT PRIMARY KEY, body TEXT NOT NULL)", vec![]);
        store.run("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)", vec![]);
        store
    }

    /// Runs a statement; a write has run to completion when this returns (the runtime steps
    /// a statement to its first row at once), so its rows written are counted here.
    fn run(&mut self, query: &str, bindings: Vec<worker::SqlStorageValue>) -> Option<SqlCursor> {
        match self.sql.exec(query, Some(bindings)) {
            Ok(cursor) => {
                self.counters.count_do_rows(0, cursor.rows_written() as u64);
                Some(cursor)
            }
            Err(e) => {
                self.failure.get_or_insert_with(|| format!("{query}: {e}"));
                None
            }
        }
    }

    /// Counts the rows a query read, once its cursor has been consumed.
    fn count_read(&self, cursor: &SqlCursor) {
        self.counters.count_do_rows(cursor.rows_read() as u64, 0);
    }
}

impl HostStore for SqlHostStore {
    fn load_entries(&mut self) -> Vec<StoredEntry> {
        let Some(cursor) = self.run("SELECT body FROM entries ORDER BY id", vec![]) else { return Vec::new() };
        let rows: Vec<BodyRow> = cursor.to_array().unwrap_or_else(|e| {
            self.failure.get_or_insert_with(|| e.to_string());
            Vec::new()
        });
        self.count_read(&cursor);
        rows.iter().filter_map(|row| serde_json::from_str(&row.body).ok()).collect()
    }

    fn put_entry(&mut self, entry: &StoredEntry) {
        let body = serde_json::to_string(entry).unwrap_or_default();
        self.run(
            "INSERT INTO entries (id, body) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET body = excluded.body",
            vec![entry.task.id.to_string().into(), body.into()],
        );
    }

    fn delete_entry(&mut self, id: Uuid) {
        self.run("DELETE FROM entries WHERE id = ?", vec![id.to_string().into()]);
    }

    fn counter(&mut self, name: &str) -> u64 {
        let Some(cursor) = self.run("SELECT value FROM counters WHERE name = ?", vec![name.into()]) else { return 0 };
        let rows: Vec<ValueRow> = cursor.to_array().unwrap_or_default();
        self.count_read(&cursor);
        rows.first().map_or(0, |r| r.value.max(0) as u64)
    }

    fn set_counter(&mut self, name: &str, value: u64) {
        self.run(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            vec![name.into(), (value as i64).into()],
        );
    }
}

/// The `HOST_QUEUE` Durable Object namespace: one object per server name.
pub struct DurableQueues(pub ObjectNamespace);

impl DurableQueues {
    /// Passes a daemon's WebSocket upgrade to `server`'s object; the object's 101 response,
    /// with its socket, goes back to the daemon as it is.
    pub async fn connect(&self, server: &str, req: worker::Request) -> worker::Result<worker::Response> {
        let stub = self.0.get_by_name(server)?;
        let mut init = RequestInit::new();
        init.with_method(Method::Get).with_headers(req.headers().clone());
        stub.fetch_with_request(worker::Request::new_with_init("https://host-queue/connect", &init)?).await
    }
}

impl HostQueues for DurableQueues {
    async fn call(&self, server: &str, method: &str, path: &str, body: Vec<u8>) -> Result<Reply, String> {
        let stub = self.0.get_by_name(server).map_err(|e| e.to_string())?;
        let mut init = RequestInit::new();
        init.with_method(match method {
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            _ => Method::Get,
        });
        if !body.is_empty() {
            init.with_body(Some(worker::js_sys::Uint8Array::from(body.as_slice()).into()));
        }
        let request =
            worker::Request::new_with_init(&format!("https://host-queue{path}"), &init).map_err(|e| e.to_string())?;
        let mut response = stub.fetch_with_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status_code();
        let body = response.text().await.map_err(|e| e.to_string())?;
        Ok(Reply { status, body })
    }
}
