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
