//! The terminology service inside the server: the R4 and THO code systems, value sets and concept
//! maps shipped with Kiln, the large code systems an operator loaded with
//! `kiln terminology load` (ICD-10-CM, LOINC, SNOMED CT, the ICD-10-CM→ICD-9-CM GEM), and the
//! CodeSystem/ValueSet/ConceptMap resources stored through the REST API. Built on first use, so
//! server start stays fast, and rebuilt in the background when `kiln terminology load` saves a new
//! version while the server runs (hot reload; every node reading the same terminology directory
//! picks it up within `RELOAD_POLL`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_terminology::{Terminology, TerminologyStore};

/// Loads every large code system saved in `dir` into `tx`.
pub fn load_saved_systems(tx: &mut Terminology, dir: &Path) -> anyhow::Result<usize> {
    if !dir.exists() {
        return Ok(0);
    }
    let store = TerminologyStore::open(dir)
        .map_err(|e| anyhow::anyhow!("cannot open terminology store {}: {e}", dir.display()))?;
    let mut n = 0;
    for id in store
        .list()
        .map_err(|e| anyhow::anyhow!("cannot list terminology store: {e}"))?
    {
        if let Some(mut table) = store
            .load(&id)
            .map_err(|e| anyhow::anyhow!("cannot load code system {id}: {e}"))?
        {
            // companion resources of the release (SNOMED CT `?fhir_cm=` ConceptMaps)
            for r in &table.resources {
                tx.add_resource(r.clone()).map_err(|e| {
                    anyhow::anyhow!("invalid resource in code system {id}: {:?}", e.issues)
                })?;
            }
            attach_text_index(&store, &id, &mut table)?;
            tx.add_code_system(Arc::new(table));
            n += 1;
        }
    }
    if let Some(gem) = store
        .load_resource("icd10cm-gem")
        .map_err(|e| anyhow::anyhow!("cannot load the GEM ConceptMap: {e}"))?
    {
        tx.add_resource(gem)
            .map_err(|e| anyhow::anyhow!("invalid GEM ConceptMap: {:?}", e.issues))?;
    }
    Ok(n)
}

/// Attaches the full-text index (`$expand?filter=`) of a saved code system: the one saved beside
/// it when it covers the same concepts, else one built now (and saved for the next start).
fn attach_text_index(
    store: &TerminologyStore,
    id: &str,
    table: &mut kiln_terminology::ConceptTable,
) -> anyhow::Result<()> {
    let idx = match store.open_text_index(id) {
        Ok(idx) if idx.len() == table.len() as u64 => idx,
        _ => {
            let t0 = std::time::Instant::now();
            let idx = store
                .build_text_index(id, table)
                .map_err(|e| anyhow::anyhow!("cannot build the text index of {id}: {e}"))?;
            tracing::info!(
                code_system = id,
                concepts = idx.len(),
                secs = t0.elapsed().as_secs_f64(),
                "text index built"
            );
            idx
        }
    };
    table.set_text_index(Arc::new(idx));
    Ok(())
}

/// The state of the saved code systems a service was built from: (file name, length, modified)
/// of every file in the terminology directory, sorted. A `kiln terminology load` replaces its
/// snapshot by rename, which changes the entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreFingerprint(Vec<(String, u64, Option<std::time::SystemTime>)>);

impl StoreFingerprint {
    /// Reads the fingerprint of `dir` (empty when it does not exist).
    pub fn read(dir: &Path) -> StoreFingerprint {
        let mut v = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                // temporary files of a load in progress are not part of the saved state
                if name.starts_with(".tmp") {
                    continue;
                }
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        v.push((name, m.len(), m.modified().ok()));
                    }
                }
            }
        }
        v.sort();
        StoreFingerprint(v)
    }
}

struct Loaded {
    tx: Arc<Terminology>,
    fingerprint: StoreFingerprint,
    checked: std::time::Instant,
}

/// Lazily built, shared terminology service that picks up code systems loaded while the server
/// runs (hot reload): at most every `poll` it compares the terminology directory's fingerprint
/// with the one it was built from, and on a change rebuilds the service in the background while
/// requests go on being answered by the previous one, which is swapped out when the new one is
/// complete (a failed rebuild keeps the previous one and is logged).
pub struct TerminologyService {
    dir: Option<PathBuf>,
    poll: std::time::Duration,
    current: std::sync::Mutex<Option<Loaded>>,
    /// One build at a time (the first one, or a reload).
    building: tokio::sync::Mutex<()>,
    reloading: std::sync::atomic::AtomicBool,
}

