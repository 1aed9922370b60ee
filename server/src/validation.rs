//! Validation on every write: the structural validator of `kiln-fhir` plus the checks that depend
//! on the interaction (id rules).

use kiln_fhir::Issue;
use serde_json::Value;

use crate::error::{FhirError, FhirResult};

/// Validates a resource about to be stored. Errors → 400 with an OperationOutcome whose
/// `issue.expression` points at the element.
pub fn validate_for_write(resource: &Value) -> FhirResult<()> {
    let issues = validate(resource);
    if issues.iter().any(Issue::is_error) {
        return Err(FhirError::with_issues(
            axum::http::StatusCode::BAD_REQUEST,
            issues,
        ));
    }
    Ok(())
}

/// All issues (errors and warnings) for a resource.
pub fn validate(resource: &Value) -> Vec<Issue> {
    kiln_fhir::validation::validate(resource)
}
