//! Every example resource of the official R4 examples package
//! (`../shared/fhir-r4/hl7.fhir.r4.examples-4.0.1.tgz`) is PUT to the server as JSON, read back as
//! JSON and as XML; both must equal the original (ignoring `meta.versionId`/`meta.lastUpdated`),
//! the XML after conversion with the server's own `kiln_fhir::xml::xml_to_json`.
//!
//! Examples the server rejects as invalid (400/422) are listed and counted apart: some official
//! examples do not validate. The test fails when the pass rate of the accepted ones drops below
//! [`MIN_PASS_RATE`] or when an example is refused for another reason (5xx etc.).

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_conformance_tests::{send, shared_dir, without_server_meta, Backend, TestServer};
use serde_json::Value;

/// Share of accepted examples whose JSON and XML read-backs must match exactly. Observed on
/// SQLite: 5,283 passed, 0 failed, 23 rejected as invalid (of 5,306); kept just below 100% so a
/// single new XML edge case is reported without failing, while any broad regression fails.
const MIN_PASS_RATE: f64 = 0.995;

const CLIENTS: usize = 4;

/// `(file name, resource)` for every JSON resource in the package.
fn examples() -> Option<Vec<(String, Vec<u8>)>> {
    let path = shared_dir()?.join("fhir-r4/hl7.fhir.r4.examples-4.0.1.tgz");
    let file = std::fs::File::open(path).ok()?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = Vec::new();
    for entry in archive.entries().ok()? {
        let mut entry = entry.ok()?;
        let name = entry.path().ok()?.to_string_lossy().into_owned();
        let Some(file_name) = name.strip_prefix("package/") else {
            continue;
        };
        if !file_name.ends_with(".json")
            || file_name.contains('/')
            || file_name == "package.json"
            || file_name.starts_with('.')
        {
            continue;
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).ok()?;
        out.push((file_name.to_string(), bytes));
    }
    Some(out)
}

/// The path of the first difference between two JSON values (`None` when equal).
fn first_diff(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    None => return Some(format!("{path}.{k} missing in read-back")),
                    Some(w) => {
                        if let Some(d) = first_diff(v, w, &format!("{path}.{k}")) {
                            return Some(d);
                        }
                    }
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| format!("{path}.{k} added in read-back"))
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Some(format!("{path}: {} items vs {}", x.len(), y.len()));
            }
            x.iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (v, w))| first_diff(v, w, &format!("{path}[{i}]")))
        }
        _ if a == b => None,
        _ => {
            let s = |v: &Value| {
                let t = v.to_string();
                t.chars().take(80).collect::<String>()
            };
            Some(format!("{path}: {} vs {}", s(a), s(b)))
        }
    }
}

#[derive(Debug)]
enum Outcome {
    Passed,
    /// Rejected by validation (400/422), with the first error.
    Invalid(String),
    Failed(String),
}

async fn roundtrip(client: &reqwest::Client, base: &str, name: &str, bytes: Vec<u8>) -> Outcome {
    let original: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return Outcome::Failed(format!("not JSON: {e}")),
    };
    let (Some(ty), Some(id)) = (original["resourceType"].as_str(), original["id"].as_str()) else {
        return Outcome::Failed("no resourceType/id".into());
    };
    let url = format!("{base}/{ty}/{id}");
    let r = send(
        client
            .put(&url)
            .header("content-type", "application/fhir+json")
            .body(bytes),
    )
    .await;
    match r.status {
        200 | 201 => {}
        400 | 422 => {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let issue = v["issue"]
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|i| matches!(i["severity"].as_str(), Some("error" | "fatal")))
                })
                .cloned()
                .unwrap_or(Value::Null);
            return Outcome::Invalid(format!(
                "{} {}: {}",
                r.status,
                issue["expression"][0].as_str().unwrap_or(""),
                issue["diagnostics"].as_str().unwrap_or("")
            ));
        }
        s => {
            let t = r.text();
            return Outcome::Failed(format!("PUT → HTTP {s}: {}", &t[..t.len().min(300)]));
        }
    }
    let want = without_server_meta(&original);
    let json = send(client.get(&url)).await;
    if json.status != 200 {
        return Outcome::Failed(format!("GET JSON → HTTP {}", json.status));
    }
    let got: Value = match serde_json::from_slice(&json.body) {
        Ok(v) => v,
        Err(e) => return Outcome::Failed(format!("read-back is not JSON: {e}")),
    };
    if let Some(d) = first_diff(&want, &without_server_meta(&got), ty) {
        return Outcome::Failed(format!("JSON read-back differs: {d}"));
    }
    let xml = send(client.get(format!("{url}?_format=xml"))).await;
    if xml.status != 200 {
        return Outcome::Failed(format!("GET XML → HTTP {}", xml.status));
    }
    let text = String::from_utf8_lossy(&xml.body);
    let from_xml = match kiln_fhir::xml::xml_to_json(&text) {
        Ok(v) => v,
        Err(e) => return Outcome::Failed(format!("server XML does not parse: {e}")),
    };
    if let Some(d) = first_diff(&want, &without_server_meta(&from_xml), ty) {
        return Outcome::Failed(format!("XML read-back differs: {d}"));
    }
    let _ = name;
    Outcome::Passed
}

async fn run(backend: Backend) {
    let Some(all) = examples() else {
        eprintln!("notice: ../shared/fhir-r4 examples package is absent: skipping");
        return;
    };
    let Some(srv) = TestServer::start(backend).await else {
        return;
    };
    let started = Instant::now();
    let total = all.len();
    let queue = Arc::new(Mutex::new(all));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let queue = queue.clone();
        let client = srv.client.clone();
        let base = srv.base.clone();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                let Some((name, bytes)) = next else { break };
                let o = roundtrip(&client, &base, &name, bytes).await;
                results.push((name, o));
            }
            results
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.expect("client task"));
    }
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let passed = results
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Passed))
        .count();
    let invalid: Vec<_> = results
        .iter()
        .filter_map(|(n, o)| match o {
            Outcome::Invalid(m) => Some((n, m)),
            _ => None,
        })
        .collect();
    let failed: Vec<_> = results
        .iter()
        .filter_map(|(n, o)| match o {
            Outcome::Failed(m) => Some((n, m)),
            _ => None,
        })
        .collect();
    println!(
        "[{backend:?}] R4 examples round trip: {passed} passed, {} failed, {} rejected as invalid \
         (of {total}) in {:.1}s",
        failed.len(),
        invalid.len(),
        started.elapsed().as_secs_f64()
    );
    for (n, m) in &failed {
        println!("  FAILED {n}: {m}");
    }
    let mut by_reason: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for (n, m) in &invalid {
        by_reason.entry(m.to_string()).or_default().push(n);
    }
    for (m, ns) in &by_reason {
        println!("  INVALID ({}) {m}: {:?}", ns.len(), ns);
    }
    let accepted = passed + failed.len();
    let rate = passed as f64 / accepted.max(1) as f64;
    assert!(accepted > 0, "no example was accepted");
    assert!(
        rate >= MIN_PASS_RATE,
        "pass rate of accepted examples {:.4} < {MIN_PASS_RATE} ({} failures)",
        rate,
        failed.len()
    );
    srv.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_roundtrip_sqlite() {
    run(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_roundtrip_postgres() {
    run(Backend::Postgres).await;
}
