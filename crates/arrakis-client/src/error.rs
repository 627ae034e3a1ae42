//! [`ArrakisError`] and the classification of the real server's error bodies.
//!
//! Arrakis reports almost every failure as a 500 with a free-text message (BEHAVIOR.md §0.1,
//! §2, §6), so the kind of error (VM missing, refused state change, exhausted pool, something
//! worth retrying) has to be read from the wording. The patterns below are the documented ones;
//! anything unrecognised is [`ApiErrorKind::Unavailable`], i.e. retried, since an unknown 500
//! is more often a passing condition than a permanent one.

use std::time::Duration;

/// What went wrong talking to Arrakis.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArrakisError {
    /// The VM does not exist (a 500 whose message says `vm not found: <n>` or `vm <n> not found`).
    #[error("vm {vm_name:?} not found on arrakis")]
    NotFound { vm_name: String, message: String },
    /// Any other error body `{"error":{"message":…}}` a handler sent.
    #[error("arrakis answered HTTP {status} ({kind:?}): {message}")]
    Api { status: u16, kind: ApiErrorKind, message: String },
    /// No complete response within the operation's timeout. The operation may still have
    /// taken effect on the server.
    #[error("arrakis {operation} timed out after {after:?}")]
    Timeout { operation: &'static str, after: Duration },
    /// Could not connect: refused, DNS failure, unreachable.
    #[error("cannot connect to arrakis: {message}")]
    Connect { message: String },
    /// The connection closed without a (complete) response, as after a recovered panic on the
    /// server (§0).
    #[error("arrakis closed the connection without a response: {message}")]
    Dropped { message: String },
    /// A response that is not what a handler sends: router 404/405/301, a proxy's error page,
    /// or a body that does not decode.
    #[error("unexpected arrakis response (HTTP {status}): {message}")]
    Protocol { status: u16, message: String },
    /// A VM name, snapshot id, download path or base URL that cannot be sent safely; no
    /// request was made. Names must be non-empty, not `.` or `..`, without `/` or control
    /// characters.
    #[error("rejected before sending: {name:?} is not a usable name, path or base URL")]
    InvalidName { name: String },
}

/// Which kind of handler error an [`ArrakisError::Api`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiErrorKind {
    /// The request itself is wrong (a 400, a command the guest refuses to parse, a snapshot id
    /// that does not exist). Retrying the same request will not help.
    InvalidRequest,
    /// The VM's state refuses the operation: already running, cannot pause/resume/stop from
    /// here, snapshot id taken, restored VM cannot be snapshotted, tap or CID held.
    Conflict,
    /// A pool ran dry: guest IPs, host ports (they leak until a restart, §6.7) or vsock CIDs.
    Exhausted,
    /// Anything else, including injected faults, the guest agent not answering (`failed to
    /// execute request`) and gateway errors. Worth retrying.
    Unavailable,
}

impl ArrakisError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ArrakisError::NotFound { .. })
    }

    /// Whether retrying the same call later may succeed: connection problems, timeouts,
    /// dropped connections, unclassified 5xx and gateway statuses.
    pub fn is_transient(&self) -> bool {
        match self {
            ArrakisError::Connect { .. } | ArrakisError::Dropped { .. } | ArrakisError::Timeout { .. } => true,
            ArrakisError::Api { kind, .. } => *kind == ApiErrorKind::Unavailable,
            ArrakisError::Protocol { status, .. } => matches!(status, 502..=504),
            ArrakisError::NotFound { .. } | ArrakisError::InvalidName { .. } => false,
        }
    }

    /// Whether a failed `run_command` certainly did not reach the guest, so sending it again
    /// cannot run it twice: the connection failed, a gateway answered, or Arrakis failed
    /// before forwarding it. A timeout anywhere (ours, or the guest proxy's 30 s, §2.9) or a
    /// dropped connection means it may be running.
    pub fn command_not_delivered(&self) -> bool {
        match self {
            ArrakisError::Connect { .. } => true,
            ArrakisError::Api { message, .. } => {
                self.is_transient() && !message.contains("Timeout") && !message.contains("timeout")
            }
            ArrakisError::Protocol { status, .. } => matches!(status, 502 | 503),
            _ => false,
        }
    }

    /// Whether Arrakis refused because the id is taken (a snapshot id, §2.8): after a retry,
    /// that is usually the earlier attempt's own work.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, ArrakisError::Api { kind: ApiErrorKind::Conflict, message, .. } if message.contains("already exists"))
    }
}

/// Message fragments for refusals that depend on the VM's state (§2.3, §2.6, §2.8, §3.5).
const CONFLICT: &[&str] = &[
    "failed to boot existing VM",
    "failed to stop VM",
    "failed to pause VM",
    "failed to resume VM",
    "already exists",
    "source file not found",
    "is not available",
];

/// Message fragments for exhausted allocators (§2.3, §4, §6.7).
const EXHAUSTED: &[&str] = &["no available IPs", "no available ports", "no available CIDs"];

