//! Content negotiation (`Accept`, `Content-Type`, `_format`, `_pretty`), request body parsing and
//! response rendering for FHIR JSON and XML.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_fhir::{operation_outcome, Issue};
use serde_json::Value;

use crate::error::FhirError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

/// How the response is to be rendered.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    pub format: Format,
    pub pretty: bool,
    /// The client asked for plain `application/json` / `application/xml`: answer with that type.
    pub plain_mime: bool,
}

impl Default for Negotiated {
    fn default() -> Self {
        Negotiated {
            format: Format::Json,
            pretty: false,
            plain_mime: false,
        }
    }
}

fn mime_format(m: &str) -> Option<(Format, bool)> {
    let m = m
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match m.as_str() {
        "json" | "application/fhir+json" | "application/json+fhir" => Some((Format::Json, false)),
        "application/json" => Some((Format::Json, true)),
        "xml" | "application/fhir+xml" | "application/xml+fhir" => Some((Format::Xml, false)),
        "application/xml" | "text/xml" => Some((Format::Xml, true)),
        "*/*" | "application/*" | "" => Some((Format::Json, false)),
        "text/html" => None,
        _ => None,
    }
}

/// Chooses the response format: `_format` wins over `Accept`; JSON is the default.
pub fn negotiate(headers: &HeaderMap, query: &[(String, String)]) -> Result<Negotiated, FhirError> {
    let mut n = Negotiated::default();
    if let Some((_, v)) = query.iter().find(|(k, _)| k == "_pretty") {
        n.pretty = v == "true";
    }
    if let Some((_, v)) = query.iter().find(|(k, _)| k == "_format") {
        match mime_format(v) {
            Some((f, plain)) => {
                n.format = f;
                n.plain_mime = plain;
            }
            None => {
                return Err(FhirError::new(
                    StatusCode::NOT_ACCEPTABLE,
                    Issue::error("not-supported", format!("unsupported _format `{v}`"))
                        .at("_format"),
                ))
            }
        }
        return Ok(n);
    }
    if let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        // first supported entry in the client's list (q-values in practice come in order)
        for part in accept.split(',') {
            if let Some((f, plain)) = mime_format(part) {
                n.format = f;
                n.plain_mime = plain;
                break;
            }
        }
    }
    Ok(n)
}

/// The kind of a request body, from `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Xml,
    JsonPatch,
    Form,
}

pub fn body_kind(headers: &HeaderMap) -> Result<BodyKind, FhirError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyKind::Json);
    };
    let ct = ct
        .to_str()
        .map_err(|_| FhirError::unsupported_media_type("unreadable Content-Type"))?;
    let m = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match m.as_str() {
        "application/fhir+json" | "application/json" | "application/json+fhir" | "" => {
            Ok(BodyKind::Json)
        }
        "application/fhir+xml" | "application/xml" | "text/xml" | "application/xml+fhir" => {
            Ok(BodyKind::Xml)
        }
        "application/json-patch+json" => Ok(BodyKind::JsonPatch),
        "application/x-www-form-urlencoded" => Ok(BodyKind::Form),
        other => Err(FhirError::unsupported_media_type(format!(
            "unsupported Content-Type `{other}`: use application/fhir+json or application/fhir+xml"
        ))),
    }
}

/// Parses a FHIR resource body (JSON or XML). Malformed input is a 400 that says where.
pub fn parse_body(kind: BodyKind, body: &[u8]) -> Result<Value, FhirError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(FhirError::bad_request("request body is empty"));
    }
    match kind {
        BodyKind::Json | BodyKind::JsonPatch => parse_json(body),
        BodyKind::Xml => {
            let text = std::str::from_utf8(body)
                .map_err(|e| FhirError::bad_request(format!("body is not UTF-8: {e}")))?;
            kiln_fhir::xml::xml_to_json(text).map_err(|e| {
                FhirError::new(
                    StatusCode::BAD_REQUEST,
                    Issue::error("structure", format!("invalid FHIR XML: {e}")),
                )
            })
        }
        BodyKind::Form => Err(FhirError::unsupported_media_type(
            "a form body is only accepted by _search",
        )),
    }
}

pub fn parse_json(body: &[u8]) -> Result<Value, FhirError> {
    serde_json::from_slice(body).map_err(|e| {
        FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error(
                "structure",
                format!(
                    "invalid JSON at line {}, column {}: {e}",
                    e.line(),
                    e.column()
                ),
            ),
        )
    })
}

/// A response body: either a resource as a `Value`, or stored JSON text passed through as is.
#[derive(Debug, Clone)]
pub enum Body {
    Resource(Value),
    StoredJson(String),
    /// JSON text in parts, concatenated on the wire without being joined first (a large
    /// searchset Bundle written around stored resources).
    StoredJsonParts(Vec<String>),
}

impl Body {
    pub fn into_value(self) -> Result<Value, FhirError> {
        match self {
            Body::Resource(v) => Ok(v),
            Body::StoredJson(s) => serde_json::from_str(&s)
                .map_err(|e| FhirError::internal(format!("stored resource is not JSON: {e}"))),
            Body::StoredJsonParts(parts) => Body::StoredJson(parts.concat()).into_value(),
        }
    }
}

/// A response body of several parts sent in turn, with their total length as its exact size
/// (so the response carries a `Content-Length`, as a single-part body does).
struct PartsBody {
    parts: std::collections::VecDeque<axum::body::Bytes>,
    remaining: u64,
}

