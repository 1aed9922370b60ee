//! Harness for Kiln's black-box conformance suites.
//!
//! Every test starts a real Kiln server in-process on an ephemeral loopback port (through
//! [`kiln_server::spawn_for_tests`], or [`kiln_server::serve`] when it needs non-default
//! [`Settings`]) and talks to it over HTTP only. Each test runs against:
//!
//! * SQLite, in a fresh temporary data directory, always;
//! * PostgreSQL, in a fresh database `kiln_ct_<random>` created through the maintenance
//!   connection given by `KILN_TEST_DATABASE_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`)
//!   and dropped afterwards. When the variable is unset the PostgreSQL variant prints a notice
//!   and returns.
//!
//! [`backend_tests!`] turns `async fn name(srv: &TestServer)` functions into a module `name` with
//! the tests `name::sqlite` and `name::postgres`.

use std::path::PathBuf;
use std::time::Duration;

pub use kiln_server::Settings;
use reqwest::header::HeaderMap;
pub use reqwest::Method;
use serde_json::Value;
use sqlx::Connection;

/// The environment variable naming the PostgreSQL maintenance connection.
pub const PG_ENV: &str = "KILN_TEST_DATABASE_URL";

/// Which store a test server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// `../shared` beside the workspace (reference data; tests skip when it is absent).
pub fn shared_dir() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared"));
    if p.is_dir() {
        Some(p)
    } else {
        None
    }
}

/// Replaces the database name in a `postgres://…/db?params` URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

/// A throw-away PostgreSQL database, dropped (with `FORCE`) when this value is dropped.
pub struct PgDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    /// Creates `kiln_ct_<random>` through the maintenance connection `admin_url`.
    pub async fn create(admin_url: &str) -> Result<PgDatabase, String> {
        let name = format!("kiln_ct_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .map_err(|e| format!("cannot connect to {admin_url}: {e}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .map_err(|e| format!("cannot create database {name}: {e}"))?;
        let _ = conn.close().await;
        Ok(PgDatabase {
            url: with_database(admin_url, &name),
            admin_url: admin_url.to_string(),
            name,
        })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime: do the async cleanup on a thread of its own.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await
                    {
                        eprintln!("notice: could not drop test database {name}: {e}");
                    }
                    let _ = conn.close().await;
                }
            });
        });
        let _ = handle.join();
    }
}

/// A running Kiln server plus an HTTP client for it.
pub struct TestServer {
    pub backend: Backend,
    /// The FHIR base, e.g. `http://127.0.0.1:41234/fhir` (no trailing slash).
    pub base: String,
    pub state: kiln_server::AppState,
    pub client: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    // dropped after the store is closed (field order = drop order)
    pg: Option<PgDatabase>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with default settings. `None` (with a printed notice) when the backend
    /// is not available (PostgreSQL without `KILN_TEST_DATABASE_URL`).
    pub async fn start(backend: Backend) -> Option<TestServer> {
        Self::start_inner(backend, None).await
    }

    /// Starts a server with the given settings.
    pub async fn start_with(backend: Backend, settings: Settings) -> Option<TestServer> {
        Self::start_inner(backend, Some(settings)).await
    }

