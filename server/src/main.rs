//! The `kiln` binary: `serve`, `import`, `fhirpath`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_server::config::{FileConfig, ServeArgs, StoreArgs, DEFAULT_LISTEN};
use kiln_server::{AppState, Settings};

// The server allocates many short-lived JSON trees per request; mimalloc beats glibc malloc
// there (glibc's malloc/free were ~12 % of ingest CPU in profiles, docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` says
/// otherwise. mimalloc advises its memory for huge pages, and a response's buffers, freed and
/// purged after 10 ms, then come back as fresh 2 MiB pages the kernel zeroes on the first
/// touch: `clear_page_erms` was 9 % of the server's CPU under `_revinclude` (1.35 MB
/// responses), and the server held 540 MB of huge pages after 10 s of it (docs/BENCHMARKS.md
/// run O). This is the `prctl` mimalloc itself makes with `MIMALLOC_ALLOW_THP=0`.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
            eprintln!("kiln: could not turn transparent huge pages off: {e}");
        }
    }
}

#[derive(Parser)]
#[command(name = "kiln", version, about = "Kiln: a FHIR R4 server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the FHIR server.
    Serve(ServeArgs),
    /// Load FHIR Bundles (transaction, batch, collection), single resources and NDJSON files or
    /// directories into the store.
    Import {
        /// Files or directories (*.json, *.ndjson, *.xml).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Manage user accounts of the SMART authorization server.
    Users {
        #[command(subcommand)]
        action: UsersAction,
    },
    /// Manage OAuth clients (SMART apps, backend services).
    Clients {
        #[command(subcommand)]
        action: ClientsAction,
    },
    /// Load a code system release (icd10cm, loinc, snomed, ucum, icd10cm-gem) into the terminology
    /// store: the database with `--database postgres://…` (shared by every node), else
    /// <data-dir>/terminology.
    Terminology {
        #[command(subcommand)]
        action: TerminologyAction,
    },
    /// Evaluate a FHIRPath expression and print the result collection as a JSON array.
    Fhirpath {
        /// The resource to evaluate against (JSON); stdin if absent.
        #[arg(long)]
        input: Option<PathBuf>,
        expression: String,
    },
}

