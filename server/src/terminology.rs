//! The terminology service inside the server: the R4 and THO code systems, value sets and concept
//! maps shipped with Kiln, the large code systems an operator loaded with
//! `kiln terminology load` (ICD-10-CM, LOINC, SNOMED CT, the ICD-10-CM→ICD-9-CM GEM), and the
//! CodeSystem/ValueSet/ConceptMap resources stored through the REST API. Built on first use, so
//! server start stays fast, and rebuilt in the background when `kiln terminology load` saves a new
//! version while the server runs (hot reload within `RELOAD_POLL`).
//!
//! Loaded code systems come from two places: the snapshot files of the terminology directory
//! (`<data-dir>/terminology`, the embedded SQLite mode) and, on PostgreSQL, the database's
//! `terminology_*` tables (`kiln terminology load … --database postgres://…`), which every node
//! of the database reads, so nodes stay stateless. Each node polls the database's generations
//! (one small query, at most every `RELOAD_POLL`, on use) and rebuilds in the background when
//! one changed; the text index of a database code system is built by each node into a local
//! cache (`<terminology dir>/db-cache`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_store::{Store, TerminologyHead, TerminologyItem};
use kiln_terminology::store::{Release, KIND_CODE_SYSTEM, KIND_RESOURCE, KIND_UCUM};
use kiln_terminology::{Terminology, TerminologyStore};

/// Loads every large code system saved in `dir` into `tx`.
pub fn load_saved_systems(tx: &mut Terminology, dir: &Path) -> anyhow::Result<usize> {
    load_saved_systems_except(tx, dir, &HashSet::new())
}

