//! The terminology service inside the server: the R4 and THO code systems, value sets and concept
//! maps shipped with Kiln, the large code systems an operator loaded with
//! `kiln terminology load` (ICD-10-CM, LOINC, SNOMED CT, the ICD-10-CM→ICD-9-CM GEM), and the
//! CodeSystem/ValueSet/ConceptMap resources stored through the REST API. Built on first use, so
//! server start stays fast.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_terminology::{Terminology, TerminologyStore};
use tokio::sync::OnceCell;

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

/// Lazily built, shared terminology service.
pub struct TerminologyService {
    dir: Option<PathBuf>,
    cell: OnceCell<Arc<Terminology>>,
}

impl TerminologyService {
    pub fn new(dir: Option<PathBuf>) -> Self {
        TerminologyService {
            dir,
            cell: OnceCell::new(),
        }
    }

    pub async fn get(&self) -> Result<Arc<Terminology>, crate::error::FhirError> {
        let dir = self.dir.clone();
        self.cell
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || -> anyhow::Result<Arc<Terminology>> {
                    let mut tx = Terminology::with_r4_content().map_err(|e| {
                        anyhow::anyhow!("cannot load R4 terminology: {:?}", e.issues)
                    })?;
                    if let Some(d) = dir {
                        let n = load_saved_systems(&mut tx, &d)?;
                        tracing::info!(code_systems = n, dir = %d.display(), "terminology loaded");
                    }
                    Ok(Arc::new(tx))
                })
                .await
                .map_err(|e| anyhow::anyhow!("terminology loader failed: {e}"))?
            })
            .await
            .cloned()
            .map_err(|e| crate::error::FhirError::internal(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_terminology::{Concept, ConceptTable};
    use serde_json::json;

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
