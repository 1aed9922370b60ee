//! The one error type of the HTTP layer. Every error renders as an OperationOutcome with the
//! status the FHIR spec asks for.

use axum::http::StatusCode;
use kiln_fhir::Issue;
use kiln_store::StoreError;

#[derive(Debug)]
pub struct FhirError {
    pub status: StatusCode,
    pub issues: Vec<Issue>,
    /// Extra headers (e.g. `WWW-Authenticate` on 401).
    pub headers: Vec<(String, String)>,
}

impl FhirError {
    pub fn new(status: StatusCode, issue: Issue) -> Self {
        FhirError {
            status,
            issues: vec![issue],
            headers: Vec::new(),
        }
    }
    pub fn with_issues(status: StatusCode, issues: Vec<Issue>) -> Self {
        FhirError {
            status,
            issues,
            headers: Vec::new(),
        }
    }
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Issue::error("invalid", msg))
    }
    pub fn invalid_at(msg: impl Into<String>, expression: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            Issue::error("invalid", msg).at(expression),
        )
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, Issue::error("not-found", msg))
    }
    pub fn gone(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, Issue::error("deleted", msg))
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, Issue::error("conflict", msg))
    }
    pub fn precondition_failed(msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            Issue::error("conflict", msg),
        )
    }
    pub fn method_not_allowed(msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Issue::error("not-supported", msg),
        )
    }
    pub fn unsupported_media_type(msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Issue::error("not-supported", msg),
        )
    }
    pub fn not_supported(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Issue::error("not-supported", msg))
    }
    pub fn unprocessable(issues: Vec<Issue>) -> Self {
        Self::with_issues(StatusCode::UNPROCESSABLE_ENTITY, issues)
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Issue::error("exception", msg),
        )
    }
}

impl From<StoreError> for FhirError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => FhirError::conflict(m),
            other => {
                tracing::error!(error = %other, "store error");
                FhirError::internal(format!("storage failure: {other}"))
            }
        }
    }
}

pub type FhirResult<T> = Result<T, FhirError>;
