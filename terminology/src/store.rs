//! Persistence of large loaded code systems: one gzip'd serde snapshot file per system in a data
//! directory chosen by the caller. Saving is atomic: the snapshot is written to a temporary file
//! in the same directory and renamed over the previous one, so a failed load leaves the previous
//! version in place.
//!
//! The bytes of a snapshot (gzip'd JSON of a `ConceptTable`, of a resource, or the UCUM essence
//! XML) are also what the database keeps for a code system loaded into PostgreSQL
//! (`kiln terminology load … --database postgres://…`, kiln-store's `terminology_*` tables):
//! [`parse_release`] reads a release into a [`Release`], [`Release::encode`] gives those bytes,
//! and [`decode_snapshot`], [`decode_resource`] and [`decode_ucum`] read them back.

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
        read_snapshot(std::io::BufReader::new(f), &path.display().to_string()).map(Some)
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
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        decode_resource(&bytes, &path.display().to_string()).map(Some)
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
        let (essence, xml) = parse_ucum(path)?;
        self.save_ucum_xml(&xml)?;
        Ok(essence)
    }

    fn save_ucum_xml(&self, xml: &str) -> Result<(), StoreError> {
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
        result
    }

    /// Saves a parsed release (what `kiln terminology load` does with a file store); the
    /// previous version of the same item stays in place when this fails.
    pub fn save_release(&self, release: &Release) -> Result<(), StoreError> {
        match release {
            Release::CodeSystem { id, table } => self.save(id, table),
            Release::Resource { id, resource } => self.save_resource(id, resource),
            Release::Ucum { xml, .. } => self.save_ucum_xml(xml),
        }
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
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        decode_ucum(&bytes, &path.display().to_string()).map(Some)
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

/// What a store keeps of a code system (`ConceptTable` snapshot).
pub const KIND_CODE_SYSTEM: &str = "code-system";
/// What a store keeps of a companion FHIR resource (the GEM ConceptMap).
pub const KIND_RESOURCE: &str = "resource";
/// What a store keeps of a UCUM essence (its XML).
pub const KIND_UCUM: &str = "ucum";

/// The systems `kiln terminology load` knows, as `<system>` names.
pub const SYSTEMS: &str = "icd10cm, loinc, snomed, ucum, icd10cm-gem";

/// A release read by [`parse_release`]: complete and checked, ready to be saved in a directory
/// ([`TerminologyStore::save_release`]) or a database ([`Release::encode`]).
#[derive(Debug)]
// one value per load, moved once: boxing the table would buy nothing
#[allow(clippy::large_enum_variant)]
pub enum Release {
    /// A code system (`icd10cm`, `loinc`, `snomed`).
    CodeSystem { id: String, table: ConceptTable },
    /// A FHIR resource (`icd10cm-gem`: the GEM ConceptMap).
    Resource {
        id: String,
        resource: serde_json::Value,
    },
    /// A UCUM essence (every unit resolved) and its XML text.
    Ucum {
        essence: crate::ucum::essence::Essence,
        xml: String,
    },
}

impl Release {
    /// The store id of the item (`icd10cm`, `loinc`, `snomed`, `icd10cm-gem`, `ucum`).
    pub fn id(&self) -> &str {
        match self {
            Release::CodeSystem { id, .. } | Release::Resource { id, .. } => id,
            Release::Ucum { .. } => "ucum",
        }
    }

    /// [`KIND_CODE_SYSTEM`], [`KIND_RESOURCE`] or [`KIND_UCUM`].
    pub fn kind(&self) -> &'static str {
        match self {
            Release::CodeSystem { .. } => KIND_CODE_SYSTEM,
            Release::Resource { .. } => KIND_RESOURCE,
            Release::Ucum { .. } => KIND_UCUM,
        }
    }

    /// Canonical URL of the content.
    pub fn url(&self) -> Option<String> {
        match self {
            Release::CodeSystem { table, .. } => Some(table.url.clone()),
            Release::Resource { resource, .. } => resource["url"].as_str().map(str::to_string),
            Release::Ucum { .. } => Some("http://unitsofmeasure.org".to_string()),
        }
    }

    /// Version of the content, when it has one.
    pub fn version(&self) -> Option<String> {
        match self {
            Release::CodeSystem { table, .. } => table.version.clone(),
            Release::Resource { resource, .. } => resource["version"].as_str().map(str::to_string),
            Release::Ucum { essence, .. } => Some(essence.version.clone()),
        }
    }

    /// The one-line summary `kiln terminology load` prints.
    pub fn summary(&self) -> String {
        match self {
            Release::CodeSystem { table, .. } => summary(table),
            Release::Resource { resource, .. } => {
                let n: usize = resource["group"]
                    .as_array()
                    .map(|g| {
                        g.iter()
                            .map(|x| x["element"].as_array().map_or(0, Vec::len))
                            .sum()
                    })
                    .unwrap_or(0);
                format!(
                    "{}: {n} source codes",
                    resource["title"]
                        .as_str()
                        .or(resource["name"].as_str())
                        .unwrap_or("ConceptMap")
                )
            }
            Release::Ucum { essence, .. } => format!(
                "UCUM {} ({}): {} prefixes, {} units",
                essence.version,
                essence.revision_date,
                essence.prefixes.len(),
                essence.units.len()
            ),
        }
    }

    /// The bytes a store keeps for this release: exactly the content of its snapshot file
    /// (gzip'd JSON of the `ConceptTable` or resource, gzip'd UCUM XML).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let name = self.id().to_string();
        let fail = |e: std::io::Error| StoreError::Io {
            path: name.clone(),
            source: e,
        };
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        match self {
            Release::CodeSystem { table, .. } => {
                let mut buf = std::io::BufWriter::with_capacity(1 << 20, &mut gz);
                serde_json::to_writer(&mut buf, table).map_err(|e| StoreError::Format {
                    path: name.clone(),
                    message: e.to_string(),
                })?;
                buf.flush().map_err(fail)?;
            }
            Release::Resource { resource, .. } => {
                serde_json::to_writer(&mut gz, resource).map_err(|e| StoreError::Format {
                    path: name.clone(),
                    message: e.to_string(),
                })?;
            }
            Release::Ucum { xml, .. } => gz.write_all(xml.as_bytes()).map_err(fail)?,
        }
        gz.finish().map_err(fail)
    }
}