impl PartsBody {
    fn new(parts: Vec<String>) -> PartsBody {
        let remaining = parts.iter().map(|p| p.len() as u64).sum();
        PartsBody {
            parts: parts
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(axum::body::Bytes::from)
                .collect(),
            remaining,
        }
    }
}

impl http_body::Body for PartsBody {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let next = self.parts.pop_front();
        if let Some(b) = &next {
            self.remaining -= b.len() as u64;
        }
        std::task::Poll::Ready(next.map(|b| Ok(http_body::Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// What an interaction answers, before rendering.
#[derive(Debug, Clone)]
pub struct FhirResponse {
    pub status: StatusCode,
    pub body: Option<Body>,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl FhirResponse {
    pub fn new(status: StatusCode) -> Self {
        FhirResponse {
            status,
            body: None,
            headers: Vec::new(),
        }
    }
    pub fn ok(body: Body) -> Self {
        FhirResponse {
            status: StatusCode::OK,
            body: Some(body),
            headers: Vec::new(),
        }
    }
    pub fn with_header(mut self, name: header::HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    pub fn header(&self, name: &header::HeaderName) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn content_type(n: &Negotiated) -> &'static str {
    match (n.format, n.plain_mime) {
        (Format::Json, false) => "application/fhir+json;charset=utf-8",
        (Format::Json, true) => "application/json;charset=utf-8",
        (Format::Xml, false) => "application/fhir+xml;charset=utf-8",
        (Format::Xml, true) => "application/xml;charset=utf-8",
    }
}

/// Renders a resource in the negotiated format.
pub fn render_body(body: Body, n: &Negotiated) -> Result<String, FhirError> {
    match (n.format, body) {
        (Format::Json, Body::StoredJson(s)) if !n.pretty => Ok(s),
        (Format::Json, Body::StoredJsonParts(parts)) if !n.pretty => Ok(parts.concat()),
        (Format::Json, b) => {
            let v = b.into_value()?;
            let s = if n.pretty {
                serde_json::to_string_pretty(&v)
            } else {
                serde_json::to_string(&v)
            };
            s.map_err(|e| FhirError::internal(e.to_string()))
        }
        (Format::Xml, b) => {
            let v = b.into_value()?;
            kiln_fhir::xml::json_to_xml(&v, n.pretty)
                .map_err(|e| FhirError::internal(format!("cannot render XML: {e}")))
        }
    }
}

pub fn render(resp: FhirResponse, n: &Negotiated) -> Response {
    let mut builder = Response::builder().status(resp.status);
    for (name, value) in &resp.headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            builder = builder.header(name, v);
        }
    }
    match resp.body {
        None => builder
            .body(axum::body::Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Some(Body::StoredJsonParts(parts)) if n.format == Format::Json && !n.pretty => builder
            .header(header::CONTENT_TYPE, content_type(n))
            .body(axum::body::Body::new(PartsBody::new(parts)))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Some(body) => match render_body(body, n) {
            Ok(text) => builder
                .header(header::CONTENT_TYPE, content_type(n))
                .body(axum::body::Body::from(text))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
            Err(e) => render_error(e, n),
        },
    }
}

pub fn render_error(e: FhirError, n: &Negotiated) -> Response {
    let oo = operation_outcome(&e.issues);
    let mut resp = FhirResponse {
        status: e.status,
        body: Some(Body::Resource(oo)),
        headers: Vec::new(),
    };
    for (k, v) in e.headers {
        if let Ok(name) = header::HeaderName::from_bytes(k.as_bytes()) {
            resp.headers.push((name, v));
        }
    }
    render(resp, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn format_param_beats_accept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+json"),
        );
        let n = negotiate(&h, &q(&[("_format", "xml"), ("_pretty", "true")])).unwrap();
        assert_eq!(n.format, Format::Xml);
        assert!(n.pretty);
    }

    #[test]
    fn accept_xml_and_default_json() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+xml"),
        );
        assert_eq!(negotiate(&h, &[]).unwrap().format, Format::Xml);
        assert_eq!(
            negotiate(&HeaderMap::new(), &[]).unwrap().format,
            Format::Json
        );
    }

    #[test]
    fn bad_json_reports_line_and_column() {
        let e = parse_json(b"{\n  \"resourceType\": }").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.issues[0].diagnostics.contains("line 2"), "{:?}", e.issues);
    }

    /// A body of parts: its exact size (hyper writes it as `Content-Length`) and the parts
    /// in order, empty ones skipped.
    #[tokio::test]
    async fn parts_body_has_an_exact_size() {
        use http_body::Body as _;
        let parts = vec![
            "{\"a\":[".to_string(),
            String::new(),
            "1,2".into(),
            "]}".into(),
        ];
        let body = PartsBody::new(parts);
        assert_eq!(body.size_hint().exact(), Some(11));
        let mut body = std::pin::pin!(body);
        let mut got = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            got.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        assert_eq!(got, b"{\"a\":[1,2]}");
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        // XML or pretty: rendered from the joined text
        let n = negotiate(&HeaderMap::new(), &q(&[("_pretty", "true")])).unwrap();
        let text = render_body(
            Body::StoredJsonParts(vec!["{\"resourceType\":".into(), "\"Basic\"}".into()]),
            &n,
        )
        .unwrap();
        assert!(text.contains("\"resourceType\": \"Basic\""), "{text}");
    }

    #[test]
    fn unknown_content_type_is_415() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(
            body_kind(&h).unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }
}
