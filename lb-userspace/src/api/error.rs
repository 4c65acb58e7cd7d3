//! A refused request: its kind picks the HTTP status, its message is the one-line reason.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Why a request was refused. The HTTP status follows from the kind alone, never from the
/// message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request breaks a rule (a field's value, a limit, a config rule).
    BadRequest,
    /// 404: no such service, backend or endpoint.
    NotFound,
    /// 409: the request collides with what is running (a duplicate name, vip/port/protocol
    /// or backend).
    Conflict,
    /// 409: a reload changes a field that only a restart applies; the request is well-formed
    /// but conflicts with the running daemon.
    RestartNeeded,
    /// 405.
    MethodNotAllowed,
    /// 503: the daemon is shutting down.
    Unavailable,
    /// 500: the kernel refused a map update, or the daemon lost the request.
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict | ErrorKind::RestartNeeded => StatusCode::CONFLICT,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A refused request; the body is `{"error": message}`. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// A config-rule violation: 409 for duplicates, else 400.
    pub fn invalid(message: impl Into<String>) -> Self {
        let message = message.into();
        let kind = if message.contains("duplicate") {
            ErrorKind::Conflict
        } else {
            ErrorKind::BadRequest
        };
        Self { kind, message }
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }
}

impl From<crate::director::LookupError> for ApiError {
    fn from(e: crate::director::LookupError) -> Self {
        Self::not_found(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.message }));
        (self.status(), body).into_response()
    }
}
