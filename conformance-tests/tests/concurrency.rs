//! Concurrency: 8 parallel clients posting transactions, and 8 clients updating one resource with
//! `If-Match` (optimistic locking) — no lost updates, strictly increasing versions, complete
//! history.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use kiln_conformance_tests::{backend_tests, entries, send, Method, Resp, TestServer};
use serde_json::{json, Value};

const CLIENTS: usize = 8;

backend_tests!(
    parallel_transactions,
    parallel_if_match_updates,
    parallel_creates_and_reads
);

async fn parallel_transactions(srv: &TestServer) {
    const PER_CLIENT: usize = 6;
    const PER_TX: usize = 3;
    let base = Arc::new(srv.base.clone());
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = srv.client.clone();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut created = Vec::new();
            for t in 0..PER_CLIENT {
                let pat = format!("urn:uuid:{}", uuid_like(c, t));
                let mut es = vec![json!({
                    "fullUrl": pat,
                    "resource": {"resourceType": "Patient", "name": [{"family": format!("C{c}T{t}")}]},
                    "request": {"method": "POST", "url": "Patient"}
                })];
                for k in 1..PER_TX {
                    es.push(json!({
                        "resource": {"resourceType": "Observation", "status": "final",
                            "code": {"text": format!("obs {k}")}, "subject": {"reference": pat}},
                        "request": {"method": "POST", "url": "Observation"}
                    }));
                }
                let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": es});
                let r = send(
                    client
                        .post(base.as_str())
                        .header("content-type", "application/fhir+json")
                        .body(bundle.to_string()),
                )
                .await;
                r.assert_status(200);
                let b = r.json();
                let locs: Vec<String> = entries(&b)
                    .iter()
                    .map(|e| e["response"]["location"].as_str().unwrap_or("").to_string())
                    .collect();
                assert_eq!(locs.len(), PER_TX);
                created.push(locs);
            }
            created
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    assert_eq!(all.len(), CLIENTS * PER_CLIENT);
    let mut seen = HashSet::new();
    for locs in &all {
        for l in locs {
            assert!(seen.insert(l.clone()), "location handed out twice: {l}");
        }
        // the Observations point at the Patient of their own transaction
        let pat = type_id(&locs[0]);
        for l in &locs[1..] {
            let o = srv.get(&type_id(l)).await;
            o.assert_status(200);
            assert_eq!(o.json()["subject"]["reference"], pat.as_str());
        }
    }
    let p = srv.get("Patient/_history").await.json();
    assert_eq!(p["total"], (CLIENTS * PER_CLIENT) as i64);
    let o = srv.get("Observation/_history").await.json();
    assert_eq!(o["total"], (CLIENTS * PER_CLIENT * (PER_TX - 1)) as i64);
}

fn uuid_like(c: usize, t: usize) -> String {
    format!("00000000-0000-4000-8000-{:06}{:06}", c, t)
}

fn type_id(location: &str) -> String {
    let parts: Vec<&str> = location.split('/').collect();
    let h = parts
        .iter()
        .position(|p| *p == "_history")
        .unwrap_or(parts.len());
    parts[h.saturating_sub(2)..h].join("/")
}