#[derive(Subcommand)]
enum TerminologyAction {
    /// `kiln terminology load <system> <path>`: icd10cm (CMS tabular XML), loinc (release
    /// directory), snomed (RF2 snapshot directory), ucum (ucum-essence.xml; UCUM 2.2 is built
    /// in), icd10cm-gem (GEM CSV). Saved in the PostgreSQL database when the store is one
    /// (`--database`/`--config`), else under <data-dir>/terminology. A failed or interrupted
    /// load leaves the previous version in place.
    Load {
        system: String,
        path: PathBuf,
        /// Version label (LOINC, SNOMED CT).
        #[arg(long)]
        version: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum UsersAction {
    /// Add a user (prints the user id).
    Add {
        #[arg(long)]
        username: String,
        #[arg(long)]
        password: String,
        /// The FHIR resource the user is, e.g. `Patient/123` or `Practitioner/abc`.
        #[arg(long)]
        fhir_user: Option<String>,
        /// Administrator (user management, EHR launch contexts).
        #[arg(long)]
        admin: bool,
        /// Patients the user may pick at a standalone launch (repeatable).
        #[arg(long = "patient")]
        patients: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum ClientsAction {
    /// Register a client; prints its client_id (and secret for confidential symmetric clients).
    Add {
        #[arg(long)]
        name: String,
        /// Allowed redirect URI (repeatable).
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// `none` (public, PKCE), `client_secret_basic` or `private_key_jwt`.
        #[arg(long, default_value = "none")]
        auth_method: String,
        /// JWKS (JSON) file for private_key_jwt clients.
        #[arg(long)]
        jwks_file: Option<PathBuf>,
        /// JWKS URL for private_key_jwt clients.
        #[arg(long)]
        jwks_uri: Option<String>,
        /// Scopes the client may ask for (space separated).
        #[arg(long)]
        scope: Option<String>,
        /// Grant types (repeatable): authorization_code, refresh_token, client_credentials.
        #[arg(long = "grant-type")]
        grant_types: Vec<String>,
        /// Fixed client id (generated when absent).
        #[arg(long)]
        client_id: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Fhirpath { input, expression } => fhirpath(input, &expression),
        Command::Serve(args) => run_async(serve(args)),
        Command::Users { action } => run_async(users(action)),
        Command::Terminology { action } => run_async(terminology(action)),
        Command::Clients { action } => run_async(clients(action)),
        Command::Import { paths, store } => run_async(async move {
            let file = FileConfig::load(store.config.as_ref())?;
            let st = kiln_server::open_store(&store.store_config(&file)).await?;
            let state = AppState::new(
                st.clone(),
                "http://localhost/fhir".into(),
                Settings::default(),
            );
            let summary = kiln_server::import::import_paths(&state, &paths, true).await;
            st.close().await;
            summary.print();
            if summary.failed() {
                anyhow::bail!("{} entries failed", summary.errors.len());
            }
            Ok(())
        }),
    }
}

fn run_async(f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The authorization server over the store named by `store` (CLI administration).
async fn admin_auth(
    store: &StoreArgs,
) -> anyhow::Result<(kiln_store::Store, kiln_smart_auth::AuthState)> {
    let file = FileConfig::load(store.config.as_ref())?;
    let st = kiln_server::open_store(&store.store_config(&file)).await?;
    let base = file
        .base_url
        .clone()
        .unwrap_or_else(|| format!("http://{DEFAULT_LISTEN}/fhir"));
    let auth = kiln_server::open_auth(&st, kiln_smart_auth::SmartConfig::new(base)).await?;
    Ok((st, auth))
}

/// Installs the UCUM table loaded with `kiln terminology load ucum` (if any: from the database
/// on PostgreSQL, else from the terminology directory) before anything uses UCUM, so quantity
/// search and unit validation use it instead of the vendored UCUM 2.2.
async fn install_loaded_ucum(
    dir: &std::path::Path,
    store: &kiln_store::Store,
) -> anyhow::Result<()> {
    let database = (store.dialect() == kiln_store::Dialect::Postgres).then_some(store);
    if let Some((essence, source)) =
        kiln_server::terminology::loaded_ucum(Some(dir), database).await?
    {
        let version = essence.version.clone();
        kiln_terminology::ucum::install(essence)
            .map_err(|e| anyhow::anyhow!("cannot install the loaded UCUM table: {e}"))?;
        tracing::info!(version = %version, from = %source, "loaded UCUM table installed");
    }
    Ok(())
}

async fn terminology(action: TerminologyAction) -> anyhow::Result<()> {
    let TerminologyAction::Load {
        system,
        path,
        version,
        store,
    } = action;
    let file = FileConfig::load(store.config.as_ref())?;
    let config = store.store_config(&file);
    // PostgreSQL: into the database, shared by every node; SQLite: snapshot files beside it
    let database = match config.database.as_deref() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Some(kiln_server::open_store(&config).await?)
        }
        _ => None,
    };
    let dir = config.data_dir.join("terminology");
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(format!("loading {system} from {}", path.display()));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let progress_bar = bar.clone();
    // one progress line per release file read (name, rows), above the spinner
    let sink = move |line: &str| {
        if progress_bar.is_hidden() {
            eprintln!("  {line}");
        } else {
            progress_bar.println(format!("  {line}"));
        }
    };
    let target = match &database {
        Some(st) => kiln_server::terminology::LoadTarget::Database(st),
        None => kiln_server::terminology::LoadTarget::Directory(&dir),
    };
    let result =
        kiln_server::terminology::load_release(target, &system, &path, version.as_deref(), sink)
            .await;
    bar.finish_and_clear();
    if let Some(st) = database {
        st.close().await;
    }
    let result = result?;
    println!(
        "{result}; loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn users(action: UsersAction) -> anyhow::Result<()> {
    match action {
        UsersAction::Add {
            username,
            password,
            fhir_user,
            admin,
            patients,
            store,
        } => {
            let (st, auth) = admin_auth(&store).await?;
            let user = kiln_smart_auth::add_user(
                auth.store(),
                kiln_smart_auth::NewUser {
                    username: username.clone(),
                    password,
                    fhir_user,
                    display_name: None,
                    admin,
                    patients,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot add user {username}: {e}"))?;
            println!("user {} added", user.username);
            st.close().await;
            Ok(())
        }
    }
}

async fn clients(action: ClientsAction) -> anyhow::Result<()> {
    match action {
        ClientsAction::Add {
            name,
            redirect_uris,
            auth_method,
            jwks_file,
            jwks_uri,
            scope,
            grant_types,
            client_id,
            store,
        } => {
            let method = match auth_method.as_str() {
                "none" => kiln_smart_auth::ClientAuthMethod::None,
                "client_secret_basic" | "client_secret_post" => {
                    kiln_smart_auth::ClientAuthMethod::ClientSecretBasic
                }
                "private_key_jwt" => kiln_smart_auth::ClientAuthMethod::PrivateKeyJwt,
                other => anyhow::bail!(
                    "unknown --auth-method `{other}`: none, client_secret_basic, private_key_jwt"
                ),
            };
            let jwks = match jwks_file {
                Some(p) => Some(serde_json::from_str(&std::fs::read_to_string(&p)?).map_err(
                    |e| anyhow::anyhow!("{} is not a JWKS JSON document: {e}", p.display()),
                )?),
                None => None,
            };
            let (st, auth) = admin_auth(&store).await?;
            let reg = kiln_smart_auth::add_client(
                auth.store(),
                kiln_smart_auth::NewClient {
                    client_id,
                    client_name: name,
                    redirect_uris,
                    auth_method: Some(method),
                    jwks,
                    jwks_uri,
                    scope,
                    grant_types,
                    launch_uri: None,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot add client: {e}"))?;
            println!("client_id: {}", reg.client.client_id);
            if let Some(secret) = reg.client_secret {
                println!("client_secret: {secret}");
            }
            st.close().await;
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = FileConfig::load(args.store.config.as_ref())?;
    let listen: SocketAddr = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("default listen address"));
    let base_url = args
        .base_url
        .clone()
        .or(file.base_url.clone())
        .unwrap_or_else(|| format!("http://{listen}/fhir"));
    let mut settings = Settings::default();
    if args.no_update_create || file.update_create == Some(false) {
        settings.update_create = false;
    }
    if let Some(b) = args.max_body_bytes.or(file.max_body_bytes) {
        settings.max_body_bytes = b;
    }
    settings.load_canonical_terminology =
        !args.no_canonical_terminology && file.load_canonical_terminology.unwrap_or(true);
    let store_config = args.store.store_config(&file);
    settings.terminology_dir = Some(store_config.data_dir.join("terminology"));
    let mode = kiln_server::auth::resolve_mode(args.auth, listen, args.insecure_no_auth)
        .map_err(|e| anyhow::anyhow!(e))?;
    let store = kiln_server::open_store(&store_config).await?;
    tracing::info!(store = %store.describe(), "store open");
    install_loaded_ucum(&store_config.data_dir.join("terminology"), &store).await?;
    let auth = match mode {
        kiln_server::auth::AuthMode::Off => {
            tracing::warn!(
                "authorization is OFF: every client on {listen} can read and write all data \
                 (use --auth on to require SMART tokens)"
            );
            None
        }
        kiln_server::auth::AuthMode::On => {
            let mut cfg = kiln_smart_auth::SmartConfig::new(base_url.clone());
            cfg.dynamic_registration = args
                .dynamic_registration
                .unwrap_or(listen.ip().is_loopback());
            Some(kiln_server::open_auth(&store, cfg).await?)
        }
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let state = AppState::with_auth(store.clone(), base_url.clone(), settings, auth);
    tracing::info!(%listen, base = %base_url, "Kiln FHIR server ready");
    kiln_server::serve(listener, state, shutdown_signal()).await?;
    tracing::info!("shutting down: closing the store");
    store.close().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("signal received: finishing in-flight requests");
}

fn fhirpath(input: Option<PathBuf>, expression: &str) -> ExitCode {
    let text = match input {
        Some(p) => {
            std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        }
        None => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map(|_| s)
                .map_err(|e| format!("cannot read stdin: {e}"))
        }
    };
    let outcome = |msg: String| {
        let oo = kiln_fhir::operation_outcome(&[kiln_fhir::Issue::error("invalid", msg)]);
        println!("{}", serde_json::to_string_pretty(&oo).unwrap_or_default());
        ExitCode::FAILURE
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => return outcome(e),
    };
    let resource: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => return outcome(format!("input is not JSON: {e}")),
        }
    };
    match kiln_fhirpath::eval_to_json_array(expression, &resource) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => outcome(format!("{e}")),
    }
}
