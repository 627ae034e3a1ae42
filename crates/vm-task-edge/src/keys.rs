//! The KV key layout of both namespaces. Nothing outside this crate builds a key.
//!
//! `TASK_STORAGE` (owned by the API worker):
//! - `task:{inv}:{taskId}`: the task record; metadata = [`TaskSummary`](vm_task_types::TaskSummary).
//!   `inv` is `0xFFFFFFFFFFFF − createdAtMs` in 12 hex digits, so a plain listing is newest
//!   first; it is derived from the v7 task id itself, so a lookup by id needs no index.
//! - `vm:{vmName}`: the VM registry entry ([`crate::registry::VmRecord`]); metadata =
//!   [`VmSummary`](vm_task_types::wire::VmSummary), which `GET /vms` lists.
//! - `idem:{sha256(scope \n Idempotency-Key)}`: which task a key created, and a hash of its
//!   body; `scope` is a hash of the client's token, so keys are per client.
//! - `secret:cursor`: the key signing list cursors when `CURSOR_SECRET` is not set.
//! - `cancel:{taskId}`, `claim:{taskId}`: a client's cancel intent and the last claim's intent
//!   ([`crate::intents`]); each side writes its own, then reads the other's.
//!
//! `TASK_BUFFER` (owned by the consumer worker):
//! - `ready:{server}:{taskId}`: one buffered task; empty value; metadata =
//!   [`BufferedTask`](vm_task_types::wire::BufferedTask). v7 ids sort by creation time, so a
//!   host lists its own tasks oldest first with one `list(prefix = "ready:{server}:")`.
//! - `sweep:state`: where the sweep's walk over the task listing continues.
//! - `bell:{server}`: the doorbell, rewritten whenever tasks for `server` are buffered; idle
//!   daemons read it instead of listing.
//!
//! - `host:{server}:{consumerId}`: the host registry ([`crate::hosts`]); empty value; metadata
//!   = [`HostRecord`](vm_task_types::wire::HostRecord).
//! - `hostseen:{server}`: when any host last reported for `server`, in ms (the POST's check).
//!
//! Server and VM names cannot contain `:` (see `vm_task_types::validate`), so prefixes never
//! overlap.

use uuid::Uuid;

use crate::ports::task_id_millis;

const MAX_MS: u64 = 0xFFFF_FFFF_FFFF;

pub(crate) const TASK_PREFIX: &str = "task:";
pub(crate) const READY_PREFIX: &str = "ready:";
pub(crate) const VM_PREFIX: &str = "vm:";
pub(crate) const HOST_PREFIX: &str = "host:";
pub(crate) const CURSOR_SECRET: &str = "secret:cursor";
pub(crate) const SWEEP_STATE: &str = "sweep:state";

/// The record key of a task, or `None` for a UUID that is not a v7 task id.
pub(crate) fn task(id: Uuid) -> Option<String> {
    let ms = task_id_millis(id)?;
    Some(format!("task:{:012x}:{id}", MAX_MS - ms.min(MAX_MS)))
}

/// The task id at the end of a `task:` or `ready:` key.
#[cfg(test)]
pub(crate) fn task_id_of(key: &str) -> Option<Uuid> {
    Uuid::try_parse(key.rsplit(':').next()?).ok()
}

pub(crate) fn vm(vm_name: &str) -> String {
    format!("vm:{vm_name}")
}

pub(crate) fn idempotency(key_hash_hex: &str) -> String {
    format!("idem:{key_hash_hex}")
}

pub(crate) const CANCEL_PREFIX: &str = "cancel:";

pub(crate) fn cancel_intent(id: Uuid) -> String {
    format!("{CANCEL_PREFIX}{id}")
}

pub(crate) fn claim_intent(id: Uuid) -> String {
    format!("claim:{id}")
}

pub(crate) fn ready(server: &str, id: Uuid) -> String {
    format!("ready:{server}:{id}")
}

pub(crate) fn ready_prefix(server: &str) -> String {
    format!("ready:{server}:")
}

/// The server named in a `ready:{server}:{id}` key.
pub(crate) fn server_of_ready(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(READY_PREFIX)?;
    rest.rsplit_once(':').map(|(server, _)| server)
}

pub(crate) fn host(server: &str, consumer_id: &str) -> String {
    format!("host:{server}:{consumer_id}")
}

pub(crate) fn host_seen(server: &str) -> String {
    format!("hostseen:{server}")
}

pub(crate) fn host_prefix(server: &str) -> String {
    format!("host:{server}:")
}

pub(crate) fn bell(server: &str) -> String {
    format!("bell:{server}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v7(ms: u64) -> Uuid {
        uuid::Builder::from_unix_timestamp_millis(ms, &[7; 10]).into_uuid()
    }

    #[test]
    fn task_keys_sort_newest_first() {
        let older = task(v7(1_000)).unwrap();
        let newer = task(v7(2_000)).unwrap();
        assert!(newer < older, "{newer} should sort before {older}");
        assert!(older.starts_with(TASK_PREFIX));
        assert_eq!(task_id_of(&older), Some(v7(1_000)));
    }

    #[test]
    fn ready_keys_sort_oldest_first_within_a_server() {
        let a = ready("production", v7(1_000));
        let b = ready("production", v7(2_000));
        assert!(a < b);
        assert!(a.starts_with(&ready_prefix("production")));
        assert!(!a.starts_with(&ready_prefix("prod")));
        assert_eq!(server_of_ready(&a), Some("production"));
        assert_eq!(task_id_of(&b), Some(v7(2_000)));
    }

    #[test]
    fn non_v7_ids_have_no_task_key() {
        assert_eq!(task(Uuid::nil()), None);
        assert_eq!(task(Uuid::from_u128(0x4000_0000_0000_4000_8000_0000_0000_0000)), None);
    }
}
