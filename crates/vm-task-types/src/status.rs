//! Task status and the one place its legal transitions are written down.
//!
//! ```text
//!   pending ──claim──▶ processing ──▶ completed
//!     │  ▲                 │    └───▶ failed
//!     │  └─lease expired / released
//!     ├──▶ cancelled   (client, before any claim)
//!     └──▶ failed      (dead-lettered, or attempts exhausted)
//!   processing ──▶ cancelled  (a long command the client cancelled, stopped in the guest by
//!                              the daemon holding the claim)
//! ```
//! `completed`, `failed` and `cancelled` are terminal: nothing leaves them.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 5] = [Self::Pending, Self::Processing, Self::Completed, Self::Failed, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Whether `self → to` is a legal transition.
    pub fn can_become(self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, to),
            (Pending, Processing | Cancelled | Failed) | (Processing, Completed | Failed | Pending | Cancelled)
        )
    }

    /// [`can_become`](Self::can_become) as a `Result`, for `?`.
    pub fn check_transition(self, to: TaskStatus) -> Result<(), TransitionError> {
        if self.can_become(to) {
            Ok(())
        } else {
            Err(TransitionError { from: self, to })
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition {from} → {to}{}", if from.is_terminal() { format!(": {from} is final") } else { String::new() })]
pub struct TransitionError {
    pub from: TaskStatus,
    pub to: TaskStatus,
}

#[cfg(test)]
mod tests {
    use super::TaskStatus::{self, *};

    #[test]
    fn the_legal_transitions_are_exactly_these() {
        let legal = [
            (Pending, Processing),
            (Pending, Cancelled),
            (Pending, Failed),
            (Processing, Completed),
            (Processing, Failed),
            (Processing, Pending),
            (Processing, Cancelled),
        ];
        for from in TaskStatus::ALL {
            for to in TaskStatus::ALL {
                assert_eq!(from.can_become(to), legal.contains(&(from, to)), "{from} → {to}");
            }
        }
    }

    #[test]
    fn terminal_states_are_final_and_say_so() {
        for from in [Completed, Failed, Cancelled] {
            assert!(from.is_terminal());
            for to in TaskStatus::ALL {
                let err = from.check_transition(to).unwrap_err();
                assert!(err.to_string().contains("is final"), "{err}");
            }
        }
        assert!(!Pending.is_terminal() && !Processing.is_terminal());
    }

    #[test]
    fn status_names_round_trip() {
        for s in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(TaskStatus::parse("done"), None);
    }
}
