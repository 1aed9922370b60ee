//! Imports every Synthea transaction Bundle of `../shared/synthea-r4/` through `POST [base]` with
//! 4 parallel clients (0 errors expected), then checks that every reference in every stored
//! resource resolves: `Type/id` targets are read over HTTP, `#id` targets are contained resources.
//! Skips with a notice when the shared folder is absent.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_conformance_tests::{entries, send, shared_dir, Backend, TestServer};
use serde_json::Value;

const CLIENTS: usize = 4;

fn bundle_files() -> Option<Vec<PathBuf>> {
    let dir = shared_dir()?.join("synthea-r4");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Some(files)
}

async fn import_and_check(backend: Backend) {
    let Some(files) = bundle_files() else {
        eprintln!("notice: ../shared/synthea-r4 is absent: skipping the Synthea import");
        return;
    };
    let Some(srv) = TestServer::start(backend).await else {
        return;
    };
    let started = Instant::now();
    let queue = Arc::new(Mutex::new(files.clone()));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let queue = queue.clone();
        let client = srv.client.clone();
        let base = srv.base.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors: Vec<String> = Vec::new();
            let mut created = 0usize;
            let mut bundles = 0usize;
            let mut skipped = Vec::new();
            loop {
                let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                let Some(path) = next else { break };
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let bytes = match std::fs::read(&path) {
                    Ok(b) => b,
                    Err(e) => {
                        errors.push(format!("{name}: {e}"));
                        continue;
                    }
                };
                // only transaction Bundles are posted (groupInformation is a bare Group whose
                // references point into other files)
                let head: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                if head["resourceType"] != "Bundle" || head["type"] != "transaction" {
                    skipped.push(name);
                    continue;
                }
                let n = entries(&head).len();
                let r = send(
                    client
                        .post(&base)
                        .header("content-type", "application/fhir+json")
                        .body(bytes),
                )
                .await;
                if r.status != 200 {
                    let t = r.text();
                    errors.push(format!(
                        "{name}: HTTP {}: {}",
                        r.status,
                        &t[..t.len().min(400)]
                    ));
                    continue;
                }
                let resp = r.json();
                let ok = entries(&resp)
                    .iter()
                    .filter(|e| {
                        e["response"]["status"]
                            .as_str()
                            .is_some_and(|s| s.starts_with("201"))
                    })
                    .count();
                if ok != n {
                    errors.push(format!("{name}: {ok} of {n} entries created"));
                }
                created += ok;
                bundles += 1;
            }
            (errors, created, bundles, skipped)
        }));
    }
    let (mut errors, mut created, mut bundles, mut skipped) = (Vec::new(), 0, 0, Vec::new());
    for t in tasks {
        let (e, c, b, s) = t.await.expect("import client");
        errors.extend(e);
        created += c;
        bundles += b;
        skipped.extend(s);
    }
    let import_secs = started.elapsed().as_secs_f64();
    println!(
        "[{backend:?}] imported {bundles} bundles, {created} resources in {import_secs:.1}s \
         ({:.0} resources/s); skipped (not transactions): {skipped:?}",
        created as f64 / import_secs.max(0.001)
    );
    assert!(
        errors.is_empty(),
        "{} import errors:\n{}",
        errors.len(),
        errors.join("\n")
    );
    assert!(bundles > 0, "no transaction Bundle found");

    // every stored resource, through the system history (all versions are creates)
    let first = srv.get("_history?_count=1000").await;
    first.assert_status(200);
    let pages = srv.all_pages(&first.json(), 1000).await;
    let mut resources = Vec::new();
    for p in &pages {
        for e in entries(p) {
            if let Some(r) = e.get("resource") {
                resources.push(r.clone());
            }
        }
    }
    assert_eq!(
        resources.len(),
        created,
        "history lists every created resource"
    );
    let stored: HashSet<String> = resources
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(stored.len(), resources.len(), "ids are unique");

    let mut targets: HashSet<String> = HashSet::new();
    let mut unresolved: BTreeMap<String, usize> = BTreeMap::new();
    let mut checked = 0usize;
    for r in &resources {
        let contained: HashSet<String> = r["contained"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["id"].as_str().map(|s| format!("#{s}")))
                    .collect()
            })
            .unwrap_or_default();
        for reference in kiln_conformance_tests::references(r) {
            checked += 1;
            if reference.starts_with('#') {
                if !contained.contains(&reference) {
                    *unresolved
                        .entry(format!("contained {reference}"))
                        .or_default() += 1;
                }
                continue;
            }
            let parts: Vec<&str> = reference.split('/').collect();
            if parts.len() == 2 && !reference.contains(':') && !reference.contains('?') {
                targets.insert(reference);
            } else {
                *unresolved
                    .entry(format!("not a local reference: {reference}"))
                    .or_default() += 1;
            }
        }
    }
    // read each distinct target over HTTP, 4 clients
    let targets: Vec<String> = targets.into_iter().collect();
    let n_targets = targets.len();
    let queue = Arc::new(Mutex::new(targets));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let queue = queue.clone();
        let client = srv.client.clone();
        let base = srv.base.clone();
        tasks.push(tokio::spawn(async move {
            let mut missing = Vec::new();
            loop {
                let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                let Some(t) = next else { break };
                let r = send(client.get(format!("{base}/{t}"))).await;
                if r.status != 200 {
                    missing.push(format!("{t}: HTTP {}", r.status));
                }
            }
            missing
        }));
    }
    let mut missing = Vec::new();
    for t in tasks {
        missing.extend(t.await.expect("reader"));
    }
    for m in missing {
        *unresolved.entry(m).or_default() += 1;
    }
    println!(
        "[{backend:?}] {checked} references checked, {n_targets} distinct targets read, \
         {} unresolved; total {:.1}s",
        unresolved.len(),
        started.elapsed().as_secs_f64()
    );
    let sample: Vec<_> = unresolved.iter().take(20).collect();
    assert!(unresolved.is_empty(), "unresolved references: {sample:?}");
    srv.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthea_import_sqlite() {
    import_and_check(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthea_import_postgres() {
    import_and_check(Backend::Postgres).await;
}
