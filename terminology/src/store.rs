//! Persistence of large loaded code systems: one gzip'd serde snapshot file per system in a data
//! directory chosen by the caller. Saving is atomic: the snapshot is written to a temporary file
//! in the same directory and renamed over the previous one, so a failed load leaves the previous
//! version in place.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::provider::ConceptTable;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("terminology store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("terminology snapshot {path}: {message}")]
    Format { path: String, message: String },
    #[error("invalid terminology id '{0}' (use letters, digits, '-' and '_')")]
    BadId(String),
    #[error("{0}")]
    Load(String),
}

/// The on-disk store of loaded code systems.
#[derive(Debug, Clone)]
pub struct TerminologyStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl TerminologyStore {
    /// Opens (creating if needed) the store directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(TerminologyStore { dir })
    }

    fn check_id(id: &str) -> Result<(), StoreError> {
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(StoreError::BadId(id.to_string()));
        }
        Ok(())
    }

    pub fn snapshot_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.snapshot.json.gz"))
    }

    /// Writes `table` as the snapshot of `id`, atomically replacing any previous one.
    pub fn save(&self, id: &str, table: &ConceptTable) -> Result<(), StoreError> {
        Self::check_id(id)?;
        crate::tabular::progress(&format!("writing the {id} snapshot"));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = self
            .dir
            .join(format!(".tmp-{id}-{}-{nanos}", std::process::id()));
        let result = (|| {
            let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            let mut gz = flate2::write::GzEncoder::new(
                std::io::BufWriter::new(f),
                flate2::Compression::fast(),
            );
            {
                // serde_json writes many small pieces: buffer them before the compressor
                let mut buf = std::io::BufWriter::with_capacity(1 << 20, &mut gz);
                serde_json::to_writer(&mut buf, table).map_err(|e| StoreError::Format {
                    path: tmp.display().to_string(),
                    message: e.to_string(),
                })?;
                buf.flush().map_err(io(&tmp))?;
            }
            let mut w = gz.finish().map_err(io(&tmp))?;
            w.flush().map_err(io(&tmp))?;
            let f = w.into_inner().map_err(|e| StoreError::Io {
                path: tmp.display().to_string(),
                source: e.into_error(),
            })?;
            f.sync_all().map_err(io(&tmp))?;
            let dest = self.snapshot_path(id);
            std::fs::rename(&tmp, &dest).map_err(io(&dest))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Reads the snapshot of `id`; `Ok(None)` when none was saved.
    pub fn load(&self, id: &str) -> Result<Option<ConceptTable>, StoreError> {
        Self::check_id(id)?;
        let path = self.snapshot_path(id);
        if !path.exists() {
            return Ok(None);
        }
        let f = std::fs::File::open(&path).map_err(io(&path))?;
        // streamed: the decompressed JSON of a SNOMED CT snapshot is never held as one string
        let reader = std::io::BufReader::with_capacity(
            1 << 20,
            flate2::read::GzDecoder::new(std::io::BufReader::new(f)),
        );
        let mut t: ConceptTable =
            serde_json::from_reader(reader).map_err(|e| StoreError::Format {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        t.reindex();
        // the IS-A reachability labels are built here, not on the first `$subsumes`
        t.reachability();
        Ok(Some(t))
    }

    /// Ids of the saved snapshots.
    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let e = e.map_err(io(&self.dir))?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(id) = name.strip_suffix(".snapshot.json.gz") {
                out.push(id.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Saves a FHIR resource (e.g. a large ConceptMap such as the GEM) atomically as `id`.
    pub fn save_resource(&self, id: &str, resource: &serde_json::Value) -> Result<(), StoreError> {
        Self::check_id(id)?;
        let tmp = self
            .dir
            .join(format!(".tmp-{id}-{}.res", std::process::id()));
        let result = (|| {
            let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            let mut gz = flate2::write::GzEncoder::new(
                std::io::BufWriter::new(f),
                flate2::Compression::fast(),
            );
            {
                let mut buf = std::io::BufWriter::with_capacity(1 << 20, &mut gz);
                serde_json::to_writer(&mut buf, resource).map_err(|e| StoreError::Format {
                    path: tmp.display().to_string(),
                    message: e.to_string(),
                })?;
                buf.flush().map_err(io(&tmp))?;
            }
            let mut w = gz.finish().map_err(io(&tmp))?;
            w.flush().map_err(io(&tmp))?;
            drop(w);
            let dest = self.dir.join(format!("{id}.resource.json.gz"));
            std::fs::rename(&tmp, &dest).map_err(io(&dest))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Reads a resource saved with `save_resource`.
    pub fn load_resource(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        Self::check_id(id)?;
        let path = self.dir.join(format!("{id}.resource.json.gz"));
        if !path.exists() {
            return Ok(None);
        }
        let f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut s = String::new();
        flate2::read::GzDecoder::new(std::io::BufReader::new(f))
            .read_to_string(&mut s)
            .map_err(io(&path))?;
        serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| StoreError::Format {
                path: path.display().to_string(),
                message: e.to_string(),
            })
    }

    /// Loads the ICD-10-CM → ICD-9-CM GEM CSV and saves it as the `icd10cm-gem` ConceptMap.
    pub fn import_gem(&self, path: &Path) -> Result<serde_json::Value, StoreError> {
        let cm = crate::gem::load_gem_file(path).map_err(|e| StoreError::Load(e.to_string()))?;
        self.save_resource("icd10cm-gem", &cm)?;
        Ok(cm)
    }

    /// Loads a LOINC release directory and saves it as `loinc`.
    pub fn import_loinc(
        &self,
        dir: &Path,
        version: Option<&str>,
    ) -> Result<ConceptTable, StoreError> {
        let t = crate::loinc::load_loinc_dir(dir, version)
            .map_err(|e| StoreError::Load(e.to_string()))?;
        self.save("loinc", &t)?;
        Ok(t)
    }

    /// Loads a SNOMED CT RF2 release directory and saves it as `snomed`.
    pub fn import_snomed(
        &self,
        dir: &Path,
        version: Option<&str>,
    ) -> Result<ConceptTable, StoreError> {
        let t = crate::snomed::load_rf2_dir(dir, version)
            .map_err(|e| StoreError::Load(e.to_string()))?;
        self.save("snomed", &t)?;
        Ok(t)
    }

    /// Builds (atomically replacing) the full-text index of `id` in `<dir>/<id>.index`.
    #[cfg(feature = "text-index")]
    pub fn build_text_index(
        &self,
        id: &str,
        table: &ConceptTable,
    ) -> Result<crate::text_index::TextIndex, StoreError> {
        Self::check_id(id)?;
        crate::text_index::TextIndex::build(&self.dir.join(format!("{id}.index")), table)
            .map_err(StoreError::Load)
    }

    /// Opens the full-text index of `id`.
    #[cfg(feature = "text-index")]
    pub fn open_text_index(&self, id: &str) -> Result<crate::text_index::TextIndex, StoreError> {
        Self::check_id(id)?;
        crate::text_index::TextIndex::open(&self.dir.join(format!("{id}.index")))
            .map_err(StoreError::Load)
    }

    /// Checks a `ucum-essence.xml` (grammar of the file, every unit resolves to base units) and
    /// saves it as the store's UCUM table (`ucum-essence.xml.gz`, replaced atomically), which
    /// the server installs at start-up instead of the vendored UCUM 2.2. Returns the parsed
    /// essence.
    pub fn import_ucum(&self, path: &Path) -> Result<crate::ucum::essence::Essence, StoreError> {
        let xml = crate::tabular::read_file(path).map_err(|e| StoreError::Load(e.to_string()))?;
        let essence = crate::ucum::essence::parse_named(&xml, &path.display().to_string())
            .map_err(|e| StoreError::Load(e.to_string()))?;
        crate::ucum::Ucum::new(essence.clone())
            .map_err(|e| StoreError::Load(format!("{}: {e}", path.display())))?;
        crate::tabular::progress(&format!(
            "UCUM {}: {} prefixes, {} units resolved",
            essence.version,
            essence.prefixes.len(),
            essence.units.len()
        ));
        let dest = self.ucum_path();
        let tmp = self
            .dir
            .join(format!(".tmp-ucum-{}.xml.gz", std::process::id()));
        let result = (|| {
            let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
            gz.write_all(xml.as_bytes()).map_err(io(&tmp))?;
            let f = gz.finish().map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, &dest).map_err(io(&dest))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|_| essence)
    }

    fn ucum_path(&self) -> PathBuf {
        self.dir.join("ucum-essence.xml.gz")
    }

    /// The UCUM essence saved by `import_ucum`, if any.
    pub fn load_ucum(&self) -> Result<Option<crate::ucum::essence::Essence>, StoreError> {
        let path = self.ucum_path();
        if !path.exists() {
            return Ok(None);
        }
        let f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut xml = String::new();
        flate2::read::GzDecoder::new(std::io::BufReader::new(f))
            .read_to_string(&mut xml)
            .map_err(io(&path))?;
        crate::ucum::essence::parse_named(&xml, &path.display().to_string())
            .map(Some)
            .map_err(|e| StoreError::Load(e.to_string()))
    }

    /// Loads an ICD-10-CM tabular XML file and saves it as `icd10cm`
    /// (what `kiln terminology load icd10cm <path>` runs). On a parse error nothing is replaced.
    pub fn import_icd10cm(&self, path: &Path) -> Result<ConceptTable, StoreError> {
        let t =
            crate::icd10cm::load_tabular_file(path).map_err(|e| StoreError::Load(e.to_string()))?;
        self.save("icd10cm", &t)?;
        Ok(t)
    }
}

/// A one-line summary of a loaded code system for `kiln terminology load`.
pub fn summary(t: &ConceptTable) -> String {
    let inactive = t.concepts.iter().filter(|c| c.inactive).count();
    let designations: usize = t.concepts.iter().map(|c| c.designations.len()).sum();
    let links: usize = t.concepts.iter().map(|c| c.parents.len()).sum();
    let members: usize = t.sets.values().map(Vec::len).sum();
    let mut s = format!(
        "{} {}: {} concepts ({} inactive), {} designations, {} is-a links",
        t.name.as_deref().unwrap_or(&t.url),
        t.version.as_deref().unwrap_or("(no version)"),
        t.concepts.len(),
        inactive,
        designations,
        links
    );
    if !t.sets.is_empty() {
        s.push_str(&format!(
            ", {} member sets ({members} members)",
            t.sets.len()
        ));
    }
    if !t.attributes.is_empty() {
        s.push_str(&format!(", {} attribute relationships", t.attributes.len()));
    }
    if !t.resources.is_empty() {
        s.push_str(&format!(", {} concept maps", t.resources.len()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{CodeSystemProvider, Concept};

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-tx-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ucum_import_checks_the_file_and_keeps_the_previous_one() {
        let dir = tmpdir("ucum");
        let store = TerminologyStore::open(&dir).unwrap();
        assert!(store.load_ucum().unwrap().is_none());
        let mut xml = String::new();
        flate2::read::GzDecoder::new(
            &include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/data/ucum-essence.xml.gz"
            ))[..],
        )
        .read_to_string(&mut xml)
        .unwrap();
        let good = dir.join("ucum-essence.xml");
        std::fs::write(&good, &xml).unwrap();
        let e = store.import_ucum(&good).unwrap();
        assert_eq!(e.version, "2.2");
        assert!(e.units.len() > 300);
        // a unit value that is not a number: file, line and column
        let bad_xml = xml.replacen("value=\"1e3\"", "value=\"1eX\"", 1);
        assert_ne!(bad_xml, xml);
        let bad = dir.join("bad-essence.xml");
        std::fs::write(&bad, &bad_xml).unwrap();
        let err = store.import_ucum(&bad).unwrap_err().to_string();
        let at = bad_xml.find("value=\"1eX\"").unwrap();
        let (line, _) = crate::tabular::line_col(&bad_xml, at);
        assert!(err.contains(&format!("bad-essence.xml:{line}:")), "{err}");
        assert!(err.contains("value=\"1eX\" is not a number"), "{err}");
        // a unit defined in terms of an unknown unit does not resolve
        let unresolved = xml.replacen("Unit=\"dm3\"", "Unit=\"dmX3\"", 1);
        assert_ne!(unresolved, xml);
        std::fs::write(&bad, &unresolved).unwrap();
        let err = store.import_ucum(&bad).unwrap_err().to_string();
        assert!(err.contains("failed to resolve"), "{err}");
        // not UCUM at all
        std::fs::write(&bad, "<html>\n<body/></html>").unwrap();
        let err = store.import_ucum(&bad).unwrap_err().to_string();
        assert!(err.contains("no <root> element"), "{err}");
        // the good file is still the saved one
        assert_eq!(
            store.load_ucum().unwrap().unwrap().units.len(),
            e.units.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn save_load_roundtrip_and_failed_import_keeps_previous() {
        let dir = tmpdir("rt");
        let store = TerminologyStore::open(&dir).unwrap();
        let mut t = ConceptTable::new("http://hl7.org/fhir/sid/icd-10-cm", Some("v1".into()));
        let a = t.add(Concept::new("A00", Some("Cholera".into())));
        let b = t.add(Concept::new("A00.0", Some("Cholera classical".into())));
        t.link(a, b);
        store.save("icd10cm", &t).unwrap();
        assert_eq!(store.list().unwrap(), vec!["icd10cm"]);
        let l = store.load("icd10cm").unwrap().unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l.children("A00"), vec!["A00.0"]);
        // a broken file does not replace the snapshot
        let bad = dir.join("bad.xml");
        std::fs::write(&bad, "<ICD10CM.tabular><chapter>").unwrap();
        assert!(store.import_icd10cm(&bad).is_err());
        let l = store.load("icd10cm").unwrap().unwrap();
        assert_eq!(l.version.as_deref(), Some("v1"));
        assert!(store.load("none").unwrap().is_none());
        assert!(store.save("../x", &t).is_err());
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
