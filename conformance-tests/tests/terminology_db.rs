//! Loaded code systems shared by the nodes of one PostgreSQL database (issue 5, "stateless nodes
//! on PostgreSQL"): a release loaded with `kiln terminology load … --database postgres://…`
//! (the same `load_release` the CLI runs) is served by every node, a node started later reads
//! it from the database, a new version reaches every running node within the poll window, and
//! a malformed release leaves the previous version answering.
//!
//! Two Kiln servers run in this process on one fresh database, each with its own (empty) data
//! directory. The release is a small ICD-10-CM tabular in the CMS layout (the real FY2026 file
//! takes a debug build several seconds per node to parse, index and rebuild; the real file's
//! loading is covered by `terminology_loaded.rs` and `kiln-terminology`'s tests). Skipped with a
//! notice when `KILN_TEST_DATABASE_URL` is unset.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_conformance_tests::{client, send, url_join, PgDatabase, Resp, PG_ENV};
use kiln_server::terminology::{load_release, LoadTarget, RELOAD_POLL};
use kiln_server::Settings;
use serde_json::Value;

const ICD10CM: &str = "http://hl7.org/fhir/sid/icd-10-cm";

/// A small ICD-10-CM tabular (CMS layout); `extra` adds codes under S00.0.
fn tabular(version: &str, extra: &[(&str, &str)]) -> String {
    let extra: String = extra
        .iter()
        .map(|(c, d)| format!("<diag><name>{c}</name><desc>{d}</desc></diag>"))
        .collect();
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<ICD10CM.tabular><version>{version}</version>
<chapter><name>1</name><desc>Certain infectious and parasitic diseases (A00-B99)</desc>
 <sectionIndex><sectionRef first="A00" last="A09" id="A00-A09">Intestinal infectious diseases</sectionRef></sectionIndex>
 <section id="A00-A09"><desc>Intestinal infectious diseases (A00-A09)</desc>
  <diag><name>A00</name><desc>Cholera</desc>
   <diag><name>A00.0</name><desc>Cholera due to Vibrio cholerae 01, biovar cholerae</desc></diag>
   <diag><name>A00.1</name><desc>Cholera due to Vibrio cholerae 01, biovar eltor</desc></diag>{extra}
  </diag>
 </section>
</chapter>
</ICD10CM.tabular>"#
    )
}

/// One Kiln node on the shared database, with its own data directory.
struct Node {
    base: String,
    state: kiln_server::AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(database_url: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = kiln_store::StoreConfig {
            data_dir: dir.path().to_path_buf(),
            database: Some(database_url.to_string()),
            max_connections: 4,
            ..Default::default()
        };
        let store = kiln_server::open_store(&config)
            .await
            .expect("open the store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/fhir", listener.local_addr().unwrap());
        let settings = Settings {
            terminology_dir: Some(dir.path().join("terminology")),
            ..Settings::default()
        };
        let state = kiln_server::AppState::new(store, base.clone(), settings);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        tokio::spawn(async move {
            let _ = kiln_server::serve(listener, st, async move {
                let _ = rx.await;
            })
            .await;
        });
        Node {
            base,
            state,
            shutdown: Some(tx),
            _dir: dir,
        }
    }

    async fn get(&self, path: &str) -> Resp {
        send(client().get(url_join(&self.base, path))).await
    }

    /// `CodeSystem/$lookup` of an ICD-10-CM code: (HTTP status, version, display).
    async fn lookup(&self, code: &str) -> (u16, Option<String>, Option<String>) {
        let r = self
            .get(&format!("CodeSystem/$lookup?system={ICD10CM}&code={code}"))
            .await;
        if r.status != 200 {
            return (r.status, None, None);
        }
        let p = r.json();
        (200, param_str(&p, "version"), param_str(&p, "display"))
    }

    /// `CodeSystem/$validate-code` of an ICD-10-CM code: the `result`.
    async fn validate(&self, code: &str) -> bool {
        let r = self
            .get(&format!(
                "CodeSystem/$validate-code?url={ICD10CM}&code={code}"
            ))
            .await;
        r.assert_status(200);
        r.json()["parameter"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "result"))
            .map(|p| p["valueBoolean"] == true)
            .unwrap_or_else(|| panic!("no result: {}", r.text()))
    }

    async fn finish(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        self.state.store.close().await;
    }
}

