//! Error types.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend error: {0}")]
    Backend(String),
    #[error("corrupt stored record: {0}")]
    Corrupt(String),
}

/// Resource-server authorization failure (RFC 6750).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401: no token, malformed, bad signature, expired, revoked, wrong audience.
    /// `error` is `None` when no credentials were sent, else `invalid_token`/`invalid_request`.
    #[error("unauthorized: {description}")]
    Unauthorized {
        error: Option<&'static str>,
        description: String,
    },
    /// 403 `insufficient_scope`.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 500: the store failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AuthError {
    pub fn invalid_token(d: impl Into<String>) -> Self {
        AuthError::Unauthorized {
            error: Some("invalid_token"),
            description: d.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            AuthError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `WWW-Authenticate` header value for 401/403 responses.
    pub fn www_authenticate(&self) -> Option<String> {
        let clean = |s: &str| s.replace(['"', '\\', '\r', '\n'], "'");
        match self {
            AuthError::Unauthorized { error: None, .. } => {
                Some("Bearer realm=\"kiln\"".to_string())
            }
            AuthError::Unauthorized {
                error: Some(e),
                description,
            } => Some(format!(
                "Bearer realm=\"kiln\", error=\"{e}\", error_description=\"{}\"",
                clean(description)
            )),
            AuthError::Forbidden(d) => Some(format!(
                "Bearer realm=\"kiln\", error=\"insufficient_scope\", error_description=\"{}\"",
                clean(d)
            )),
            AuthError::Internal(_) => None,
        }
    }
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        AuthError::Internal(e.to_string())
    }
}

/// A FHIR OperationOutcome response with the right status and `WWW-Authenticate` header.
impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let code = match &self {
            AuthError::Unauthorized { .. } => "login",
            AuthError::Forbidden(_) => "forbidden",
            AuthError::Internal(_) => "exception",
        };
        let body = json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": self.to_string()}]
        });
        let mut resp = (self.status(), axum::Json(body)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        );
        if let Some(v) = self
            .www_authenticate()
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}

/// RFC 6749 §5.2 error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}: {description}")]
pub struct OAuthError {
    pub status: StatusCode,
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, d: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: d.into(),
        }
    }
    pub fn invalid_request(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", d)
    }
    pub fn invalid_client(d: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", d)
    }
    pub fn invalid_grant(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", d)
    }
    pub fn unauthorized_client(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "unauthorized_client", d)
    }
    pub fn unsupported_grant_type(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "unsupported_grant_type", d)
    }
    pub fn invalid_scope(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", d)
    }
    pub fn access_denied(d: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "access_denied", d)
    }
    pub fn slow_down() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "slow_down",
            "too many requests",
        )
    }
    pub fn server_error(d: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", d)
    }
}

impl From<StoreError> for OAuthError {
    fn from(e: StoreError) -> Self {
        OAuthError::server_error(e.to_string())
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "error_description": self.description});
        let mut resp = (self.status, axum::Json(body)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"kiln\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn www_authenticate_values() {
        let missing = AuthError::Unauthorized {
            error: None,
            description: "x".into(),
        };
        assert_eq!(missing.www_authenticate().unwrap(), "Bearer realm=\"kiln\"");
        let bad = AuthError::invalid_token("bad \"quote\"\r\n");
        let v = bad.www_authenticate().unwrap();
        assert!(
            v.contains("error=\"invalid_token\"") && !v.contains('\n') && !v.contains("\"quote\"")
        );
        assert_eq!(
            AuthError::Forbidden("no".into()).status(),
            StatusCode::FORBIDDEN
        );
        assert!(AuthError::Forbidden("no".into())
            .www_authenticate()
            .unwrap()
            .contains("insufficient_scope"));
        let resp = bad.into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().get(header::WWW_AUTHENTICATE).is_some());
        let o = OAuthError::invalid_client("x").into_response();
        assert_eq!(o.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(o.headers().get(header::CACHE_CONTROL).unwrap(), "no-store");
    }
}