/// How often a running server looks for a newly loaded code system.
pub const RELOAD_POLL: std::time::Duration = std::time::Duration::from_secs(5);

fn build(dir: Option<&Path>) -> anyhow::Result<Terminology> {
    let mut tx = Terminology::with_r4_content()
        .map_err(|e| anyhow::anyhow!("cannot load R4 terminology: {:?}", e.issues))?;
    if let Some(d) = dir {
        let n = load_saved_systems(&mut tx, d)?;
        tracing::info!(code_systems = n, dir = %d.display(), "terminology loaded");
    }
    Ok(tx)
}

impl TerminologyService {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self::with_poll(dir, RELOAD_POLL)
    }

    /// A service that checks for newly loaded code systems at most every `poll`.
    pub fn with_poll(dir: Option<PathBuf>, poll: std::time::Duration) -> Self {
        TerminologyService {
            dir,
            poll,
            current: std::sync::Mutex::new(None),
            building: tokio::sync::Mutex::new(()),
            reloading: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn fingerprint(&self) -> StoreFingerprint {
        self.dir
            .as_deref()
            .map(StoreFingerprint::read)
            .unwrap_or_default()
    }

    /// The service if it is built already (never builds, never checks for a reload).
    pub fn current(&self) -> Option<Arc<Terminology>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.tx.clone())
    }

    /// The current service; starts a background rebuild when the saved code systems changed.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<Terminology>, crate::error::FhirError> {
        let stale = {
            let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
            match cur.as_mut() {
                Some(l) if l.checked.elapsed() < self.poll || self.dir.is_none() => {
                    return Ok(l.tx.clone())
                }
                Some(l) => {
                    l.checked = std::time::Instant::now();
                    Some((l.tx.clone(), l.fingerprint.clone()))
                }
                None => None,
            }
        };
        match stale {
            Some((tx, old)) => {
                let fp = {
                    let this = self.clone();
                    tokio::task::spawn_blocking(move || this.fingerprint())
                        .await
                        .unwrap_or_else(|_| old.clone())
                };
                if fp != old
                    && !self
                        .reloading
                        .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let _guard = this.building.lock().await;
                        let dir = this.dir.clone();
                        let r = tokio::task::spawn_blocking(move || {
                            // the fingerprint is taken before reading, so a load that lands
                            // during this rebuild triggers another one
                            let fp = dir
                                .as_deref()
                                .map(StoreFingerprint::read)
                                .unwrap_or_default();
                            build(dir.as_deref()).map(|tx| (tx, fp))
                        })
                        .await;
                        match r {
                            Ok(Ok((tx, fp))) => {
                                tracing::info!("terminology reloaded: new code system versions");
                                *this.current.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(Loaded {
                                        tx: Arc::new(tx),
                                        fingerprint: fp,
                                        checked: std::time::Instant::now(),
                                    });
                            }
                            Ok(Err(e)) => {
                                tracing::error!(error = %format!("{e:#}"), "terminology reload failed; the previous version stays in use");
                                // do not retry until the directory changes again
                                if let Some(l) = this
                                    .current
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .as_mut()
                                {
                                    l.fingerprint = fp;
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "terminology reload panicked"),
                        }
                        this.reloading
                            .store(false, std::sync::atomic::Ordering::SeqCst);
                    });
                }
                Ok(tx)
            }
            None => {
                let _guard = self.building.lock().await;
                if let Some(l) = self
                    .current
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                {
                    return Ok(l.tx.clone());
                }
                let dir = self.dir.clone();
                let (tx, fp) = tokio::task::spawn_blocking(move || {
                    let fp = dir
                        .as_deref()
                        .map(StoreFingerprint::read)
                        .unwrap_or_default();
                    build(dir.as_deref()).map(|tx| (Arc::new(tx), fp))
                })
                .await
                .map_err(|e| anyhow::anyhow!("terminology loader failed: {e}"))
                .and_then(|r| r)
                .map_err(|e| crate::error::FhirError::internal(format!("{e:#}")))?;
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(Loaded {
                    tx: tx.clone(),
                    fingerprint: fp,
                    checked: std::time::Instant::now(),
                });
                Ok(tx)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_terminology::{Concept, ConceptTable};
    use serde_json::json;

    /// A code system loaded while the server runs replaces the previous version without a
    /// restart; a broken snapshot leaves the previous version in use.
    #[tokio::test]
    async fn a_newly_loaded_version_is_picked_up_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = TerminologyStore::open(dir.path()).unwrap();
        let table = |version: &str, n: usize| {
            let mut t =
                ConceptTable::new("http://hl7.org/fhir/sid/icd-10-cm", Some(version.into()));
            for i in 0..n {
                t.add(Concept::new(
                    format!("N{i:04}"),
                    Some(format!("Disorder {i}")),
                ));
            }
            t
        };
        let total = |tx: &Terminology| {
            tx.expand(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "url", "valueUri": "http://hl7.org/fhir/sid/icd-10-cm?fhir_vs"}]}))
                .unwrap()["expansion"]["total"]
                .clone()
        };
        store.save("icd10cm", &table("v1", 3)).unwrap();
        let svc = Arc::new(TerminologyService::with_poll(
            Some(dir.path().to_path_buf()),
            std::time::Duration::ZERO,
        ));
        let tx1 = svc.get().await.unwrap();
        assert_eq!(total(&tx1), json!(3));
        // an unchanged directory: the same service
        assert!(Arc::ptr_eq(&tx1, &svc.get().await.unwrap()));

        store.save("icd10cm", &table("v2", 4)).unwrap();
        // the rebuild runs in the background; until it completes the previous version answers
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let tx2 = loop {
            let tx = svc.get().await.unwrap();
            if total(&tx) == json!(4) {
                break tx;
            }
            assert_eq!(total(&tx), json!(3), "either the old or the new version");
            assert!(std::time::Instant::now() < deadline, "v2 never picked up");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(!Arc::ptr_eq(&tx1, &tx2));

        // a snapshot that cannot be read: the rebuild fails and v2 stays in use
        std::fs::write(store.snapshot_path("icd10cm"), b"not a gzip'd snapshot").unwrap();
        for _ in 0..25 {
            assert_eq!(total(&svc.get().await.unwrap()), json!(4));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // and a good one after it is picked up again
        store.save("icd10cm", &table("v3", 5)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while total(&svc.get().await.unwrap()) != json!(5) {
            assert!(std::time::Instant::now() < deadline, "v3 never picked up");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A saved code system gets its text index at the first start (built and saved), the next
    /// start reopens it, and `$expand?filter=` answers through it.
    #[test]
    fn saved_systems_get_a_text_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = TerminologyStore::open(dir.path()).unwrap();
        let mut t = ConceptTable::new("http://hl7.org/fhir/sid/icd-10-cm", Some("t".into()));
        for i in 0..1500 {
            let d = if i % 10 == 0 {
                format!("Chronic kidney disease, stage {i}")
            } else {
                format!("Other disorder {i}")
            };
            t.add(Concept::new(format!("N{i:04}"), Some(d)));
        }
        store.save("icd10cm", &t).unwrap();
        let expand = |tx: &Terminology| {
            tx.expand(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "url", "valueUri": "http://hl7.org/fhir/sid/icd-10-cm?fhir_vs"},
                {"name": "filter", "valueString": "chron kid"},
                {"name": "count", "valueInteger": 5}]}))
                .unwrap()
        };
        let mut tx = Terminology::new();
        assert_eq!(load_saved_systems(&mut tx, dir.path()).unwrap(), 1);
        assert!(dir.path().join("icd10cm.index").is_dir(), "index saved");
        let r = expand(&tx);
        assert_eq!(r["expansion"]["total"], json!(150));
        assert_eq!(r["expansion"]["contains"][0]["code"], json!("N0000"));
        assert_eq!(r["expansion"]["contains"].as_array().unwrap().len(), 5);
        // second start: the saved index is reopened
        let modified = std::fs::metadata(dir.path().join("icd10cm.index"))
            .unwrap()
            .modified()
            .unwrap();
        let mut tx2 = Terminology::new();
        load_saved_systems(&mut tx2, dir.path()).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("icd10cm.index"))
                .unwrap()
                .modified()
                .unwrap(),
            modified
        );
        assert_eq!(expand(&tx2)["expansion"]["total"], json!(150));
    }
}
