//! `kiln-server`: the HTTP layer of Kiln (axum) and the `kiln` command line. Thin handlers over
//! the interactions; every error is an OperationOutcome.

pub mod auth;
pub mod canonical;
pub mod config;
pub mod error;
pub mod format;
pub mod import;
pub mod interactions;
pub mod operations;
pub mod patient_directory;
pub mod routes;
pub mod search;
pub mod state;
pub mod terminology;
pub mod validation;

use std::future::Future;

use kiln_store::{Store, StoreConfig};

pub use state::{AppState, Settings};

/// Opens the store with every schema Kiln layers on it (search indexes).
pub async fn open_store(config: &StoreConfig) -> anyhow::Result<Store> {
    let hook: kiln_store::SchemaHook = std::sync::Arc::new(|d| {
        let mut stmts = search::schema(d);
        stmts.extend(canonical::schema(d));
        stmts
    });
    Store::open(config, Some(hook))
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store: {e}"))
}

/// The SMART authorization server over the store's database (`auth_*` tables).
/// [`AppState::with_auth`] plugs the search engine in as the pickers' directory.
pub async fn open_auth(
    store: &Store,
    config: kiln_smart_auth::SmartConfig,
) -> anyhow::Result<kiln_smart_auth::AuthState> {
    let pool = match store.pool_handle() {
        kiln_store::PoolHandle::Sqlite(p) => kiln_smart_auth::AnyAuthPool::Sqlite(p),
        kiln_store::PoolHandle::Postgres(p) => kiln_smart_auth::AnyAuthPool::Postgres(p),
    };
    let auth_store = kiln_smart_auth::SqlAuthStore::new(pool);
    auth_store
        .migrate()
        .await
        .map_err(|e| anyhow::anyhow!("cannot prepare the auth tables: {e}"))?;
    let auth = kiln_smart_auth::AuthState::new(config, std::sync::Arc::new(auth_store))
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the authorization server: {e}"))?;
    Ok(auth)
}

/// Serves the FHIR API on `listener` until `shutdown` resolves; in-flight requests finish first.
/// With [`Settings::load_canonical_terminology`], the vendored terminology resources are stored
/// first (once per bundle: see [`canonical`]); connections wait in the listener's backlog
/// meanwhile, and a failure to store them is returned (the server does not start without them).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if state.settings.load_canonical_terminology {
        canonical::ensure_loaded(&state).await.map_err(|e| {
            std::io::Error::other(format!(
                "cannot store the canonical terminology resources: {e:#}"
            ))
        })?;
    }
    // custom SearchParameters stored earlier (or by another node) join the registry now, and
    // are polled for so that every node sharing a database converges
    if let Err(e) = state.search.refresh_custom_parameters(&state.store).await {
        tracing::warn!("cannot load custom search parameters: {:?}", e.issues);
    }
    let weak = std::sync::Arc::downgrade(&state.inner);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(search::CUSTOM_PARAMETER_POLL).await;
            let Some(inner) = weak.upgrade() else { break };
            let _ = inner.search.refresh_custom_parameters(&inner.store).await;
        }
    });
    // `$reindex` jobs interrupted by a crash or stop (of this node or another) are resumed
    let weak = std::sync::Arc::downgrade(&state.inner);
    tokio::spawn(async move {
        loop {
            let Some(inner) = weak.upgrade() else { break };
            let st = AppState { inner };
            if let Err(e) = operations::resume_reindex_jobs(&st).await {
                tracing::warn!("cannot look for interrupted $reindex jobs: {:?}", e.issues);
            }
            drop(st);
            tokio::time::sleep(operations::REINDEX_RESUME_POLL).await;
        }
    });
    let app = routes::router(state);
    // TCP_NODELAY: a response sent in parts (`Body::StoredJsonParts`) ends with a small
    // segment that Nagle's algorithm would hold until the client acknowledges the data before
    // it, which a client's delayed ACK can stretch to tens of milliseconds
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Starts a server on an ephemeral loopback port (tests and benchmarks). Returns the base URL
/// and a handle that stops it.
pub async fn spawn_for_tests(
    config: &StoreConfig,
) -> anyhow::Result<(String, AppState, tokio::sync::oneshot::Sender<()>)> {
    let store = open_store(config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}/fhir");
    let state = AppState::new(store, base.clone(), Settings::default());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    tokio::spawn(async move {
        let _ = serve(listener, st, async move {
            let _ = rx.await;
        })
        .await;
    });
    Ok((base, state, tx))
}
