//! Shared server state: the store, the advertised base URL, settings and registries.

use std::sync::Arc;

use kiln_store::Store;

use crate::operations::OperationRegistry;
use crate::search::SearchEngine;

/// Behaviour switches an operator can set.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `PUT` of a resource that does not exist creates it (client-assigned id).
    pub update_create: bool,
    /// Largest accepted request body, bytes (413 above).
    pub max_body_bytes: usize,
    pub default_page_size: usize,
    pub max_page_size: usize,
    /// Most resources one conditional delete may remove (412 above).
    pub max_conditional_delete: usize,
    /// Where `kiln terminology load` saved large code systems (`<data-dir>/terminology`); on
    /// PostgreSQL the database's loaded code systems are read too (and win), and this
    /// directory also holds the node's text index cache (`db-cache/`).
    pub terminology_dir: Option<std::path::PathBuf>,
    /// Store the vendored R4/THO CodeSystems, ValueSets and ConceptMaps as resources when the
    /// server starts (once per bundle; see `canonical`). On for `kiln serve`; off in
    /// `Settings::default()` so test servers and `kiln import` do not pay for it.
    pub load_canonical_terminology: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            update_create: true,
            max_body_bytes: 64 * 1024 * 1024,
            default_page_size: 50,
            max_page_size: 1000,
            max_conditional_delete: 1000,
            terminology_dir: None,
            load_canonical_terminology: false,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Inner>,
}

pub struct Inner {
    pub store: Store,
    /// The FHIR base as clients see it, without a trailing slash (`http://127.0.0.1:8080/fhir`).
    pub base_url: String,
    pub settings: Settings,
    pub search: SearchEngine,
    pub operations: OperationRegistry,
    pub terminology: Arc<crate::terminology::TerminologyService>,
    /// Required-binding verdicts of the terminology service (write-time validation).
    pub binding_cache: crate::validation::BindingCache,
    /// The SMART authorization server, when `--auth on`.
    pub auth: Option<kiln_smart_auth::AuthState>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl AppState {
    pub fn new(store: Store, base_url: String, settings: Settings) -> AppState {
        Self::with_auth(store, base_url, settings, None)
    }

    pub fn with_auth(
        store: Store,
        base_url: String,
        settings: Settings,
        auth: Option<kiln_smart_auth::AuthState>,
    ) -> AppState {
        let search = SearchEngine::new();
        store.set_indexer(search.indexer());
        let base_url = base_url.trim_end_matches('/').to_string();
        // on PostgreSQL the loaded code systems live in the database, shared by every node
        let loaded_in_database =
            (store.dialect() == kiln_store::Dialect::Postgres).then(|| store.clone());
        let terminology = Arc::new(crate::terminology::TerminologyService::with_sources(
            settings.terminology_dir.clone(),
            loaded_in_database,
            crate::terminology::RELOAD_POLL,
        ));
        search.set_terminology(terminology.clone(), base_url.clone());
        // the pickers of a standalone launch search through this state's engine
        let inner = Arc::new_cyclic(|weak| Inner {
            search,
            store,
            base_url,
            terminology,
            binding_cache: Default::default(),
            settings,
            operations: crate::operations::registry(),
            auth: auth.map(|a| {
                a.with_patient_directory(Arc::new(crate::patient_directory::SearchDirectory(
                    weak.clone(),
                )))
            }),
        });
        AppState { inner }
    }
}