/// Turns an error body into an [`ArrakisError`]. `vm_name` is the VM the call addressed, if
/// any; only a message naming exactly that VM counts as not-found.
pub(crate) fn classify(status: u16, message: String, vm_name: Option<&str>) -> ArrakisError {
    if status == 500 {
        if let Some(name) = vm_name.filter(|n| !n.is_empty()) {
            // Both wordings occur (§0.1); a bare "not found" does not count.
            if message.ends_with(&format!("vm not found: {name}")) || message.ends_with(&format!("vm {name} not found"))
            {
                return ArrakisError::NotFound { vm_name: name.to_string(), message };
            }
        }
    }
    let kind = match status {
        400..=499 => ApiErrorKind::InvalidRequest,
        500 => classify_500(&message),
        _ => ApiErrorKind::Unavailable,
    };
    ArrakisError::Api { status, kind, message }
}

fn classify_500(message: &str) -> ApiErrorKind {
    if EXHAUSTED.iter().any(|p| message.contains(p)) {
        ApiErrorKind::Exhausted
    } else if CONFLICT.iter().any(|p| message.contains(p)) {
        ApiErrorKind::Conflict
    } else if message.contains("request failed with status: 400")
        || (message.contains("snapshot with ID") && message.ends_with("does not exist"))
    {
        // The guest agent refused to parse the command (§2.9), or the snapshot to restore
        // does not exist (§3.5): the same request fails the same way every time.
        ApiErrorKind::InvalidRequest
    } else {
        ApiErrorKind::Unavailable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPAQUE: &str = "{0xc0001b4000}";

    fn kind(status: u16, message: &str) -> ApiErrorKind {
        match classify(status, message.to_string(), Some("vm1")) {
            ArrakisError::Api { kind, .. } => kind,
            other => panic!("{message}: expected Api, got {other:?}"),
        }
    }

    #[test]
    fn not_found_table_of_section_0_1() {
        let table = [
            "Failed to list VM: rpc error: code = NotFound desc = vm not found: vm1",
            "Failed to change VM state to 'stopped': rpc error: code = NotFound desc = vm vm1 not found",
            "Failed to change VM state to 'paused': rpc error: code = NotFound desc = vm not found: vm1",
            "Failed to change VM state to 'resume': rpc error: code = NotFound desc = vm not found: vm1",
            "Failed to destroy VM: rpc error: code = Internal desc = failed to destroy vm: vm1: vm vm1 not found",
            "Failed to create snapshot: rpc error: code = NotFound desc = vm not found: vm1",
            "Failed to execute command: rpc error: code = NotFound desc = vm not found: vm1",
            "Failed to upload files: rpc error: code = NotFound desc = vm not found: vm1",
            "Failed to download files: rpc error: code = NotFound desc = vm not found: vm1",
        ];
        for message in table {
            let err = classify(500, message.to_string(), Some("vm1"));
            assert!(err.is_not_found(), "{message}: {err:?}");
            assert!(!err.is_transient());
            assert_eq!(err, ArrakisError::NotFound { vm_name: "vm1".into(), message: message.into() });
        }
    }

    #[test]
    fn not_found_needs_the_exact_name_and_a_500() {
        let msg = "Failed to list VM: rpc error: code = NotFound desc = vm not found: vm10";
        assert!(!classify(500, msg.into(), Some("vm1")).is_not_found());
        let msg = "Failed to list VM: rpc error: code = NotFound desc = vm not found: vm1";
        assert!(!classify(400, msg.into(), Some("vm1")).is_not_found());
        assert!(!classify(500, msg.into(), None).is_not_found());
        // Other 500s also say "not found" (§2.8).
        let restored = "Failed to create snapshot: failed to copy stateful disk to snapshot directory: source file not found: stat : no such file or directory";
        assert_eq!(kind(500, restored), ApiErrorKind::Conflict);
    }

    #[test]
    fn bad_requests() {
        for message in [
            "Invalid request format: EOF",
            "Invalid request format: json: unknown field \"x\"",
            "Invalid request format: no value given for required property cmd",
            "Empty vm name",
            "Invalid status value: running",
            "Command cannot be empty",
            "No files provided for upload",
            "Missing 'paths' query parameter",
        ] {
            assert_eq!(kind(400, message), ApiErrorKind::InvalidRequest, "{message}");
        }
        assert_eq!(
            kind(500, "Failed to execute command: request failed with status: 400"),
            ApiErrorKind::InvalidRequest
        );
        assert_eq!(
            kind(500, "Failed to start VM: failed to restore VM from snapshot: snapshot with ID s1 does not exist"),
            ApiErrorKind::InvalidRequest
        );
    }

    #[test]
    fn state_conflicts() {
        let messages = [
            format!("Failed to start VM: rpc error: code = Internal desc = failed to boot existing VM: failed to boot VM resp.Body: {OPAQUE}: 500 Internal Server Error"),
            "Failed to change VM state to 'stopped': rpc error: code = Internal desc = failed to stop VM: 500 Internal Server Error".into(),
            format!("Failed to change VM state to 'paused': rpc error: code = Internal desc = failed to pause VM: failed to pause VM resp.Body: {OPAQUE}: 500 Internal Server Error"),
            format!("Failed to change VM state to 'resume': rpc error: code = Internal desc = failed to resume VM: failed to resume VM resp.Body: {OPAQUE}: 500 Internal Server Error"),
            "Failed to create snapshot: snapshot with ID s1 already exists".into(),
            "Failed to create snapshot: snapshot with ID  already exists".into(),
            "Failed to create snapshot: failed to pause VM: 500 Internal Server Error".into(),
            "Failed to start VM: failed to restore VM from snapshot: failed to create tap device: tap ID 0 is not available".into(),
            "Failed to start VM: failed to restore VM from snapshot: failed to claim CID from allocator: CID 3 is not available".into(),
        ];
        for message in &messages {
            let err = classify(500, message.clone(), Some("vm1"));
            assert!(matches!(err, ArrakisError::Api { kind: ApiErrorKind::Conflict, .. }), "{message}");
            assert!(!err.is_transient(), "{message}");
        }
    }

    #[test]
    fn exhausted_pools() {
        for message in [
            "Failed to start VM: error allocating guest ip: no available IPs",
            "Failed to start VM: failed to forward ports to VM: failed to allocate port: no available ports in range 3000-6000",
            "Failed to start VM: failed to allocate CID: no available CIDs in range 3-1000",
            "Failed to start VM: failed to restore VM from snapshot: failed to forward ports to VM: failed to allocate port: no available ports in range 3000-6000",
        ] {
            assert_eq!(kind(500, message), ApiErrorKind::Exhausted, "{message}");
        }
    }

    #[test]
    fn transient_failures() {
        for message in [
            "Internal Server Error: injected fault",
            &format!("Failed to start VM: failed to boot VM resp.Body: {OPAQUE}: 500 Internal Server Error"),
            "Failed to start VM: error waiting for vm: context deadline exceeded",
            "Failed to execute command: failed to execute request: Post \"http://10.20.1.2:4031/cmd\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
            "Failed to upload files: rpc error: code = Internal desc = failed to execute request: Post \"http://10.20.1.2:4031/files\": EOF",
            "Failed to upload files: rpc error: code = Internal desc = request failed with status: 500",
            "Failed to download files: rpc error: code = Internal desc = request failed with status: 502",
            "Failed to destroy VM: rpc error: code = Internal desc = failed to destroy vm: vm1: failed to destroy vm: vm1: rpc error: code = Internal desc = failed to delete VM: x",
            "Failed to destroy all VMs: rpc error: code = Internal desc = failed to destroy all VMs: x",
            "Failed to list all VMs: x",
            "Failed to create snapshot: failed to create snapshot: 500: body",
        ] {
            let err = classify(500, message.to_string(), Some("vm1"));
            assert!(err.is_transient(), "{message}: {err:?}");
        }
        for status in [502, 503, 504] {
            assert!(classify(status, "gateway".into(), None).is_transient());
            assert!(ArrakisError::Protocol { status, message: String::new() }.is_transient());
        }
        for status in [301, 404, 405, 200] {
            assert!(!ArrakisError::Protocol { status, message: String::new() }.is_transient());
        }
        assert!(ArrakisError::Dropped { message: String::new() }.is_transient());
        assert!(ArrakisError::Connect { message: String::new() }.is_transient());
        assert!(ArrakisError::Timeout { operation: "cmd", after: Duration::from_secs(1) }.is_transient());
        assert!(!ArrakisError::InvalidName { name: String::new() }.is_transient());
    }

    #[test]
    fn commands_are_resent_only_when_they_cannot_have_reached_the_guest() {
        let not_delivered = [
            ArrakisError::Connect { message: "connection refused".into() },
            classify(500, "Internal Server Error: injected fault".into(), Some("vm1")),
            ArrakisError::Protocol { status: 502, message: String::new() },
            ArrakisError::Protocol { status: 503, message: String::new() },
        ];
        for e in &not_delivered {
            assert!(e.command_not_delivered(), "{e:?}");
        }
        let maybe_delivered = [
            classify(500, "Failed to execute command: failed to execute request: Post \"http://10.20.1.2:4031/cmd\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)".into(), Some("vm1")),
            ArrakisError::Timeout { operation: "run_command", after: Duration::from_secs(35) },
            ArrakisError::Dropped { message: String::new() },
            ArrakisError::Protocol { status: 504, message: String::new() },
            classify(500, "Failed to execute command: request failed with status: 400".into(), Some("vm1")),
        ];
        for e in &maybe_delivered {
            assert!(!e.command_not_delivered(), "{e:?}");
        }
    }

    #[test]
    fn a_taken_snapshot_id_is_already_exists() {
        assert!(classify(500, "Failed to create snapshot: snapshot with ID s1 already exists".into(), Some("vm1"))
            .is_already_exists());
        assert!(!classify(
            500,
            "Failed to create snapshot: failed to pause VM: 500 Internal Server Error".into(),
            Some("vm1")
        )
        .is_already_exists());
        assert!(!classify(500, "Internal Server Error: injected fault".into(), Some("vm1")).is_already_exists());
    }
}
