//! `kiln import`: loads Bundles (transaction, batch, collection, …), single resources and NDJSON
//! files or directories, in-process against the store (a running server on the same store is
//! fine: SQLite serialises writers across processes, PostgreSQL is concurrent).
//!
//! Every file is one store transaction (NDJSON: one per 500 lines), so an interrupted import
//! leaves whole files in or out, never half a Bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::auth::Access;
use crate::interactions::bundle::run_transaction;
use crate::interactions::PreferReturn;
use crate::state::AppState;

#[derive(Debug, Default)]
pub struct ImportSummary {
    pub files: usize,
    pub resources: usize,
    /// (file, entry index or line, message)
    pub errors: Vec<(String, String, String)>,
    pub seconds: f64,
}

impl ImportSummary {
    pub fn failed(&self) -> bool {
        !self.errors.is_empty()
    }

    pub fn print(&self) {
        let rate = if self.seconds > 0.0 {
            self.resources as f64 / self.seconds
        } else {
            0.0
        };
        eprintln!(
            "imported {} resources from {} files in {:.2} s ({:.0} resources/s), {} errors",
            self.resources,
            self.files,
            self.seconds,
            rate,
            self.errors.len()
        );
        for (file, entry, msg) in self.errors.iter().take(50) {
            eprintln!("  {file} [{entry}]: {msg}");
        }
        if self.errors.len() > 50 {
            eprintln!("  … and {} more", self.errors.len() - 50);
        }
    }
}

fn collect_files(paths: &[PathBuf], out: &mut Vec<PathBuf>) -> Vec<(String, String, String)> {
    let mut errors = Vec::new();
    for p in paths {
        if p.is_dir() {
            match std::fs::read_dir(p) {
                Ok(rd) => {
                    let mut children: Vec<PathBuf> =
                        rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                    children.sort();
                    errors.extend(collect_files(&children, out));
                }
                Err(e) => errors.push((p.display().to_string(), "-".into(), e.to_string())),
            }
        } else if p.is_file() {
            let name = p.to_string_lossy();
            if name.ends_with(".json") || name.ends_with(".ndjson") || name.ends_with(".xml") {
                out.push(p.clone());
            }
        } else {
            errors.push((
                p.display().to_string(),
                "-".into(),
                "no such file or directory".into(),
            ));
        }
    }
    errors
}

/// Turns a resource into a transaction entry: PUT when it has an id, POST otherwise.
fn entry_for(resource: Value) -> Value {
    let ty = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
    {
        Some(id) => {
            json!({"resource": resource, "request": {"method": "PUT", "url": format!("{ty}/{id}")}})
        }
        None => json!({"resource": resource, "request": {"method": "POST", "url": ty}}),
    }
}

/// The transaction entries a file's document stands for.
fn entries_of(doc: Value) -> Result<(Vec<Value>, bool), String> {
    match doc.get("resourceType").and_then(Value::as_str) {
        Some("Bundle") => {
            let kind = doc
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let entries = doc
                .get("entry")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            match kind.as_str() {
                "transaction" => Ok((entries, true)),
                "batch" => Ok((entries, false)),
                _ => Ok((
                    entries
                        .into_iter()
                        .filter_map(|e| e.get("resource").cloned())
                        .map(entry_for)
                        .collect(),
                    true,
                )),
            }
        }
        Some(_) => Ok((vec![entry_for(doc)], true)),
        None => Err("not a FHIR resource (no resourceType)".into()),
    }
}