/// Reads a release of `system` (`icd10cm`, `loinc`, `snomed`, `ucum`, `icd10cm-gem`/`gem`) from
/// `path`: the whole release is parsed and checked before anything is saved, and a malformed
/// file is an error naming `file:line:column`.
pub fn parse_release(
    system: &str,
    path: &Path,
    version: Option<&str>,
) -> Result<Release, StoreError> {
    let load = |e: &dyn std::fmt::Display| StoreError::Load(e.to_string());
    Ok(match system {
        "icd10cm" => Release::CodeSystem {
            id: "icd10cm".into(),
            table: crate::icd10cm::load_tabular_file(path).map_err(|e| load(&e))?,
        },
        "loinc" => Release::CodeSystem {
            id: "loinc".into(),
            table: crate::loinc::load_loinc_dir(path, version).map_err(|e| load(&e))?,
        },
        "snomed" => Release::CodeSystem {
            id: "snomed".into(),
            table: crate::snomed::load_rf2_dir(path, version).map_err(|e| load(&e))?,
        },
        "icd10cm-gem" | "gem" => Release::Resource {
            id: "icd10cm-gem".into(),
            resource: crate::gem::load_gem_file(path).map_err(|e| load(&e))?,
        },
        "ucum" => {
            let (essence, xml) = parse_ucum(path)?;
            Release::Ucum { essence, xml }
        }
        other => {
            return Err(StoreError::Load(format!(
                "unknown system `{other}`: {SYSTEMS}"
            )))
        }
    })
}

/// Reads and checks a `ucum-essence.xml` (grammar of the file, every unit resolves to base
/// units).
fn parse_ucum(path: &Path) -> Result<(crate::ucum::essence::Essence, String), StoreError> {
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
    Ok((essence, xml))
}

/// Reads a gzip'd `ConceptTable` snapshot (streamed: the decompressed JSON of a SNOMED CT
/// snapshot is never held as one string) and prepares it for use (indexes, IS-A reachability
/// labels).
fn read_snapshot(r: impl Read, name: &str) -> Result<ConceptTable, StoreError> {
    let reader = std::io::BufReader::with_capacity(1 << 20, flate2::read::GzDecoder::new(r));
    let mut t: ConceptTable = serde_json::from_reader(reader).map_err(|e| StoreError::Format {
        path: name.to_string(),
        message: e.to_string(),
    })?;
    t.reindex();
    // the IS-A reachability labels are built here, not on the first `$subsumes`
    t.reachability();
    Ok(t)
}

/// Decodes the bytes of a [`KIND_CODE_SYSTEM`] item (`name` is used in errors).
pub fn decode_snapshot(bytes: &[u8], name: &str) -> Result<ConceptTable, StoreError> {
    read_snapshot(bytes, name)
}

/// Decodes the bytes of a [`KIND_RESOURCE`] item.
pub fn decode_resource(bytes: &[u8], name: &str) -> Result<serde_json::Value, StoreError> {
    let mut s = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut s)
        .map_err(|e| StoreError::Io {
            path: name.to_string(),
            source: e,
        })?;
    serde_json::from_str(&s).map_err(|e| StoreError::Format {
        path: name.to_string(),
        message: e.to_string(),
    })
}

/// Decodes the bytes of a [`KIND_UCUM`] item.
pub fn decode_ucum(bytes: &[u8], name: &str) -> Result<crate::ucum::essence::Essence, StoreError> {
    let mut xml = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut xml)
        .map_err(|e| StoreError::Io {
            path: name.to_string(),
            source: e,
        })?;
    crate::ucum::essence::parse_named(&xml, name).map_err(|e| StoreError::Load(e.to_string()))
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