    async fn start_inner(backend: Backend, settings: Option<Settings>) -> Option<TestServer> {
        let dir = tempfile::tempdir().expect("temporary data directory");
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => match std::env::var(PG_ENV) {
                Ok(url) if !url.trim().is_empty() => Some(
                    PgDatabase::create(url.trim())
                        .await
                        .unwrap_or_else(|e| panic!("{PG_ENV} is set but unusable: {e}")),
                ),
                _ => {
                    eprintln!("notice: {PG_ENV} is not set: skipping the PostgreSQL variant");
                    return None;
                }
            },
        };
        let config = kiln_store::StoreConfig {
            data_dir: dir.path().to_path_buf(),
            database: pg.as_ref().map(|p| p.url.clone()),
            max_connections: 8,
            ..Default::default()
        };
        let (base, state, shutdown) = match settings {
            None => kiln_server::spawn_for_tests(&config)
                .await
                .expect("start the server"),
            Some(settings) => {
                let store = kiln_server::open_store(&config)
                    .await
                    .expect("open the store");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind a loopback port");
                let addr = listener.local_addr().expect("local address");
                let base = format!("http://{addr}/fhir");
                let state = kiln_server::AppState::new(store, base.clone(), settings);
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let st = state.clone();
                tokio::spawn(async move {
                    let _ = kiln_server::serve(listener, st, async move {
                        let _ = rx.await;
                    })
                    .await;
                });
                (base, state, tx)
            }
        };
        Some(TestServer {
            backend,
            base,
            state,
            client: client(),
            shutdown: Some(shutdown),
            pg,
            _dir: dir,
        })
    }

    /// The store configuration a second node on this server's database would use (same SQLite
    /// file, or same PostgreSQL database).
    pub fn store_config(&self) -> kiln_store::StoreConfig {
        kiln_store::StoreConfig {
            data_dir: self._dir.path().to_path_buf(),
            database: self.pg.as_ref().map(|p| p.url.clone()),
            max_connections: 2,
            ..Default::default()
        }
    }

    /// The PostgreSQL database of this server, if it runs on PostgreSQL.
    pub fn pg_database(&self) -> Option<&str> {
        self.pg.as_ref().map(|p| p.name.as_str())
    }

    /// Stops the server, closes the store and drops the PostgreSQL database.
    pub async fn finish(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        self.state.store.close().await;
    }

    /// `[base]/path` (`path` may start with `/` or `?`; empty = the base itself).
    pub fn url(&self, path: &str) -> String {
        url_join(&self.base, path)
    }

    /// A request builder for anything the helpers below do not cover.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    pub async fn get(&self, path: &str) -> Resp {
        send(self.request(Method::GET, path)).await
    }

    /// GET with extra request headers.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut rb = self.request(Method::GET, path);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        send(rb).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Resp {
        send(json_body(self.request(Method::POST, path), body)).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Resp {
        send(json_body(self.request(Method::PUT, path), body)).await
    }

    /// A write with extra request headers (`If-Match`, `Prefer`, …).
    pub async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut rb = json_body(self.request(method, path), body);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        send(rb).await
    }

    /// PATCH with the given Content-Type (`application/json-patch+json` or
    /// `application/fhir+json` for FHIRPath Patch).
    pub async fn patch(&self, path: &str, content_type: &str, body: &Value) -> Resp {
        send(
            self.request(Method::PATCH, path)
                .header("content-type", content_type)
                .body(body.to_string()),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        send(self.request(Method::DELETE, path)).await
    }

    /// POSTs `resource` to its type and asserts 201; returns the new id and the response.
    pub async fn create(&self, resource: &Value) -> (String, Resp) {
        let ty = resource["resourceType"]
            .as_str()
            .expect("resource has a resourceType");
        let r = self.post_json(ty, resource).await;
        r.assert_status(201);
        let id = r.json()["id"]
            .as_str()
            .map(str::to_string)
            .or_else(|| r.location_id())
            .expect("created resource has an id");
        (id, r)
    }

    /// Follows `next` links from `first` (a searchset or history Bundle) and returns every
    /// page, first included. Fails on a loop or more than `max_pages` pages.
    pub async fn all_pages(&self, first: &Value, max_pages: usize) -> Vec<Value> {
        all_pages(&self.client, first, max_pages).await
    }
}

/// Follows `next` links with `client` (see [`TestServer::all_pages`]).
pub async fn all_pages(client: &reqwest::Client, first: &Value, max_pages: usize) -> Vec<Value> {
    let mut pages = vec![first.clone()];
    let mut seen = std::collections::HashSet::new();
    while let Some(next) = link(pages.last().expect("a page"), "next") {
        assert!(seen.insert(next.clone()), "paging loops at {next}");
        assert!(pages.len() < max_pages, "more than {max_pages} pages");
        let r = send(client.get(&next)).await;
        r.assert_status(200);
        pages.push(r.json());
    }
    pages
}

/// `base` + `/path`.
pub fn url_join(base: &str, path: &str) -> String {
    if path.is_empty() {
        base.to_string()
    } else if path.starts_with('?') {
        format!("{base}{path}")
    } else {
        format!("{base}/{}", path.trim_start_matches('/'))
    }
}

/// An HTTP client for tests: no automatic decompression, generous timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("HTTP client")
}

fn json_body(rb: reqwest::RequestBuilder, body: &Value) -> reqwest::RequestBuilder {
    rb.header("content-type", "application/fhir+json")
        .body(body.to_string())
}