/// Loads the code systems saved in `dir` into `tx`, except the ids in `skip` (those the
/// database holds, which win over a node's own files).
fn load_saved_systems_except(
    tx: &mut Terminology,
    dir: &Path,
    skip: &HashSet<String>,
) -> anyhow::Result<usize> {
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
        if skip.contains(&id) {
            tracing::warn!(
                code_system = %id,
                dir = %dir.display(),
                "a snapshot file is ignored: the database holds this code system"
            );
            continue;
        }
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
    if skip.contains("icd10cm-gem") {
        return Ok(n);
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

/// What a service was built from: the terminology directory's files and the database's items
/// (id, generation, completion time). A `kiln terminology load` changes one of them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint {
    files: StoreFingerprint,
    database: Vec<(String, i64, i64)>,
}

/// Where a node keeps the text indexes of the database's code systems.
enum CacheDir {
    /// `<terminology dir>/db-cache`.
    Path(PathBuf),
    /// A temporary directory of this service (no terminology directory configured).
    Temp(tempfile::TempDir),
}

impl CacheDir {
    fn path(&self) -> &Path {
        match self {
            CacheDir::Path(p) => p,
            CacheDir::Temp(t) => t.path(),
        }
    }
}

/// The sources of loaded code systems of one service.
struct Sources {
    dir: Option<PathBuf>,
    database: Option<Store>,
    cache: std::sync::OnceLock<Result<CacheDir, String>>,
}

/// An item read from the database for a build.
struct DbItem {
    head: TerminologyHead,
    data: Vec<u8>,
}

impl Sources {
    fn cache_dir(&self) -> anyhow::Result<&Path> {
        let c = self.cache.get_or_init(|| match &self.dir {
            Some(d) => {
                let p = d.join("db-cache");
                std::fs::create_dir_all(&p)
                    .map(|_| CacheDir::Path(p.clone()))
                    .map_err(|e| format!("cannot create {}: {e}", p.display()))
            }
            None => tempfile::Builder::new()
                .prefix("kiln-terminology-cache")
                .tempdir()
                .map(CacheDir::Temp)
                .map_err(|e| format!("cannot create a temporary text index cache: {e}")),
        });
        c.as_ref()
            .map(CacheDir::path)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The current fingerprint. A database that cannot be reached is an error (the caller
    /// keeps what it has).
    async fn fingerprint(&self) -> anyhow::Result<Fingerprint> {
        let files = match self.dir.clone() {
            Some(d) => tokio::task::spawn_blocking(move || StoreFingerprint::read(&d))
                .await
                .unwrap_or_default(),
            None => StoreFingerprint::default(),
        };
        let database = match &self.database {
            Some(db) => db
                .terminology_heads()
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the loaded code systems: {e}"))?
                .into_iter()
                .map(|h| (h.id, h.generation, h.loaded_at))
                .collect(),
            None => Vec::new(),
        };
        Ok(Fingerprint { files, database })
    }

    /// Builds a complete service from the R4 content, the database's items and the directory's
    /// snapshots, with the fingerprint taken before reading (a load that lands meanwhile
    /// triggers another build).
    async fn build(self: &Arc<Self>) -> anyhow::Result<(Terminology, Fingerprint)> {
        let fp = self.fingerprint().await?;
        let mut items = Vec::new();
        if let Some(db) = &self.database {
            for (id, _, _) in &fp.database {
                // read by id: a newer generation than the fingerprint's is fine (the next
                // poll sees the change and builds again)
                if let Some((head, data)) = db
                    .read_terminology(id)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot read code system {id}: {e}"))?
                {
                    items.push(DbItem { head, data });
                }
            }
        }
        let this = self.clone();
        let tx = tokio::task::spawn_blocking(move || this.build_blocking(items))
            .await
            .map_err(|e| anyhow::anyhow!("terminology loader failed: {e}"))??;
        Ok((tx, fp))
    }

    fn build_blocking(&self, items: Vec<DbItem>) -> anyhow::Result<Terminology> {
        let mut tx = Terminology::with_r4_content()
            .map_err(|e| anyhow::anyhow!("cannot load R4 terminology: {:?}", e.issues))?;
        let mut from_db = HashSet::new();
        let mut keep_indexes = HashSet::new();
        for item in items {
            let h = &item.head;
            let name = format!("database item {} generation {}", h.id, h.generation);
            match h.kind.as_str() {
                KIND_CODE_SYSTEM => {
                    let mut table = kiln_terminology::store::decode_snapshot(&item.data, &name)
                        .map_err(|e| anyhow::anyhow!("cannot load code system {}: {e}", h.id))?;
                    drop(item.data);
                    for r in &table.resources {
                        tx.add_resource(r.clone()).map_err(|e| {
                            anyhow::anyhow!(
                                "invalid resource in code system {}: {:?}",
                                h.id,
                                e.issues
                            )
                        })?;
                    }
                    let cache = TerminologyStore::open(self.cache_dir()?)
                        .map_err(|e| anyhow::anyhow!("cannot open the text index cache: {e}"))?;
                    let index_id = format!("{}-{}-{}", h.id, h.generation, h.loaded_at);
                    attach_text_index(&cache, &index_id, &mut table)?;
                    keep_indexes.insert(format!("{index_id}.index"));
                    tx.add_code_system(Arc::new(table));
                }
                KIND_RESOURCE => {
                    let r = kiln_terminology::store::decode_resource(&item.data, &name)
                        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", h.id))?;
                    tx.add_resource(r)
                        .map_err(|e| anyhow::anyhow!("invalid {}: {:?}", h.id, e.issues))?;
                }
                // installed at start-up (`loaded_ucum`): UCUM is process-wide
                KIND_UCUM => {}
                other => {
                    tracing::warn!(id = %h.id, kind = %other, "unknown terminology item kind ignored")
                }
            }
            from_db.insert(h.id.clone());
        }
        let mut n = from_db.len();
        if let Some(d) = &self.dir {
            n += load_saved_systems_except(&mut tx, d, &from_db)?;
        }
        if self.database.is_some() {
            // the text indexes of older generations are no longer used by this build
            if let Ok(cache) = self.cache_dir() {
                if let Ok(entries) = std::fs::read_dir(cache) {
                    for e in entries.flatten() {
                        let name = e.file_name().to_string_lossy().to_string();
                        if name.ends_with(".index") && !keep_indexes.contains(&name) {
                            let _ = std::fs::remove_dir_all(e.path());
                        }
                    }
                }
            }
        }
        tracing::info!(
            items = n,
            database = from_db.len(),
            dir = ?self.dir,
            "terminology loaded"
        );
        Ok(tx)
    }
}

struct Loaded {
    tx: Arc<Terminology>,
    fingerprint: Fingerprint,
    checked: std::time::Instant,
}

/// Lazily built, shared terminology service that picks up code systems loaded while the server
/// runs (hot reload): at most every `poll` it compares the fingerprint of its sources (the
/// terminology directory's files, the database's item generations) with the one it was built
/// from, and on a change rebuilds the service in the background while requests go on being
/// answered by the previous one, which is swapped out when the new one is complete (a failed
/// rebuild keeps the previous one and is logged).
pub struct TerminologyService {
    sources: Arc<Sources>,
    poll: std::time::Duration,
    current: std::sync::Mutex<Option<Loaded>>,
    /// One build at a time (the first one, or a reload).
    building: tokio::sync::Mutex<()>,
    reloading: std::sync::atomic::AtomicBool,
}

/// How often a running server looks for a newly loaded code system.
pub const RELOAD_POLL: std::time::Duration = std::time::Duration::from_secs(5);

impl TerminologyService {
    /// A service over the snapshot files of `dir`.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self::with_sources(dir, None, RELOAD_POLL)
    }

    /// A service that checks for newly loaded code systems at most every `poll`.
    pub fn with_poll(dir: Option<PathBuf>, poll: std::time::Duration) -> Self {
        Self::with_sources(dir, None, poll)
    }

    /// A service over the snapshot files of `dir` and the code systems loaded into `database`
    /// (which win over a file of the same id), polled at most every `poll`.
    pub fn with_sources(
        dir: Option<PathBuf>,
        database: Option<Store>,
        poll: std::time::Duration,
    ) -> Self {
        TerminologyService {
            sources: Arc::new(Sources {
                dir,
                database,
                cache: std::sync::OnceLock::new(),
            }),
            poll,
            current: std::sync::Mutex::new(None),
            building: tokio::sync::Mutex::new(()),
            reloading: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn has_sources(&self) -> bool {
        self.sources.dir.is_some() || self.sources.database.is_some()
    }

    /// The service if it is built already (never builds, never checks for a reload).
    pub fn current(&self) -> Option<Arc<Terminology>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.tx.clone())
    }

    /// The current service; starts a background rebuild when the loaded code systems changed.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<Terminology>, crate::error::FhirError> {
        let stale = {
            let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
            match cur.as_mut() {
                Some(l) if l.checked.elapsed() < self.poll || !self.has_sources() => {
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
                let fp = match self.sources.fingerprint().await {
                    Ok(fp) => fp,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "terminology poll failed; the current version stays in use");
                        old.clone()
                    }
                };
                if fp != old
                    && !self
                        .reloading
                        .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let _guard = this.building.lock().await;
                        match this.sources.build().await {
                            Ok((tx, fp)) => {
                                tracing::info!("terminology reloaded: new code system versions");
                                *this.current.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some(Loaded {
                                        tx: Arc::new(tx),
                                        fingerprint: fp,
                                        checked: std::time::Instant::now(),
                                    });
                            }
                            Err(e) => {
                                tracing::error!(error = %format!("{e:#}"), "terminology reload failed; the previous version stays in use");
                                // do not retry until the sources change again
                                if let Some(l) = this
                                    .current
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .as_mut()
                                {
                                    l.fingerprint = fp;
                                }
                            }
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
                let (tx, fp) = self
                    .sources
                    .build()
                    .await
                    .map_err(|e| crate::error::FhirError::internal(format!("{e:#}")))?;
                let tx = Arc::new(tx);
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

/// Where `kiln terminology load` saves a release.
pub enum LoadTarget<'a> {
    /// Snapshot files in a terminology directory (`<data-dir>/terminology`, SQLite mode).
    Directory(&'a Path),
    /// The database's `terminology_*` tables (PostgreSQL: shared by every node).
    Database(&'a Store),
}

/// What `kiln terminology load` does: parses the release of `system` at `path` completely (a
/// malformed file is an error naming `file:line:column`, and nothing is saved), then saves it
/// atomically in `target`, the previous version staying current when anything fails. Progress
/// lines (one per release file read) go to `progress`. Returns the summary line to print.
pub async fn load_release(
    target: LoadTarget<'_>,
    system: &str,
    path: &Path,
    version: Option<&str>,
    progress: impl Fn(&str) + Send + 'static,
) -> anyhow::Result<String> {
    let (system, path, version) = (
        system.to_string(),
        path.to_path_buf(),
        version.map(str::to_string),
    );
    match target {
        LoadTarget::Directory(dir) => {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || {
                kiln_terminology::tabular::with_progress(progress, || {
                    let ts = TerminologyStore::open(&dir)
                        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", dir.display()))?;
                    let release =
                        kiln_terminology::store::parse_release(&system, &path, version.as_deref())
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                    kiln_terminology::tabular::progress(&format!(
                        "writing the {} snapshot",
                        release.id()
                    ));
                    ts.save_release(&release)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let mut line = release.summary();
                    match &release {
                        Release::CodeSystem { id, table } => {
                            line.push_str(&text_index(&ts, id, table)?)
                        }
                        Release::Ucum { .. } => line.push_str(" (used from the next server start)"),
                        Release::Resource { .. } => {}
                    }
                    Ok::<_, anyhow::Error>(line)
                })
            })
            .await?
        }
        LoadTarget::Database(store) => {
            let (release, bytes) = tokio::task::spawn_blocking(move || {
                kiln_terminology::tabular::with_progress(progress, || {
                    let release =
                        kiln_terminology::store::parse_release(&system, &path, version.as_deref())
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                    kiln_terminology::tabular::progress(&format!(
                        "encoding the {} snapshot",
                        release.id()
                    ));
                    let bytes = release.encode().map_err(|e| anyhow::anyhow!("{e}"))?;
                    Ok::<_, anyhow::Error>((release, bytes))
                })
            })
            .await??;
            let summary = release.summary();
            let (url, version) = (release.url(), release.version());
            let head = store
                .save_terminology(
                    &TerminologyItem {
                        id: release.id(),
                        kind: release.kind(),
                        url: url.as_deref(),
                        version: version.as_deref(),
                        summary: Some(&summary),
                    },
                    &bytes,
                )
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot save {} in the database: {e}", release.id())
                })?;
            let when = if matches!(release, Release::Ucum { .. }) {
                "used by each node from its next start".to_string()
            } else {
                format!(
                    "running nodes pick it up within {} s",
                    RELOAD_POLL.as_secs()
                )
            };
            Ok(format!(
                "{summary}; saved in the database as {} generation {} ({:.1} MB in {} rows; {when})",
                head.id,
                head.generation,
                head.size as f64 / 1e6,
                head.chunks
            ))
        }
    }
}

/// Builds the full-text index (`$expand?filter=`) of a freshly loaded code system.
fn text_index(
    ts: &TerminologyStore,
    id: &str,
    table: &kiln_terminology::ConceptTable,
) -> anyhow::Result<String> {
    let t0 = std::time::Instant::now();
    let idx = ts
        .build_text_index(id, table)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(format!(
        "; text index of {} concepts built in {:.1} s",
        idx.len(),
        t0.elapsed().as_secs_f64()
    ))
}

/// The UCUM table loaded with `kiln terminology load ucum`: from the database when it holds one
/// (PostgreSQL), else from the terminology directory. `None` when none was loaded (the vendored
/// UCUM 2.2 is used). Installed by `kiln serve` before anything uses UCUM.
pub async fn loaded_ucum(
    dir: Option<&Path>,
    database: Option<&Store>,
) -> anyhow::Result<Option<(kiln_terminology::ucum::essence::Essence, String)>> {
    if let Some(db) = database {
        if let Some((head, data)) = db
            .read_terminology("ucum")
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the loaded UCUM table: {e}"))?
        {
            let name = format!("database item ucum generation {}", head.generation);
            let e = kiln_terminology::store::decode_ucum(&data, &name)
                .map_err(|e| anyhow::anyhow!("cannot read the loaded UCUM table: {e}"))?;
            return Ok(Some((e, "the database".to_string())));
        }
    }
    let Some(dir) = dir else { return Ok(None) };
    if !dir.join("ucum-essence.xml.gz").exists() {
        return Ok(None);
    }
    let ts = TerminologyStore::open(dir)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", dir.display()))?;
    Ok(ts
        .load_ucum()
        .map_err(|e| anyhow::anyhow!("cannot read the loaded UCUM table: {e}"))?
        .map(|e| (e, dir.display().to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_terminology::{Concept, ConceptTable};
    use serde_json::{json, Value};

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

    /// A small ICD-10-CM tabular in the CMS layout; `extra` adds codes under S00.0.
    pub(crate) fn tabular(version: &str, extra: &[(&str, &str)]) -> String {
        let extra: String = extra
            .iter()
            .map(|(c, d)| format!("<diag><name>{c}</name><desc>{d}</desc></diag>"))
            .collect();
        format!(
            r#"<?xml version="1.0" encoding="utf-8"?>
<ICD10CM.tabular><version>{version}</version>
<chapter><name>19</name><desc>Injury, poisoning and certain other consequences of external causes (S00-T88)</desc>
 <sectionIndex><sectionRef first="S00" last="S09" id="S00-S09">Injuries to the head</sectionRef></sectionIndex>
 <section id="S00-S09"><desc>Injuries to the head (S00-S09)</desc>
  <diag><name>S00</name><desc>Superficial injury of head</desc>
   <diag><name>S00.0</name><desc>Superficial injury of scalp</desc>
     <diag><name>S00.00</name><desc>Unspecified superficial injury of scalp</desc></diag>{extra}
   </diag>
  </diag>
 </section>
</chapter>
</ICD10CM.tabular>"#
        )
    }

    fn lookup(tx: &Terminology, code: &str) -> Result<Value, kiln_terminology::TxError> {
        tx.lookup(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "system", "valueUri": "http://hl7.org/fhir/sid/icd-10-cm"},
            {"name": "code", "valueCode": code}]}))
    }

    fn version_of(tx: &Terminology) -> Value {
        let r = lookup(tx, "S00").unwrap();
        r["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "version")
            .map(|p| p["valueString"].clone())
            .unwrap_or(Value::Null)
    }

    /// Code systems loaded into the database (the same `load_release` as the CLI) reach the
    /// service and win over a node's file of the same id; a new generation is picked up in the
    /// background; a failed load changes nothing; the node's text index cache keeps only the
    /// current generation's index.
    #[tokio::test]
    async fn database_items_are_served_and_reloaded() {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(
            &kiln_store::StoreConfig {
                data_dir: data.path().to_path_buf(),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
        let tdir = data.path().join("terminology");
        let mut own = ConceptTable::new("http://hl7.org/fhir/sid/icd-10-cm", Some("file".into()));
        own.add(Concept::new("S00", Some("from the node's own file".into())));
        TerminologyStore::open(&tdir)
            .unwrap()
            .save("icd10cm", &own)
            .unwrap();

        let load = |name: &str, xml: String| {
            let path = data.path().join(name);
            std::fs::write(&path, xml).unwrap();
            let store = store.clone();
            async move {
                load_release(
                    LoadTarget::Database(&store),
                    "icd10cm",
                    &path,
                    None,
                    |_: &str| {},
                )
                .await
            }
        };
        let line = load("v1.xml", tabular("v1", &[])).await.unwrap();
        assert!(line.contains("generation 1"), "{line}");
        let svc = Arc::new(TerminologyService::with_sources(
            Some(tdir.clone()),
            Some(store.clone()),
            std::time::Duration::ZERO,
        ));
        let tx1 = svc.get().await.unwrap();
        assert_eq!(version_of(&tx1), json!("v1"));
        assert!(lookup(&tx1, "S00.00").is_ok());
        assert!(lookup(&tx1, "S00.01").is_err());
        assert!(Arc::ptr_eq(&tx1, &svc.get().await.unwrap()), "unchanged");

        load("v2.xml", tabular("v2", &[("S00.01", "Abrasion of scalp")]))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let tx2 = loop {
            let tx = svc.get().await.unwrap();
            if version_of(&tx) == json!("v2") {
                break tx;
            }
            assert_eq!(
                version_of(&tx),
                json!("v1"),
                "either the old or the new version"
            );
            assert!(std::time::Instant::now() < deadline, "v2 never picked up");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(lookup(&tx2, "S00.01").is_ok());

        // a malformed release: an error naming the place, nothing saved, v2 goes on answering
        let err = load("bad.xml", tabular("v3", &[]).replace("</section>", ""))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.xml:"), "{err}");
        let heads = store.terminology_heads().await.unwrap();
        assert_eq!(heads.len(), 1);
        assert_eq!(heads[0].generation, 2);
        assert_eq!(heads[0].version.as_deref(), Some("v2"));
        for _ in 0..5 {
            assert!(Arc::ptr_eq(&tx2, &svc.get().await.unwrap()));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        // the cache holds the current generation's text index only
        let cached: Vec<String> = std::fs::read_dir(tdir.join("db-cache"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".index"))
            .collect();
        assert_eq!(cached.len(), 1, "{cached:?}");
        assert!(cached[0].starts_with("icd10cm-2-"), "{cached:?}");
        store.close().await;
    }

    /// `kiln terminology load ucum` into the database reaches every node at its start; without
    /// one, a node's directory is used; with neither, the vendored table.
    #[tokio::test]
    async fn loaded_ucum_comes_from_the_database_first() {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(
            &kiln_store::StoreConfig {
                data_dir: data.path().to_path_buf(),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
        let tdir = data.path().join("terminology");
        assert!(loaded_ucum(Some(&tdir), Some(&store))
            .await
            .unwrap()
            .is_none());
        let mut xml = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(
                &include_bytes!("../../terminology/data/ucum-essence.xml.gz")[..],
            ),
            &mut xml,
        )
        .unwrap();
        let file = data.path().join("ucum-essence.xml");
        std::fs::write(
            &file,
            xml.replacen("version=\"2.2\"", "version=\"9.9-db\"", 1),
        )
        .unwrap();
        let line = load_release(
            LoadTarget::Database(&store),
            "ucum",
            &file,
            None,
            |_: &str| {},
        )
        .await
        .unwrap();
        assert!(line.contains("next start"), "{line}");
        std::fs::write(
            &file,
            xml.replacen("version=\"2.2\"", "version=\"9.9-dir\"", 1),
        )
        .unwrap();
        load_release(
            LoadTarget::Directory(&tdir),
            "ucum",
            &file,
            None,
            |_: &str| {},
        )
        .await
        .unwrap();
        let (e, from) = loaded_ucum(Some(&tdir), Some(&store))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.version.as_str(), from.as_str()),
            ("9.9-db", "the database")
        );
        let (e, _) = loaded_ucum(Some(&tdir), None).await.unwrap().unwrap();
        assert_eq!(e.version, "9.9-dir");
        store.close().await;
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