/// Every client increments a counter held in the resource `ROUNDS` times with read → modify →
/// `PUT If-Match`, retrying on 409/412. Without lost updates the counter ends at
/// `CLIENTS * ROUNDS`.
async fn parallel_if_match_updates(srv: &TestServer) {
    const ROUNDS: i64 = 4;
    let (id, _) = srv
        .create(
            &json!({"resourceType": "Basic", "code": {"text": "counter"},
            "extension": [{"url": "http://example.org/counter", "valueInteger": 0}]}),
        )
        .await;
    let path = format!("Basic/{id}");
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let client = srv.client.clone();
        let url = srv.url(&path);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut conflicts = 0u32;
            while (acked.len() as i64) < ROUNDS {
                let cur = send(client.get(&url)).await;
                cur.assert_status(200);
                let version = cur.etag_version().expect("ETag");
                let mut res: Value = cur.json();
                let n = res["extension"][0]["valueInteger"].as_i64().unwrap_or(-1);
                res["extension"][0]["valueInteger"] = json!(n + 1);
                let r: Resp = send(
                    client
                        .request(Method::PUT, &url)
                        .header("content-type", "application/fhir+json")
                        .header("if-match", format!("W/\"{version}\""))
                        .body(res.to_string()),
                )
                .await;
                match r.status {
                    200 => {
                        let v = r.etag_version().expect("ETag on update");
                        assert_eq!(v, version + 1, "update of v{version} gave v{v}");
                        acked.push(v);
                    }
                    409 | 412 => conflicts += 1,
                    s => panic!("unexpected status {s}: {}", r.text()),
                }
                assert!(conflicts < 10_000, "no progress");
            }
            acked
        }));
    }
    let mut versions = BTreeSet::new();
    for t in tasks {
        for v in t.await.expect("client task") {
            assert!(versions.insert(v), "version {v} acknowledged twice");
        }
    }
    let total = CLIENTS as i64 * ROUNDS;
    let expected: BTreeSet<i64> = (2..=total + 1).collect();
    assert_eq!(versions, expected, "every version 2..=N acknowledged once");
    let cur = srv.get(&path).await;
    assert_eq!(cur.etag_version(), Some(total + 1));
    assert_eq!(
        cur.json()["extension"][0]["valueInteger"].as_i64(),
        Some(total),
        "no lost update"
    );
    // history: all versions, newest first, each counter value once
    let first = srv.get(&format!("{path}/_history?_count=100")).await.json();
    let hist: Vec<Value> = srv
        .all_pages(&first, 10)
        .await
        .iter()
        .flat_map(entries)
        .collect();
    assert_eq!(hist.len() as i64, total + 1);
    let vs: Vec<i64> = hist
        .iter()
        .map(|e| {
            e["resource"]["meta"]["versionId"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    let want: Vec<i64> = (1..=total + 1).rev().collect();
    assert_eq!(vs, want, "history strictly ordered and complete");
    for e in &hist {
        let v: i64 = e["resource"]["meta"]["versionId"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        assert_eq!(
            e["resource"]["extension"][0]["valueInteger"].as_i64(),
            Some(v - 1),
            "version {v} holds counter {}",
            v - 1
        );
    }
    // lastUpdated strictly increases with the version
    let lus: Vec<String> = hist
        .iter()
        .rev()
        .map(|e| {
            e["resource"]["meta"]["lastUpdated"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    for w in lus.windows(2) {
        assert!(
            w[0] < w[1],
            "lastUpdated not increasing: {} then {}",
            w[0],
            w[1]
        );
    }
}

/// Plain creates and reads from 8 clients at once: every create is acknowledged once and readable.
async fn parallel_creates_and_reads(srv: &TestServer) {
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = srv.client.clone();
        let url = srv.url("Patient");
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..10 {
                let body =
                    json!({"resourceType": "Patient", "name": [{"family": format!("P{c}-{i}")}]});
                let r = send(
                    client
                        .post(&url)
                        .header("content-type", "application/fhir+json")
                        .body(body.to_string()),
                )
                .await;
                r.assert_status(201);
                let id = r.json()["id"].as_str().unwrap_or_default().to_string();
                let back = send(client.get(format!("{url}/{id}"))).await;
                back.assert_status(200);
                assert_eq!(back.json()["name"][0]["family"], format!("P{c}-{i}"));
                ids.push(id);
            }
            ids
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        for id in t.await.expect("client task") {
            assert!(all.insert(id));
        }
    }
    assert_eq!(all.len(), CLIENTS * 10);
    assert_eq!(
        srv.get("Patient/_history").await.json()["total"],
        (CLIENTS * 10) as i64
    );
}