/// Sends a request and reads the whole response.
pub async fn send(rb: reqwest::RequestBuilder) -> Resp {
    let r = rb.send().await.expect("HTTP request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.expect("response body").to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (fails the test, showing the body, if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body ({}) is not JSON: {e}\n{}",
                self.status,
                self.text()
            )
        })
    }

    /// Asserts the status, showing the body on failure.
    #[track_caller]
    pub fn assert_status(&self, expected: u16) -> &Resp {
        assert_eq!(
            self.status,
            expected,
            "expected HTTP {expected}, got {}: {}",
            self.status,
            self.text()
        );
        self
    }

    /// Asserts the body is an OperationOutcome with at least one error/fatal issue; returns
    /// the issues.
    #[track_caller]
    pub fn assert_outcome(&self) -> Vec<Value> {
        let v = self.json();
        assert_eq!(
            v["resourceType"], "OperationOutcome",
            "error body is not an OperationOutcome: {v}"
        );
        let issues = v["issue"].as_array().cloned().unwrap_or_default();
        assert!(
            issues
                .iter()
                .any(|i| matches!(i["severity"].as_str(), Some("error" | "fatal"))),
            "OperationOutcome has no error issue: {v}"
        );
        issues
    }

    /// The id in the `Location` header (`…/Type/id/_history/n` or `…/Type/id`).
    pub fn location_id(&self) -> Option<String> {
        let loc = self.header("location")?;
        let parts: Vec<&str> = loc.split('/').collect();
        match parts.iter().position(|p| *p == "_history") {
            Some(i) if i >= 1 => Some(parts[i - 1].to_string()),
            _ => parts.last().map(|s| s.to_string()),
        }
    }

    /// The version in the `ETag` header (`W/"3"` → 3).
    pub fn etag_version(&self) -> Option<i64> {
        parse_etag(&self.header("etag")?)
    }
}

/// `W/"3"` → 3.
pub fn parse_etag(v: &str) -> Option<i64> {
    v.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .ok()
}

/// The URL of a Bundle link by relation.
pub fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

/// `Bundle.entry` (empty when absent).
pub fn entries(bundle: &Value) -> Vec<Value> {
    bundle["entry"].as_array().cloned().unwrap_or_default()
}

/// Every `Reference.reference` string in a resource (depth-first, document order).
pub fn references(v: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("reference", Value::String(s)) => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

/// A copy without `meta.versionId`, `meta.lastUpdated` (and `meta` if that empties it): what
/// a server adds on write.
pub fn without_server_meta(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(obj) = v.as_object_mut() {
        let empty = match obj.get_mut("meta").and_then(Value::as_object_mut) {
            Some(meta) => {
                meta.remove("versionId");
                meta.remove("lastUpdated");
                meta.is_empty()
            }
            None => false,
        };
        if empty {
            obj.remove("meta");
        }
    }
    v
}

/// Generates, for each `async fn name(srv: &TestServer)` in scope, a module `name` with the
/// tests `sqlite` and `postgres` (the latter skips with a notice without
/// `KILN_TEST_DATABASE_URL`).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let srv = $crate::TestServer::start($crate::Backend::Sqlite)
                        .await
                        .expect("SQLite is always available");
                    super::$name(&srv).await;
                    srv.finish().await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let Some(srv) = $crate::TestServer::start($crate::Backend::Postgres).await
                    else {
                        return;
                    };
                    super::$name(&srv).await;
                    srv.finish().await;
                }
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/test?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "x"), "postgres://h:1/x");
    }

    #[test]
    fn urls_and_etags() {
        assert_eq!(
            url_join("http://h/fhir", "Patient"),
            "http://h/fhir/Patient"
        );
        assert_eq!(
            url_join("http://h/fhir", "/Patient"),
            "http://h/fhir/Patient"
        );
        assert_eq!(url_join("http://h/fhir", ""), "http://h/fhir");
        assert_eq!(url_join("http://h/fhir", "?_x=1"), "http://h/fhir?_x=1");
        assert_eq!(parse_etag("W/\"12\""), Some(12));
        assert_eq!(parse_etag("\"3\""), Some(3));
        assert_eq!(parse_etag("W/\"x\""), None);
    }

    #[test]
    fn server_meta_is_stripped() {
        let v = serde_json::json!({"resourceType": "Patient", "meta": {"versionId": "2", "lastUpdated": "x"}});
        assert_eq!(
            without_server_meta(&v),
            serde_json::json!({"resourceType": "Patient"})
        );
        let v = serde_json::json!({"meta": {"versionId": "2", "tag": [{"code": "a"}]}});
        assert_eq!(
            without_server_meta(&v),
            serde_json::json!({"meta": {"tag": [{"code": "a"}]}})
        );
    }

    #[test]
    fn references_are_collected() {
        let v = serde_json::json!({"subject": {"reference": "Patient/1"}, "x": [{"y": {"reference": "#c"}}]});
        assert_eq!(references(&v), vec!["Patient/1", "#c"]);
    }
}