async fn import_entries(
    state: &AppState,
    entries: Vec<Value>,
    atomic: bool,
) -> Result<usize, Vec<(String, String)>> {
    let n = entries.len();
    if atomic {
        let mut tx = state
            .store
            .begin()
            .await
            .map_err(|e| vec![("-".into(), e.to_string())])?;
        match run_transaction(
            state,
            &mut tx,
            &entries,
            PreferReturn::Minimal,
            &Access::unrestricted(),
        )
        .await
        {
            Ok(_) => {
                tx.commit()
                    .await
                    .map_err(|e| vec![("-".into(), e.to_string())])?;
                Ok(n)
            }
            Err(e) => Err(e
                .issues
                .iter()
                .map(|i| ("-".to_string(), i.diagnostics.clone()))
                .collect()),
        }
    } else {
        let mut ok = 0;
        let mut errs = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            let r: Result<(), String> = async {
                let mut tx = state.store.begin().await.map_err(|e| e.to_string())?;
                run_transaction(
                    state,
                    &mut tx,
                    &[e],
                    PreferReturn::Minimal,
                    &Access::unrestricted(),
                )
                .await
                .map_err(|e| {
                    e.issues
                        .iter()
                        .map(|i| i.diagnostics.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                })?;
                tx.commit().await.map_err(|e| e.to_string())
            }
            .await;
            match r {
                Ok(()) => ok += 1,
                Err(m) => errs.push((format!("entry {i}"), m)),
            }
        }
        if errs.is_empty() {
            Ok(ok)
        } else {
            Err(errs)
        }
    }
}

async fn import_file(state: &AppState, path: &Path) -> (usize, Vec<(String, String)>) {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(e) => return (0, vec![("-".into(), e.to_string())]),
    };
    let name = path.to_string_lossy();
    if name.ends_with(".ndjson") {
        let mut total = 0;
        let mut errors = Vec::new();
        let mut chunk = Vec::new();
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .collect();
        for (i, (lineno, line)) in lines.iter().enumerate() {
            match serde_json::from_str::<Value>(line) {
                Ok(v) => chunk.push(entry_for(v)),
                Err(e) => {
                    errors.push((format!("line {}", lineno + 1), format!("invalid JSON: {e}")))
                }
            }
            if chunk.len() == 500 || i + 1 == lines.len() {
                match import_entries(state, std::mem::take(&mut chunk), true).await {
                    Ok(n) => total += n,
                    Err(e) => errors.extend(
                        e.into_iter()
                            .map(|(_, m)| (format!("lines ≤{}", lineno + 1), m)),
                    ),
                }
            }
        }
        return (total, errors);
    }
    let doc = if name.ends_with(".xml") {
        kiln_fhir::xml::xml_to_json(&text).map_err(|e| e.to_string())
    } else {
        serde_json::from_str::<Value>(&text).map_err(|e| format!("invalid JSON: {e}"))
    };
    let doc = match doc {
        Ok(d) => d,
        Err(e) => return (0, vec![("-".into(), e)]),
    };
    match entries_of(doc) {
        Err(e) => (0, vec![("-".into(), e)]),
        Ok((entries, atomic)) => match import_entries(state, entries, atomic).await {
            Ok(n) => (n, Vec::new()),
            Err(e) => (0, e),
        },
    }
}

/// Imports every file under `paths` with up to 4 files in flight.
pub async fn import_paths(state: &AppState, paths: &[PathBuf], progress: bool) -> ImportSummary {
    let start = Instant::now();
    let mut files = Vec::new();
    let mut summary = ImportSummary {
        errors: collect_files(paths, &mut files),
        ..Default::default()
    };
    summary.files = files.len();
    let bar = if progress {
        let b = ProgressBar::new(files.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} files {msg} [{elapsed_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let results = Arc::new(Mutex::new(Vec::new()));
    let sem = Arc::new(tokio::sync::Semaphore::new(4));
    let mut set = tokio::task::JoinSet::new();
    for f in files {
        let state = state.clone();
        let sem = sem.clone();
        let results = results.clone();
        let bar = bar.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = import_file(&state, &f).await;
            bar.inc(1);
            results.lock().await.push((f, r));
        });
    }
    while set.join_next().await.is_some() {}
    bar.finish_and_clear();
    for (f, (n, errs)) in results.lock().await.drain(..) {
        summary.resources += n;
        for (entry, msg) in errs {
            summary.errors.push((f.display().to_string(), entry, msg));
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    summary
}
