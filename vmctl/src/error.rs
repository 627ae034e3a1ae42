//! Everything that can stop a command, each worded as the problem and what to do about it,
//! and the exit code each maps to (listed in `vmctl --help`).

use uuid::Uuid;
use vm_task_types::TaskStatus;

/// Exit codes. `exec` passes the command's own code through instead of `OK`.
pub mod exit {
    pub const OK: u8 = 0;
    /// The task ended `failed` or `cancelled`.
    pub const TASK_FAILED: u8 = 1;
    /// Bad usage, missing settings, or a request the API rejected as invalid.
    pub const USAGE: u8 = 2;
    /// The API could not be reached, answered with a 5xx, or answered something unreadable.
    pub const UNAVAILABLE: u8 = 3;
    pub const UNAUTHORIZED: u8 = 4;
    pub const NOT_FOUND: u8 = 5;
    pub const CONFLICT: u8 = 6;
    /// Ctrl-C while waiting (128 + SIGINT, as shells report it).
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no API token: set API_TOKEN or pass --token (for `cargo xtask dev`: set -a; source .dev-state/tokens.env; set +a)")]
    NoToken,
    #[error(
        "API_URL {url:?} is not a usable URL: {reason}; set API_URL or pass --api-url, e.g. {}",
        crate::cli::DEFAULT_API_URL
    )]
    BadUrl { url: String, reason: String },
    #[error("cannot read {path}: {reason}")]
    DotEnv { path: String, reason: String },
    #[error("cannot reach the API at {url}: {reason}. {}", unreachable_hint(url))]
    Unreachable { url: String, reason: String },
    #[error("the API at {url} refused the token (401: {message}); check API_TOKEN or --token")]
    Unauthorized { url: String, message: String },
    #[error("not found (404): {message}")]
    NotFound { message: String },
    #[error("{}", conflict_text(message, *current_status))]
    Conflict { message: String, current_status: Option<TaskStatus> },
    #[error("the API rejected the request ({status}): {message}{}", field.as_ref().map(|f| format!(" (field: {f})")).unwrap_or_default())]
    Rejected { status: u16, message: String, field: Option<String> },
    #[error("the API failed ({status}): {message}")]
    ServerError { status: u16, message: String },
    #[error("unexpected answer from {url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("task {task_id} {status}: {}", error.as_deref().unwrap_or("no reason recorded"))]
    TaskFailed { task_id: Uuid, status: TaskStatus, error: Option<String> },
    /// A failure while following a task that was submitted: the task itself goes on.
    #[error(
        "{source}\ntask {task_id} was submitted and goes on without vmctl; follow it with `vmctl watch {task_id}`"
    )]
    WhileWaiting { task_id: Uuid, source: Box<CliError> },
    #[error("stopped waiting; task {task_id} goes on: follow it with `vmctl watch {task_id}`")]
    Interrupted { task_id: Uuid },
    #[error("cannot write the output: {0}")]
    Output(String),
    /// A local file or argument `cp` cannot use, said with what to do.
    #[error("{0}")]
    Local(String),
}

/// A local URL is most likely the dev stack not running; any other, a wrong setting or network.
fn unreachable_hint(url: &str) -> &'static str {
    if ["://127.", "://localhost", "://[::1]"].iter().any(|local| url.contains(local)) {
        "Is `cargo xtask dev` running? (Another API: set API_URL or pass --api-url.)"
    } else {
        "Check API_URL (or --api-url) and the network."
    }
}

fn conflict_text(message: &str, current: Option<TaskStatus>) -> String {
    match current {
        Some(status) if !message.contains(status.as_str()) => {
            format!("conflict (409): {message} (current status: {status})")
        }
        _ => format!("conflict (409): {message}"),
    }
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::TaskFailed { .. } => exit::TASK_FAILED,
            Self::NoToken | Self::BadUrl { .. } | Self::DotEnv { .. } | Self::Rejected { .. } | Self::Local(_) => {
                exit::USAGE
            }
            Self::Unreachable { .. } | Self::ServerError { .. } | Self::Protocol { .. } | Self::Output(_) => {
                exit::UNAVAILABLE
            }
            Self::Unauthorized { .. } => exit::UNAUTHORIZED,
            Self::NotFound { .. } => exit::NOT_FOUND,
            Self::Conflict { .. } => exit::CONFLICT,
            Self::WhileWaiting { source, .. } => source.exit_code(),
            Self::Interrupted { .. } => exit::INTERRUPTED,
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        Self::Output(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(error: CliError, code: u8, needles: &[&str]) {
        let text = error.to_string();
        assert_eq!(error.exit_code(), code, "{text}");
        for needle in needles {
            assert!(text.contains(needle), "{text:?} lacks {needle:?}");
        }
    }

    #[test]
    fn each_error_names_the_problem_and_what_to_do() {
        check(CliError::NoToken, exit::USAGE, &["set API_TOKEN or pass --token"]);
        check(
            CliError::Unreachable { url: "http://127.0.0.1:9/health".into(), reason: "connection refused".into() },
            exit::UNAVAILABLE,
            &["http://127.0.0.1:9/health", "connection refused", "Is `cargo xtask dev` running?"],
        );
        check(
            CliError::Unreachable { url: "https://api.example.com/vm/tasks".into(), reason: "dns error".into() },
            exit::UNAVAILABLE,
            &["https://api.example.com/vm/tasks: dns error", "Check API_URL (or --api-url)"],
        );
        check(
            CliError::Unauthorized { url: "http://x".into(), message: "invalid token".into() },
            exit::UNAUTHORIZED,
            &["401", "API_TOKEN or --token"],
        );
        check(CliError::NotFound { message: "task 1 not found".into() }, exit::NOT_FOUND, &["404", "task 1 not found"]);
        check(
            CliError::Rejected {
                status: 422,
                message: "payload.vmName: contains '/'".into(),
                field: Some("payload.vmName".into()),
            },
            exit::USAGE,
            &["422", "contains '/'", "(field: payload.vmName)"],
        );
        check(
            CliError::TaskFailed { task_id: Uuid::nil(), status: TaskStatus::Failed, error: Some("boom".into()) },
            exit::TASK_FAILED,
            &["failed: boom"],
        );
    }

    #[test]
    fn a_conflict_names_the_current_status_once() {
        let said = CliError::Conflict {
            message: "task x is processing; only a pending task can be cancelled".into(),
            current_status: Some(TaskStatus::Processing),
        };
        assert_eq!(said.to_string(), "conflict (409): task x is processing; only a pending task can be cancelled");
        let unsaid = CliError::Conflict { message: "claim held".into(), current_status: Some(TaskStatus::Completed) };
        assert_eq!(unsaid.to_string(), "conflict (409): claim held (current status: completed)");
        assert_eq!(unsaid.exit_code(), exit::CONFLICT);
    }

    #[test]
    fn a_failure_while_waiting_keeps_its_code_and_says_how_to_follow_the_task() {
        let error = CliError::WhileWaiting {
            task_id: Uuid::nil(),
            source: Box::new(CliError::ServerError { status: 503, message: "kv down".into() }),
        };
        assert_eq!(error.exit_code(), exit::UNAVAILABLE);
        assert!(error.to_string().contains("vmctl watch 00000000-0000-0000-0000-000000000000"), "{error}");
    }
}
