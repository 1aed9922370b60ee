//! One module per FHIR interaction (http.html). Each takes the shared state, the parsed request
//! and, for writes, the open store transaction, so a single HTTP request and an entry of a
//! transaction Bundle run the same code.

pub mod bundle;
pub mod capabilities;
pub mod create;
pub mod delete;
pub mod history;
pub mod patch;
pub mod read;
pub mod update;

use axum::http::{header, StatusCode};
use kiln_fhir::Issue;
use kiln_store::{format_instant, StoredResource};
use serde_json::Value;

use crate::error::{FhirError, FhirResult};
use crate::format::{Body, FhirResponse};
use crate::state::AppState;

/// `Prefer: return=…`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreferReturn {
    Minimal,
    #[default]
    Representation,
    OperationOutcome,
}

/// The parts of an HTTP request the interactions care about (also built from Bundle entries).
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub query: Vec<(String, String)>,
    pub if_match: Option<String>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    pub if_none_exist: Option<String>,
    pub prefer_return: PreferReturn,
    /// `Prefer: handling=strict`
    pub strict: bool,
}

impl RequestContext {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `Prefer` header values.
pub fn parse_prefer(value: &str, ctx: &mut RequestContext) {
    for part in value.split([',', ';']) {
        let part = part.trim();
        match part {
            "return=minimal" => ctx.prefer_return = PreferReturn::Minimal,
            "return=representation" => ctx.prefer_return = PreferReturn::Representation,
            "return=OperationOutcome" => ctx.prefer_return = PreferReturn::OperationOutcome,
            "handling=strict" => ctx.strict = true,
            "handling=lenient" => ctx.strict = false,
            _ => {}
        }
    }
}

/// Is `ty` a concrete R4 resource type? Unknown types are 404 (http.html).
pub fn check_type(ty: &str) -> FhirResult<()> {
    if kiln_fhir::model::r4().is_resource_type(ty) {
        Ok(())
    } else {
        Err(FhirError::not_found(format!(
            "unknown resource type `{ty}`"
        )))
    }
}

/// FHIR ids: `[A-Za-z0-9\-\.]{1,64}`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

pub fn check_id(id: &str) -> FhirResult<()> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(FhirError::bad_request(format!(
            "`{id}` is not a valid resource id ([A-Za-z0-9-.]{{1,64}})"
        )))
    }
}

pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// Parses an `If-Match` / `If-None-Match` value (`W/"3"`, `"3"`, `3`) to a version.
pub fn parse_etag(value: &str) -> FhirResult<i64> {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    let v = v.trim_matches('"');
    v.parse::<i64>().map_err(|_| {
        FhirError::bad_request(format!(
            "`{value}` is not a version ETag (expected W/\"<versionId>\")"
        ))
    })
}

/// HTTP-date for `Last-Modified`.
pub fn http_date(micros: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(micros)
        .unwrap_or_default()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

/// The standard response to a successful write or read of one resource: ETag, Last-Modified,
/// Location (for writes), and a body chosen by `Prefer: return`.
pub fn resource_response(
    state: &AppState,
    stored: &StoredResource,
    status: StatusCode,
    prefer: PreferReturn,
    location: bool,
) -> FhirResponse {
    let mut resp = FhirResponse::new(status)
        .with_header(header::ETAG, etag(stored.version))
        .with_header(header::LAST_MODIFIED, http_date(stored.last_updated));
    if location {
        let loc = format!(
            "{}/{}/{}/_history/{}",
            state.base_url, stored.resource_type, stored.id, stored.version
        );
        resp = resp.with_header(header::LOCATION, loc.clone());
        resp = resp.with_header(header::CONTENT_LOCATION, loc);
    }
    resp.body = match prefer {
        PreferReturn::Minimal => None,
        PreferReturn::Representation => Some(Body::StoredJson(stored.content.clone())),
        PreferReturn::OperationOutcome => Some(Body::Resource(kiln_fhir::operation_outcome(&[
            Issue::information(
                "informational",
                format!(
                    "{}/{} version {} stored at {}",
                    stored.resource_type,
                    stored.id,
                    stored.version,
                    format_instant(stored.last_updated)
                ),
            ),
        ]))),
    };
    resp
}

/// The body of a create/update must be a resource of the type in the URL.
pub fn check_body_type(resource: &Value, ty: &str) -> FhirResult<()> {
    match resource.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == ty => Ok(()),
        Some(t) => Err(FhirError::invalid_at(
            format!("resourceType `{t}` does not match the URL's type `{ty}`"),
            "resourceType",
        )),
        None => Err(FhirError::invalid_at(
            "the body is not a FHIR resource: `resourceType` is missing",
            "resourceType",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_parse() {
        assert_eq!(parse_etag("W/\"3\"").unwrap(), 3);
        assert_eq!(parse_etag("\"12\"").unwrap(), 12);
        assert!(parse_etag("W/\"x\"").is_err());
    }

    #[test]
    fn ids() {
        assert!(valid_id("abc-1.2"));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(65)));
    }

    #[test]
    fn prefer() {
        let mut c = RequestContext::default();
        parse_prefer("return=minimal, handling=strict", &mut c);
        assert_eq!(c.prefer_return, PreferReturn::Minimal);
        assert!(c.strict);
    }

    #[test]
    fn http_dates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    }
}
