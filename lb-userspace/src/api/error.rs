//! A refused request: its kind picks the HTTP status, its message is the one-line reason.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::config::{EditError, RestartNeeded};

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
    /// 413: the body is over the API's limit.
    TooLarge,
    /// 503: the daemon is shutting down (or already runs as many conntrack listings as it
    /// allows).
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
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
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

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }
}

impl From<EditError> for ApiError {
    fn from(e: EditError) -> Self {
        let kind = match &e {
            EditError::NotFound(_) => ErrorKind::NotFound,
            EditError::Conflict(_) => ErrorKind::Conflict,
            EditError::Invalid(_) => ErrorKind::BadRequest,
        };
        Self::new(kind, e.to_string())
    }
}

impl From<RestartNeeded> for ApiError {
    fn from(e: RestartNeeded) -> Self {
        Self::new(ErrorKind::RestartNeeded, e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EditError, RestartNeeded};
    use crate::director::LookupError;

    #[test]
    fn the_status_follows_the_kind_not_the_message() {
        let status = |e: ApiError| e.status().as_u16();
        // A message that mentions a duplicate does not make an invalid edit a conflict.
        let invalid = EditError::Invalid("path: \"duplicate\" must start with '/'".into());
        assert_eq!(status(invalid.into()), 400);
        assert_eq!(status(EditError::Conflict("x".into()).into()), 409);
        assert_eq!(status(EditError::NotFound("x".into()).into()), 404);
        let restart = RestartNeeded {
            field: "conntrack_size".into(),
            running: "1024".into(),
            new: "2048".into(),
        };
        let e = ApiError::from(restart);
        assert_eq!(
            e.message,
            "conntrack_size: changing it needs a restart (running 1024, new 2048)"
        );
        assert_eq!(status(e), 409);
        assert_eq!(status(LookupError::NoService("web".into()).into()), 404);
        assert_eq!(status(ApiError::new(ErrorKind::Unavailable, "x")), 503);
        assert_eq!(status(ApiError::new(ErrorKind::MethodNotAllowed, "x")), 405);
        assert_eq!(status(ApiError::internal("x")), 500);
    }

    #[test]
    fn edits_refused_by_kind() {
        let running = Config::from_toml_str(
            "interface = \"eth0\"\n[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\n\
             backend = [{ address = \"10.0.0.11\" }]\n",
        )
        .unwrap();
        let again = running.services[0].clone();
        let status = |r: Result<Config, EditError>| ApiError::from(r.unwrap_err()).status();
        assert_eq!(status(running.with_service(again)).as_u16(), 409);
        let b = running.services[0].backends[0].clone();
        assert_eq!(status(running.with_backend("web", b.clone())).as_u16(), 409);
        assert_eq!(status(running.with_backend("api", b)).as_u16(), 404);
        let own_vip = crate::config::BackendCfg::new("10.0.0.1".parse().unwrap(), 1);
        assert_eq!(status(running.with_backend("web", own_vip)).as_u16(), 400);
    }
}
