//! Shared helpers for the tests that read `../shared` (skipped with a notice when absent).

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn shared_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared");
    if dir.is_dir() {
        Some(dir)
    } else {
        println!("NOTICE: {} is absent; skipping", dir.display());
        None
    }
}

/// The JSON examples of `hl7.fhir.r4.examples-4.0.1.tgz`, extracted once (with `tar`) into the
/// cargo target tmp dir: (file name, parsed JSON). Only files with a `resourceType`.
#[allow(dead_code)]
pub fn examples() -> Option<Vec<(String, serde_json::Value)>> {
    let shared = shared_dir()?;
    let tgz = shared.join("fhir-r4/hl7.fhir.r4.examples-4.0.1.tgz");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("r4-examples");
    let pkg = out.join("package");
    let marker = out.join(".done");
    if !marker.exists() {
        std::fs::create_dir_all(&out).ok()?;
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&tgz)
            .arg("-C")
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => {
                std::fs::write(&marker, b"ok").ok()?;
            }
            other => {
                println!(
                    "NOTICE: could not extract {} ({other:?}); skipping",
                    tgz.display()
                );
                return None;
            }
        }
    }
    let mut names: Vec<_> = std::fs::read_dir(&pkg)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && !n.starts_with('.') && n != "package.json")
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let Ok(text) = std::fs::read_to_string(pkg.join(&n)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            println!("NOTICE: {n} is not JSON");
            continue;
        };
        if v.get("resourceType").and_then(|r| r.as_str()).is_some() {
            out.push((n, v));
        }
    }
    Some(out)
}

/// Extracts an npm package `.tgz` from `../shared` once into the cargo target tmp dir and
/// returns the path of its `package/` folder.
#[allow(dead_code)]
pub fn npm_package(relative: &str, name: &str) -> Option<PathBuf> {
    let tgz = shared_dir()?.join(relative);
    if !tgz.is_file() {
        println!("NOTICE: {} is absent; skipping", tgz.display());
        return None;
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let marker = out.join(".done");
    if !marker.exists() {
        std::fs::create_dir_all(&out).ok()?;
        let ok = Command::new("tar")
            .arg("-xzf")
            .arg(&tgz)
            .arg("-C")
            .arg(&out)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("NOTICE: could not extract {}; skipping", tgz.display());
            return None;
        }
        std::fs::write(&marker, b"ok").ok()?;
    }
    Some(out.join("package"))
}

/// All JSON files (recursively) under a directory, parsed, sorted by path.
#[allow(dead_code)]
pub fn json_files(dir: &Path) -> Vec<(PathBuf, serde_json::Value)> {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "json") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
            Some((p, v))
        })
        .collect()
}

/// First difference between two JSON values, as a path.
#[allow(dead_code)]
pub fn first_diff(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    None => return Some(format!("{path}.{k} missing after round trip")),
                    Some(w) => {
                        if let Some(d) = first_diff(v, w, &format!("{path}.{k}")) {
                            return Some(d);
                        }
                    }
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| format!("{path}.{k} added by round trip"))
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Some(format!("{path}: array length {} vs {}", x.len(), y.len()));
            }
            x.iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (v, w))| first_diff(v, w, &format!("{path}[{i}]")))
        }
        _ if a == b => None,
        _ => Some(format!("{path}: {a} vs {b}")),
    }
}