fn param_str(p: &Value, name: &str) -> Option<String> {
    p["parameter"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
        .and_then(|x| x["valueString"].as_str().or(x["valueCode"].as_str()))
        .map(str::to_string)
}

/// Loads `xml` as the ICD-10-CM release into the database, the way the CLI does.
async fn load(
    store: &kiln_store::Store,
    dir: &Path,
    name: &str,
    xml: &str,
) -> Result<String, String> {
    let path = dir.join(name);
    std::fs::write(&path, xml).unwrap();
    load_release(
        LoadTarget::Database(store),
        "icd10cm",
        &path,
        None,
        |line: &str| eprintln!("  {line}"),
    )
    .await
    .map_err(|e| format!("{e:#}"))
}

/// Polls `node` (every 100 ms) until `$lookup` of `code` answers with `version`; returns how long
/// it took. Fails after `limit`.
async fn wait_for(node: &Node, code: &str, version: &str, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let (status, v, _) = node.lookup(code).await;
        if status == 200 && v.as_deref() == Some(version) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{}: {code} not served at version {version} after {:?} (last: HTTP {status}, {v:?})",
            node.base,
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn postgres_nodes_share_loaded_code_systems() {
    let admin = match std::env::var(PG_ENV) {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ => {
            eprintln!("notice: {PG_ENV} is not set: skipping the PostgreSQL terminology test");
            return;
        }
    };
    let started = Instant::now();
    let db = PgDatabase::create(&admin).await.expect("test database");
    let files = tempfile::tempdir().unwrap();
    // the loader's own connection, like `kiln terminology load --database …`
    let loader = kiln_server::open_store(&kiln_store::StoreConfig {
        data_dir: files.path().to_path_buf(),
        database: Some(db.url.clone()),
        max_connections: 2,
        ..Default::default()
    })
    .await
    .unwrap();

    // node A runs before anything is loaded: ICD-10-CM is unknown to it
    let a = Node::start(&db.url).await;
    assert_ne!(a.lookup("A00.0").await.0, 200);

    let line = load(&loader, files.path(), "v1.xml", &tabular("2026-v1", &[]))
        .await
        .unwrap();
    assert!(
        line.contains("saved in the database as icd10cm generation 1"),
        "{line}"
    );

    // node B starts after the load and reads it from the database; A notices the new
    // generation within the poll window (plus the rebuild)
    let b = Node::start(&db.url).await;
    let window = RELOAD_POLL + Duration::from_secs(10);
    let took_a = wait_for(&a, "A00.0", "2026-v1", window).await;
    wait_for(&b, "A00.0", "2026-v1", window).await;
    for node in [&a, &b] {
        let (_, _, display) = node.lookup("A00.1").await;
        assert_eq!(
            display.as_deref(),
            Some("Cholera due to Vibrio cholerae 01, biovar eltor")
        );
        assert!(node.validate("A00.0").await);
        assert!(!node.validate("A00.9").await, "not in version 1");
    }
    eprintln!("v1 served by the running node after {took_a:?}");

    // a new version with an added code reaches both running nodes
    let line = load(
        &loader,
        files.path(),
        "v2.xml",
        &tabular("2026-v2", &[("A00.9", "Cholera, unspecified")]),
    )
    .await
    .unwrap();
    assert!(line.contains("generation 2"), "{line}");
    let t0 = Instant::now();
    let (ta, tb) = tokio::join!(
        wait_for(&a, "A00.9", "2026-v2", window),
        wait_for(&b, "A00.9", "2026-v2", window)
    );
    eprintln!(
        "v2 served by both nodes after {:?} (A {ta:?}, B {tb:?}; poll window {RELOAD_POLL:?})",
        t0.elapsed()
    );
    for node in [&a, &b] {
        assert!(node.validate("A00.9").await);
        assert_eq!(
            node.lookup("A00.9").await.2.as_deref(),
            Some("Cholera, unspecified")
        );
    }

    // a malformed release: the load fails naming the place, nothing changes in the database,
    // and both nodes go on answering version 2 over a whole poll window
    let err = load(
        &loader,
        files.path(),
        "broken.xml",
        &tabular("2026-v3", &[("A00.8", "x")]).replace("</section>", ""),
    )
    .await
    .unwrap_err();
    assert!(err.contains("broken.xml:"), "{err}");
    let heads = loader.terminology_heads().await.unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!(
        (heads[0].generation, heads[0].version.as_deref()),
        (2, Some("2026-v2"))
    );
    let t0 = Instant::now();
    while t0.elapsed() < RELOAD_POLL + Duration::from_millis(500) {
        for node in [&a, &b] {
            let (status, v, _) = node.lookup("A00.9").await;
            assert_eq!((status, v.as_deref()), (200, Some("2026-v2")));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    a.finish().await;
    b.finish().await;
    loader.close().await;
    eprintln!("test took {:?}", started.elapsed());
}
