//! One error type for every handler, mapped to an HTTP status and a JSON body.
//!
//! Client mistakes carry a message naming the problem; storage failures are logged by the
//! adapter and shown to the client only as a generic 5xx.

use vm_task_types::{wire::ErrorBody, FieldError, TaskStatus, Timestamp};

use crate::ports::StoreError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AppError {
    /// 400: the request is malformed or a field is invalid.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String, field: Option<String> },
    /// 401: missing or wrong token.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the token is valid but may not do this (a consumer token bound to other servers).
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 405, with the methods the path does allow.
    #[error("method {method} is not allowed on {path}; allowed: {}", allowed.join(", "))]
    MethodNotAllowed { method: String, path: String, allowed: Vec<&'static str> },
    /// 409: the task is not in a state that allows this.
    #[error("{message}")]
    Conflict { message: String, current_status: Option<TaskStatus>, lease_expires_at: Option<Timestamp> },
    /// 413.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but cannot be honoured (idempotency key reused, no server to route to).
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String, field: Option<String> },
    /// 503: a binding failed or the worker is misconfigured.
    #[error("{0}")]
    Unavailable(String),
    /// 503: KV refused a write to a key written less than a second ago. Kept apart from
    /// `Unavailable` so writers can wait the window out ([`crate::store::paced`]).
    #[error("{0}")]
    RateLimited(String),
}

impl AppError {
    /// KV refused a write to a recently written key; for writers outside this crate that pace
    /// their own writes (the durable mode's host queue).
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Self::RateLimited(_))
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest { code, message: message.into(), field: None }
    }

    pub(crate) fn invalid_field(err: FieldError) -> Self {
        Self::BadRequest { code: "invalid_field", message: err.to_string(), field: Some(err.field) }
    }

    pub(crate) fn conflict(message: impl Into<String>, current: TaskStatus) -> Self {
        Self::Conflict { message: message.into(), current_status: Some(current), lease_expires_at: None }
    }

    pub(crate) fn status(&self) -> u16 {
        match self {
            Self::BadRequest { .. } => 400,
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::NotFound(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::Conflict { .. } => 409,
            Self::PayloadTooLarge(_) => 413,
            Self::UnsupportedMediaType(_) => 415,
            Self::Unprocessable { .. } => 422,
            Self::Unavailable(_) | Self::RateLimited(_) => 503,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. } | Self::Unprocessable { code, .. } => code,
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::Conflict { .. } => "conflict",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Unavailable(_) | Self::RateLimited(_) => "unavailable",
        }
    }

    pub(crate) fn body(&self) -> ErrorBody {
        let (field, current_status, lease_expires_at) = match self {
            Self::BadRequest { field, .. } | Self::Unprocessable { field, .. } => (field.clone(), None, None),
            Self::Conflict { current_status, lease_expires_at, .. } => (None, *current_status, *lease_expires_at),
            _ => (None, None, None),
        };
        ErrorBody {
            success: false,
            error: self.to_string(),
            code: self.code().to_owned(),
            field,
            current_status,
            lease_expires_at,
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        if e.rate_limited {
            Self::RateLimited(format!("storage busy: {e}"))
        } else {
            Self::Unavailable(format!("storage unavailable: {e}"))
        }
    }
}

impl From<FieldError> for AppError {
    fn from(e: FieldError) -> Self {
        Self::invalid_field(e)
    }
}
