//! `kiln-bench`: starts a `kiln serve` child process (the `kiln` binary next to this one) on a
//! loopback port and drives it over HTTP, printing one plain-text table per benchmark.
//!
//! Subcommands: `ingest` (Synthea transaction Bundles, N parallel clients), `read` (GET
//! Patient/{id}), `crud` (create/read/update/delete of Patient and Observation), `search` (the
//! fixed query mix of the search issue, plus index rows per resource and bytes on disk per byte
//! of JSON), `startup` (exec to first 200 on `/fhir/metadata`, idle RSS) and `all`.
//!
//! Every loop is bounded in time and count; only 127.0.0.1 is contacted (plus the PostgreSQL
//! maintenance URL the operator gives).

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use sqlx::{AssertSqlSafe, Connection};

const FHIR_JSON: &str = "application/fhir+json";
/// Hard cap on requests one load task may issue (every loop is bounded in count as well as time).
const MAX_REQUESTS_PER_TASK: usize = 5_000_000;

#[derive(Parser)]
#[command(
    name = "kiln-bench",
    about = "Benchmarks a release `kiln serve` over loopback"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Post every Synthea transaction Bundle with N parallel clients: resources/s.
    Ingest {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        data: DataArgs,
    },
    /// GET Patient/{id} by random ids (after an ingest when --dir is given, else 1,000 Patients).
    Read {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Ingest this directory first and read its Patients (default: create 1,000 Patients).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Create/read/update/delete of Patient and Observation: req/s and latency per operation.
    Crud {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// The fixed search mix on the ingested Synthea data, index rows and bytes on disk.
    Search {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Drive a server already running at this base URL (e.g. http://127.0.0.1:8080/fhir)
        /// holding the ingested data: no child process, no ingest, no storage figures.
        #[arg(long)]
        url: Option<String>,
        /// Run only the queries of the mix whose label contains this text (e.g. `_has`).
        #[arg(long)]
        only: Option<String>,
        /// With --url: the server's process id, for the server-CPU-per-request table (a
        /// server started by the bench is measured without it).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Exec of `kiln serve` to the first 200 on /fhir/metadata (median of N), idle RSS.
    Startup {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Everything on SQLite, then on PostgreSQL when --database / KILN_TEST_DATABASE_URL is set.
    All {
        #[command(flatten)]
        data: DataArgs,
        /// PostgreSQL maintenance URL (a database `kiln_bench_<random>` is created and dropped).
        #[arg(long, env = "KILN_TEST_DATABASE_URL")]
        database: Option<String>,
        /// The `kiln` binary (default: next to this executable).
        #[arg(long)]
        kiln: Option<PathBuf>,
        /// Scale every timed phase to this many seconds (default: 20 read/crud, 10 search).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

#[derive(Args, Clone)]
struct Target {
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    backend: Backend,
    /// PostgreSQL maintenance URL (a database `kiln_bench_<random>` is created and dropped).
    #[arg(long, env = "KILN_TEST_DATABASE_URL")]
    database: Option<String>,
    /// The `kiln` binary (default: next to this executable).
    #[arg(long)]
    kiln: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct DataArgs {
    /// Directory of Synthea transaction Bundles.
    #[arg(long, default_value = "../shared/synthea-r4")]
    dir: PathBuf,
    /// Parallel ingest clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Ingest { target, data } => {
            let server = Server::start(&target).await?;
            let r = ingest(&server, &data).await;
            server.stop().await;
            r.map(|_| ())
        }
        Cmd::Read {
            target,
            connections,
            seconds,
            dir,
        } => {
            let server = Server::start(&target).await?;
            let r = async {
                match dir {
                    Some(dir) => {
                        ingest(&server, &DataArgs { dir, clients: 4 }).await?;
                    }
                    None => create_patients(&server, 1000).await?,
                }
                read(&server, connections, seconds).await
            }
            .await;
            server.stop().await;
            r
        }
        Cmd::Crud {
            target,
            connections,
            seconds,
        } => {
            let server = Server::start(&target).await?;
            let r = crud(&server, connections, seconds).await;
            server.stop().await;
            r
        }
        Cmd::Search {
            url: Some(url),
            target,
            connections,
            seconds,
            only,
            pid,
            ..
        } => {
            let mut server = Server::attach(&target, &url)?;
            server.pid = pid;
            search(&server, connections, seconds, only.as_deref()).await
        }
        Cmd::Search {
            target,
            data,
            connections,
            seconds,
            url: None,
            only,
            pid: _,
        } => {
            let server = Server::start(&target).await?;
            let r = async {
                let json_bytes = ingest(&server, &data).await?;
                search(&server, connections, seconds, only.as_deref()).await?;
                storage(&server, json_bytes).await
            }
            .await;
            server.stop().await;
            r
        }
        Cmd::Startup { target, runs } => startup(&target, runs).await,
        Cmd::All {
            data,
            database,
            kiln,
            seconds,
        } => {
            let mut backends = vec![Backend::Sqlite];
            if database.is_some() {
                backends.push(Backend::Postgres);
            } else {
                println!("(PostgreSQL skipped: no --database / KILN_TEST_DATABASE_URL)");
            }
            for backend in backends {
                let target = Target {
                    backend,
                    database: database.clone(),
                    kiln: kiln.clone(),
                };
                println!("\n######## backend: {backend:?} ########");
                // Every phase runs even when an earlier one fails (its error is printed).
                let server = Server::start(&target).await?;
                let json_bytes = report(ingest(&server, &data).await).unwrap_or(0);
                report(storage(&server, json_bytes).await);
                report(search(&server, 32, seconds.unwrap_or(10), None).await);
                report(read(&server, 64, seconds.unwrap_or(20)).await);
                report(crud(&server, 32, seconds.unwrap_or(20)).await);
                server.stop().await;
                report(startup(&target, 5).await);
            }
            Ok(())
        }
    }
}

/// Prints a phase's error and goes on.
fn report<T>(r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            println!("\nPHASE FAILED: {e:#}");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server under test

/// A `kiln serve` child process with its own data directory or PostgreSQL database.
struct Server {
    /// `None` when attached to a server the operator runs (`search --url`).
    child: Option<Child>,
    /// The server's process id (the child's, or `search --pid`): its CPU time is read from
    /// `/proc`.
    pid: Option<u32>,
    base: String,
    client: reqwest::Client,
    backend: Backend,
    data_dir: tempfile::TempDir,
    /// (maintenance URL, database name, database URL) of the bench database.
    pg: Option<(String, String, String)>,
}

fn kiln_binary(target: &Target) -> Result<PathBuf> {
    if let Some(p) = &target.kiln {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("cannot locate kiln-bench")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("kiln-bench has no parent directory"))?;
    let p = dir.join("kiln");
    if !p.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p kiln-server --bins) or pass --kiln",
            p.display()
        );
    }
    Ok(p)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(l.local_addr()?.port())
}

fn http_client(connections: usize) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(connections.max(4))
        .timeout(Duration::from_secs(300))
        .build()
        .context("cannot build the HTTP client")
}

/// `postgres://u@h:p/db?x` → (`postgres://u@h:p/`, `?x`).
fn split_database_url(url: &str) -> Result<(String, String)> {
    let scheme_end = url
        .find("://")
        .ok_or_else(|| anyhow!("database URL without scheme: {url}"))?
        + 3;
    let (head, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let prefix = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i + 1],
        None => return Ok((format!("{head}/"), query.to_string())),
    };
    Ok((prefix.to_string(), query.to_string()))
}

async fn create_pg_database(maintenance: &str) -> Result<(String, String, String)> {
    let name = format!("kiln_bench_{:016x}", fastrand::u64(..));
    let mut conn = sqlx::PgConnection::connect(maintenance)
        .await
        .with_context(|| format!("cannot connect to {maintenance}"))?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .with_context(|| format!("cannot create database {name}"))?;
    let _ = conn.close().await;
    let (prefix, query) = split_database_url(maintenance)?;
    Ok((
        maintenance.to_string(),
        name.clone(),
        format!("{prefix}{name}{query}"),
    ))
}

async fn drop_pg_database(maintenance: &str, name: &str) {
    match sqlx::PgConnection::connect(maintenance).await {
        Ok(mut conn) => {
            let r = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await;
            if let Err(e) = r {
                eprintln!("warning: cannot drop database {name}: {e}");
            }
            let _ = conn.close().await;
        }
        Err(e) => eprintln!("warning: cannot drop database {name}: {e}"),
    }
}

/// Spawns `kiln serve` and returns (child, base URL, time from exec to the first 200).
async fn spawn_kiln(
    kiln: &Path,
    data_dir: &Path,
    database: Option<&str>,
    client: &reqwest::Client,
) -> Result<(Child, String, Duration)> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let base = format!("http://{listen}/fhir");
    let mut cmd = Command::new(kiln);
    cmd.arg("serve")
        .arg("--listen")
        .arg(&listen)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .env_remove("KILN_DATABASE")
        .env_remove("KILN_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(db) = database {
        cmd.arg("--database").arg(db);
    }
    let log = std::fs::File::create(data_dir.join("kiln-serve.log"))?;
    cmd.stderr(Stdio::from(log));
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", kiln.display()))?;
    let metadata = format!("{base}/metadata");
    loop {
        if let Ok(r) = client.get(&metadata).send().await {
            if r.status().as_u16() == 200 {
                let _ = r.bytes().await;
                break;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(data_dir.join("kiln-serve.log")).unwrap_or_default();
            bail!("kiln serve exited with {status}: {log}");
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("kiln serve did not answer /metadata within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok((child, base, t0.elapsed()))
}

fn terminate(child: &mut Child) {
    // SIGTERM lets the server close the store cleanly (WAL checkpoint); SIGKILL after 30 s.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Server {
    async fn start(target: &Target) -> Result<Server> {
        let kiln = kiln_binary(target)?;
        let data_dir = tempfile::Builder::new()
            .prefix("kiln-bench-")
            .tempdir()
            .context("cannot create a temp data dir")?;
        let pg = match target.backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let maintenance = target.database.as_deref().ok_or_else(|| {
                    anyhow!("--backend postgres needs --database or KILN_TEST_DATABASE_URL")
                })?;
                Some(create_pg_database(maintenance).await?)
            }
        };
        let client = http_client(64)?;
        let spawned = spawn_kiln(
            &kiln,
            data_dir.path(),
            pg.as_ref().map(|p| p.2.as_str()),
            &client,
        )
        .await;
        match spawned {
            Ok((child, base, _)) => Ok(Server {
                pid: Some(child.id()),
                child: Some(child),
                base,
                client,
                backend: target.backend,
                data_dir,
                pg,
            }),
            Err(e) => {
                if let Some((m, name, _)) = &pg {
                    drop_pg_database(m, name).await;
                }
                Err(e)
            }
        }
    }

    /// A server the operator started (the data dir field is an unused empty temp dir).
    fn attach(target: &Target, url: &str) -> Result<Server> {
        Ok(Server {
            child: None,
            pid: None,
            base: url.trim_end_matches('/').to_string(),
            client: http_client(64)?,
            backend: target.backend,
            data_dir: tempfile::Builder::new()
                .prefix("kiln-bench-")
                .tempdir()
                .context("cannot create a temp dir")?,
            pg: None,
        })
    }

    async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            terminate(child);
        }
        if let Some((m, name, _)) = &self.pg {
            drop_pg_database(m, name).await;
        }
    }

    async fn get_json(&self, path_and_query: &str) -> Result<Value> {
        let url = format!("{}/{}", self.base, path_and_query);
        let r = self.client.get(&url).send().await?;
        let status = r.status();
        let body = r.bytes().await?;
        if !status.is_success() {
            bail!(
                "GET {path_and_query}: {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(400)])
            );
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// Latencies (µs) and error counts per operation name.
#[derive(Default)]
struct Stats {
    ops: BTreeMap<String, OpStats>,
}

#[derive(Default)]
struct OpStats {
    latencies_us: Vec<u32>,
    errors: usize,
    first_error: Option<String>,
}

impl Stats {
    fn record(&mut self, op: &str, started: Instant, ok: Result<(), String>) {
        let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        let s = self.ops.entry(op.to_string()).or_default();
        s.latencies_us.push(us);
        if let Err(e) = ok {
            s.errors += 1;
            if s.first_error.is_none() {
                s.first_error = Some(e);
            }
        }
    }

    fn merge(&mut self, other: Stats) {
        for (k, v) in other.ops {
            let s = self.ops.entry(k).or_default();
            s.latencies_us.extend(v.latencies_us);
            s.errors += v.errors;
            if s.first_error.is_none() {
                s.first_error = v.first_error;
            }
        }
    }

    /// Prints one row per operation and, when there are several, a row for all of them.
    fn print(&mut self, title: &str, elapsed: Duration, order: &[&str]) {
        let secs = elapsed.as_secs_f64().max(1e-9);
        println!("\n== {title} ({:.1} s) ==", secs);
        println!(
            "{:<58} {:>9} {:>10} {:>9} {:>9} {:>9} {:>7}",
            "operation", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors"
        );
        let mut names: Vec<String> = order
            .iter()
            .map(|s| s.to_string())
            .filter(|n| self.ops.contains_key(n))
            .collect();
        for k in self.ops.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
        let mut all = OpStats::default();
        for n in &names {
            if let Some(s) = self.ops.get_mut(n) {
                s.latencies_us.sort_unstable();
                print_row(n, s, secs);
                all.latencies_us.extend_from_slice(&s.latencies_us);
                all.errors += s.errors;
            }
        }
        if names.len() > 1 {
            all.latencies_us.sort_unstable();
            print_row("ALL (mix)", &all, secs);
        }
        for n in &names {
            if let Some(e) = self.ops.get(n).and_then(|s| s.first_error.as_ref()) {
                println!("  first error of {n}: {e}");
            }
        }
    }
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = (((sorted_us.len() - 1) as f64) * p).round() as usize;
    f64::from(sorted_us[idx.min(sorted_us.len() - 1)]) / 1000.0
}

fn print_row(name: &str, s: &OpStats, secs: f64) {
    let n = s.latencies_us.len();
    println!(
        "{:<58} {:>9} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
        truncate(name, 58),
        n,
        n as f64 / secs,
        percentile_ms(&s.latencies_us, 0.50),
        percentile_ms(&s.latencies_us, 0.99),
        percentile_ms(&s.latencies_us, 1.0),
        s.errors
    );
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// Sends a request and reads the whole body; Ok(body) on the expected status class.
async fn exchange(rb: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), String> {
    let r = rb.send().await.map_err(|e| format!("{e}"))?;
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(|e| format!("{e}"))?;
    Ok((status, body.to_vec()))
}

/// Sends a request and reads its body to the end as it arrives, keeping only its first bytes
/// (for an error message): the latency is the last byte's, without the
/// client assembling and copying the body (what `wrk` and `oha` measure). Assembling a 1.27 MB
/// `_revinclude` response into one buffer and copying it cost the shared cores page faults and
/// copies of fresh memory for every response.
async fn exchange_drain(rb: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), String> {
    const KEEP: usize = 512;
    let mut r = rb.send().await.map_err(|e| format!("{e}"))?;
    let status = r.status().as_u16();
    let mut head = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| format!("{e}"))? {
        if head.len() < KEEP {
            head.extend_from_slice(&chunk[..chunk.len().min(KEEP - head.len())]);
        }
    }
    Ok((status, head))
}

fn expect(status: u16, want: u16, body: &[u8]) -> Result<(), String> {
    if status == want {
        Ok(())
    } else {
        Err(format!(
            "HTTP {status} (want {want}): {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// ingest

/// Posts every transaction Bundle in `data.dir`; returns the total bytes of JSON posted.
async fn ingest(server: &Server, data: &DataArgs) -> Result<u64> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&data.dir)
        .with_context(|| format!("cannot read {}", data.dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    // Load and check every Bundle before the clock starts.
    let mut bundles: Vec<(String, Vec<u8>, usize)> = Vec::new();
    let mut skipped = 0;
    for f in files {
        let bytes = std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
        let v: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) => {
                skipped += 1;
                continue;
            }
        };
        if v["resourceType"] != "Bundle" || v["type"] != "transaction" {
            skipped += 1;
            continue;
        }
        let n = v["entry"].as_array().map_or(0, |a| a.len());
        let name = f
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        bundles.push((name, bytes, n));
    }
    if bundles.is_empty() {
        bail!("no transaction Bundles in {}", data.dir.display());
    }
    let total_resources: usize = bundles.iter().map(|b| b.2).sum();
    let total_bytes: u64 = bundles.iter().map(|b| b.1.len() as u64).sum();
    let bundles = Arc::new(bundles);
    let next = Arc::new(AtomicUsize::new(0));
    let clients = data.clients.clamp(1, 64);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let bundles = bundles.clone();
        let next = next.clone();
        let client = server.client.clone();
        let url = server.base.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            let mut failed_resources = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, body, n)) = bundles.get(i) else {
                    break;
                };
                let started = Instant::now();
                let rb = client
                    .post(&url)
                    .header("content-type", FHIR_JSON)
                    .header("accept", FHIR_JSON)
                    .header("prefer", "return=minimal")
                    .body(body.clone());
                let r = match exchange(rb).await {
                    Ok((status, body)) => expect(status, 200, &body),
                    Err(e) => Err(e),
                };
                if r.is_err() {
                    failed_resources += n;
                }
                stats.record(
                    "POST transaction Bundle",
                    started,
                    r.map_err(|e| format!("{name}: {e}")),
                );
            }
            (stats, failed_resources)
        }));
    }
    let mut stats = Stats::default();
    let mut failed_resources = 0;
    for t in tasks {
        let (s, f) = t.await?;
        stats.merge(s);
        failed_resources += f;
    }
    let elapsed = t0.elapsed();
    let ok_resources = total_resources - failed_resources;
    println!(
        "\n== ingest: {} ({:?}), {} clients ==",
        data.dir.display(),
        server.backend,
        clients
    );
    println!(
        "{:<10} {:>10} {:>12} {:>10} {:>12} {:>14} {:>10}",
        "bundles", "resources", "JSON MB", "seconds", "resources/s", "failed bundles", "skipped"
    );
    let failed_bundles = stats.ops.values().map(|s| s.errors).sum::<usize>();
    println!(
        "{:<10} {:>10} {:>12.1} {:>10.2} {:>12.0} {:>14} {:>10}",
        bundles.len(),
        total_resources,
        total_bytes as f64 / 1e6,
        elapsed.as_secs_f64(),
        ok_resources as f64 / elapsed.as_secs_f64().max(1e-9),
        failed_bundles,
        skipped
    );
    stats.print("ingest latency per Bundle", elapsed, &[]);
    Ok(total_bytes)
}

async fn create_patients(server: &Server, n: usize) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let next = next.clone();
        let client = server.client.clone();
        let url = format!("{}/Patient", server.base);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let p = patient(i);
                let (status, body) = exchange(
                    client
                        .post(&url)
                        .header("content-type", FHIR_JSON)
                        .body(p.to_string()),
                )
                .await
                .map_err(|e| anyhow!(e))?;
                expect(status, 201, &body).map_err(|e| anyhow!(e))?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn patient(i: usize) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:kiln-bench", "value": format!("p{i}")}],
        "name": [{"family": format!("Bench{}", i % 97), "given": ["Test", format!("N{i}")]}],
        "gender": if i.is_multiple_of(2) { "female" } else { "male" },
        "birthDate": format!("19{:02}-0{}-1{}", 30 + i % 70, 1 + i % 9, i % 10),
    })
}

fn observation(patient_id: &str, i: usize) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": format!("Patient/{patient_id}")},
        "effectiveDateTime": "2024-05-01T10:00:00Z",
        "valueQuantity": {"value": 60 + (i % 40), "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    })
}

/// Every resource id of `ty`, following `next` links (bounded).
async fn all_ids(server: &Server, ty: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut url = format!("{}/{ty}?_count=1000&_elements=id", server.base);
    for _ in 0..1000 {
        let r = server.client.get(&url).send().await?;
        let v: Value = serde_json::from_slice(&r.bytes().await?)?;
        for e in v["entry"].as_array().into_iter().flatten() {
            if let Some(id) = e["resource"]["id"].as_str() {
                ids.push(id.to_string());
            }
        }
        let next = v["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str());
        match next {
            Some(n) => url = n.to_string(),
            None => break,
        }
    }
    Ok(ids)
}

// ---------------------------------------------------------------------------------------------
// Timed load

/// Runs `connections` tasks for `seconds`; each calls `op(client, base, task, iteration, stats)`.
async fn load<F, Fut>(server: &Server, connections: usize, seconds: u64, op: F) -> (Stats, Duration)
where
    F: Fn(reqwest::Client, String, usize, usize, Stats) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Stats> + Send + 'static,
{
    let op = Arc::new(op);
    let connections = connections.clamp(1, 1024);
    let client = http_client(connections).unwrap_or_else(|_| server.client.clone());
    let deadline = Instant::now() + Duration::from_secs(seconds.max(1));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..connections {
        let op = op.clone();
        let client = client.clone();
        let base = server.base.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            let mut i = 0;
            while Instant::now() < deadline && i < MAX_REQUESTS_PER_TASK {
                stats = op(client.clone(), base.clone(), task, i, stats).await;
                i += 1;
            }
            stats
        }));
    }
    let mut stats = Stats::default();
    for t in tasks {
        if let Ok(s) = t.await {
            stats.merge(s);
        }
    }
    (stats, t0.elapsed())
}

async fn read(server: &Server, connections: usize, seconds: u64) -> Result<()> {
    let mut ids = all_ids(server, "Patient").await?;
    if ids.is_empty() {
        println!("(no Patients on the server: creating 1,000)");
        create_patients(server, 1000).await?;
        ids = all_ids(server, "Patient").await?;
    }
    if ids.is_empty() {
        bail!("no Patients to read");
    }
    let ids = Arc::new(ids);
    let n_ids = ids.len();
    let (mut stats, elapsed) = load(
        server,
        connections,
        seconds,
        move |client, base, _, _, mut stats| {
            let ids = ids.clone();
            async move {
                let id = &ids[fastrand::usize(..ids.len())];
                let started = Instant::now();
                let r = match exchange(client.get(format!("{base}/Patient/{id}"))).await {
                    Ok((s, b)) => expect(s, 200, &b),
                    Err(e) => Err(e),
                };
                stats.record("GET Patient/{id}", started, r);
                stats
            }
        },
    )
    .await;
    stats.print(
        &format!(
            "read by id ({:?}, {connections} connections, {n_ids} Patients)",
            server.backend
        ),
        elapsed,
        &[],
    );
    Ok(())
}

fn location_id(headers: &reqwest::header::HeaderMap) -> Option<String> {
    // Location: {base}/{type}/{id}/_history/{vid}
    let loc = headers.get("location")?.to_str().ok()?;
    let parts: Vec<&str> = loc.split('/').collect();
    let h = parts.iter().position(|p| *p == "_history")?;
    h.checked_sub(1).map(|i| parts[i].to_string())
}

/// One CRUD step; returns the new id on create.
async fn crud_step(
    client: &reqwest::Client,
    rb: reqwest::RequestBuilder,
    want: u16,
) -> (Result<(), String>, Option<String>) {
    let _ = client;
    match rb.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let id = location_id(r.headers());
            let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            (expect(status, want, &body), id)
        }
        Err(e) => (Err(format!("{e}")), None),
    }
}

const CRUD_OPS: [&str; 8] = [
    "create Patient",
    "read Patient",
    "update Patient",
    "create Observation",
    "read Observation",
    "update Observation",
    "delete Observation",
    "delete Patient",
];

async fn crud(server: &Server, connections: usize, seconds: u64) -> Result<()> {
    // Each iteration: create P, read P, update P, create O(P), read O, update O, delete O,
    // delete P: 8 requests, equal share of every operation.
    let (mut stats, elapsed) = load(
        server,
        connections,
        seconds,
        |client, base, task, i, mut stats| async move {
            let n = task * 1_000_000 + i;
            let mut p = patient(n);
            let started = Instant::now();
            let (r, pid) = crud_step(
                &client,
                client
                    .post(format!("{base}/Patient"))
                    .header("content-type", FHIR_JSON)
                    .body(p.to_string()),
                201,
            )
            .await;
            stats.record(CRUD_OPS[0], started, r);
            let Some(pid) = pid else { return stats };
            let started = Instant::now();
            let (r, _) = crud_step(&client, client.get(format!("{base}/Patient/{pid}")), 200).await;
            stats.record(CRUD_OPS[1], started, r);
            p["id"] = json!(pid);
            p["active"] = json!(true);
            let started = Instant::now();
            let (r, _) = crud_step(
                &client,
                client
                    .put(format!("{base}/Patient/{pid}"))
                    .header("content-type", FHIR_JSON)
                    .body(p.to_string()),
                200,
            )
            .await;
            stats.record(CRUD_OPS[2], started, r);
            let mut o = observation(&pid, n);
            let started = Instant::now();
            let (r, oid) = crud_step(
                &client,
                client
                    .post(format!("{base}/Observation"))
                    .header("content-type", FHIR_JSON)
                    .body(o.to_string()),
                201,
            )
            .await;
            stats.record(CRUD_OPS[3], started, r);
            if let Some(oid) = oid {
                let started = Instant::now();
                let (r, _) = crud_step(
                    &client,
                    client.get(format!("{base}/Observation/{oid}")),
                    200,
                )
                .await;
                stats.record(CRUD_OPS[4], started, r);
                o["id"] = json!(oid);
                o["status"] = json!("amended");
                let started = Instant::now();
                let (r, _) = crud_step(
                    &client,
                    client
                        .put(format!("{base}/Observation/{oid}"))
                        .header("content-type", FHIR_JSON)
                        .body(o.to_string()),
                    200,
                )
                .await;
                stats.record(CRUD_OPS[5], started, r);
                let started = Instant::now();
                let (r, _) = crud_step(
                    &client,
                    client.delete(format!("{base}/Observation/{oid}")),
                    204,
                )
                .await;
                stats.record(CRUD_OPS[6], started, r.or_else(|e| accept_200(&e)));
            }
            let started = Instant::now();
            let (r, _) =
                crud_step(&client, client.delete(format!("{base}/Patient/{pid}")), 204).await;
            stats.record(CRUD_OPS[7], started, r.or_else(|e| accept_200(&e)));
            stats
        },
    )
    .await;
    stats.print(
        &format!("CRUD mix ({:?}, {connections} connections)", server.backend),
        elapsed,
        &CRUD_OPS,
    );
    Ok(())
}

/// DELETE may answer 200 (with an OperationOutcome) instead of 204; both are success.
fn accept_200(e: &str) -> Result<(), String> {
    if e.starts_with("HTTP 200 ") {
        Ok(())
    } else {
        Err(e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// search

/// Query values picked from the ingested data.
struct Picks {
    family: String,
    birthdate: String,
    patient_id: String,
    code_system: String,
    code: String,
    value: String,
    date: String,
    condition_text: String,
}

fn median<T: Clone + Ord>(mut v: Vec<T>) -> Option<T> {
    v.sort();
    v.get(v.len() / 2).cloned()
}

async fn pick_values(server: &Server) -> Result<Picks> {
    // Sorted by name, not by row id: a 4-client ingest stores the Bundles in a different order
    // each run (and server-assigned ids differ), so "the first Patient" by rid made runs search
    // different values and their figures incomparable.
    let patients = server
        .get_json("Patient?_count=100&_sort=family,given,birthdate")
        .await?;
    let entries: Vec<&Value> = patients["entry"]
        .as_array()
        .map(|a| a.iter().map(|e| &e["resource"]).collect())
        .unwrap_or_default();
    let first = entries
        .first()
        .ok_or_else(|| anyhow!("no Patients on the server: ingest first"))?;
    let family = first["name"][0]["family"]
        .as_str()
        .ok_or_else(|| anyhow!("first Patient has no family name"))?
        .to_string();
    let patient_id = first["id"].as_str().unwrap_or_default().to_string();
    let birthdate = median(
        entries
            .iter()
            .filter_map(|p| p["birthDate"].as_str().map(str::to_string))
            .collect(),
    )
    .unwrap_or_else(|| "1970-01-01".into());
    // The most frequent Observation code of this patient that carries a valueQuantity.
    let obs = server
        .get_json(&format!("Observation?patient={patient_id}&_count=1000"))
        .await?;
    let mut codes: HashMap<(String, String), Vec<f64>> = HashMap::new();
    let mut dates = Vec::new();
    for e in obs["entry"].as_array().into_iter().flatten() {
        let r = &e["resource"];
        if let Some(d) = r["effectiveDateTime"].as_str() {
            dates.push(d.get(..10).unwrap_or(d).to_string());
        }
        let (Some(sys), Some(code)) = (
            r["code"]["coding"][0]["system"].as_str(),
            r["code"]["coding"][0]["code"].as_str(),
        ) else {
            continue;
        };
        if let Some(v) = r["valueQuantity"]["value"]
            .as_f64()
            .or_else(|| r["valueQuantity"]["value"].to_string().parse().ok())
        {
            codes
                .entry((sys.to_string(), code.to_string()))
                .or_default()
                .push(v);
        }
    }
    let ((code_system, code), mut values) = codes
        .into_iter()
        .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(&a.0)))
        .ok_or_else(|| anyhow!("Patient {patient_id} has no Observation with a valueQuantity"))?;
    values.sort_by(|a, b| a.total_cmp(b));
    let value = values
        .get(values.len() / 2)
        .map(|v| format!("{v}"))
        .unwrap_or_else(|| "0".into());
    let date = median(dates).unwrap_or_else(|| "2015-01-01".into());
    let conditions = server.get_json("Condition?_count=50&_sort=code").await?;
    let condition_text = conditions["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let c = &e["resource"]["code"];
            c["text"]
                .as_str()
                .or_else(|| c["coding"][0]["display"].as_str())
        })
        .flat_map(|t| t.split(|c: char| !c.is_alphanumeric()))
        .find(|w| w.len() >= 5)
        .unwrap_or("Hypertension")
        .to_string();
    Ok(Picks {
        family,
        birthdate,
        patient_id,
        code_system,
        code,
        value,
        date,
        condition_text,
    })
}

fn search_mix(p: &Picks) -> Vec<(String, String)> {
    let q = |label: &str, query: String| (label.to_string(), query);
    vec![
        q("Patient?name", format!("Patient?name={}", p.family)),
        q(
            "Patient?birthdate=ge",
            format!("Patient?birthdate=ge{}", p.birthdate),
        ),
        q(
            "Observation?patient&code",
            format!(
                "Observation?patient={}&code={}|{}",
                p.patient_id, p.code_system, p.code
            ),
        ),
        q(
            "Observation?code&value-quantity=gt",
            format!("Observation?code={}&value-quantity=gt{}", p.code, p.value),
        ),
        q(
            "Observation?date=ge&_sort=-date",
            format!("Observation?date=ge{}&_sort=-date", p.date),
        ),
        q(
            "Encounter?subject.name (chain)",
            format!("Encounter?subject.name={}", p.family),
        ),
        q(
            "Patient?_has:Observation:patient:code",
            format!("Patient?_has:Observation:patient:code={}", p.code),
        ),
        q(
            "Patient?_revinclude=Observation:patient",
            "Patient?_count=10&_revinclude=Observation:patient".to_string(),
        ),
        q(
            "MedicationRequest?_include=…:patient",
            "MedicationRequest?_include=MedicationRequest:patient".to_string(),
        ),
        q(
            "Condition?code:text",
            format!("Condition?code:text={}", p.condition_text),
        ),
        q(
            "Observation?code&_summary=count",
            format!("Observation?code={}&_summary=count", p.code),
        ),
    ]
}

fn percent_encode_query(q: &str) -> String {
    // Only what Synthea values need: spaces and '|' in tokens; keep the rest readable.
    q.replace(' ', "%20").replace('|', "%7C")
}

async fn search(
    server: &Server,
    connections: usize,
    seconds: u64,
    only: Option<&str>,
) -> Result<()> {
    let picks = pick_values(server).await?;
    let mut mix = search_mix(&picks);
    if let Some(only) = only {
        mix.retain(|(label, _)| label.contains(only));
        if mix.is_empty() {
            bail!("no query of the mix has a label containing `{only}`");
        }
    }
    println!(
        "\n== search mix: queries ({:?}; values picked from the data) ==",
        server.backend
    );
    println!(
        "{:<40} {:>8} {:>8} {:>9}  query",
        "label", "total", "entries", "KB"
    );
    let mut count_total = None;
    for (label, query) in &mix {
        let t0 = Instant::now();
        match server.get_json(&percent_encode_query(query)).await {
            Ok(v) => {
                let entries = v["entry"].as_array().map_or(0, |a| a.len());
                let total = v["total"].as_u64();
                let kb = v.to_string().len() as f64 / 1024.0;
                if label.ends_with("_summary=count") {
                    count_total = total;
                }
                println!(
                    "{:<40} {:>8} {:>8} {:>9.1}  {} ({:.1} ms cold)",
                    label,
                    total.map_or("-".into(), |t| t.to_string()),
                    entries,
                    kb,
                    query,
                    t0.elapsed().as_secs_f64() * 1000.0
                );
            }
            Err(e) => println!("{label:<40} ERROR {e:#}"),
        }
    }
    let encoded = urls_of(&mix);
    let urls: Arc<Vec<(String, String)>> = Arc::new(encoded.clone());
    let n = urls.len();
    let (mut stats, elapsed) = load(
        server,
        connections,
        seconds,
        move |client, base, task, i, mut stats| {
            let urls = urls.clone();
            async move {
                let (label, q) = &urls[(task + i) % n];
                let started = Instant::now();
                let r = match exchange_drain(client.get(format!("{base}/{q}"))).await {
                    Ok((s, head)) => expect(s, 200, &head),
                    Err(e) => Err(e),
                };
                stats.record(label, started, r);
                stats
            }
        },
    )
    .await;
    let order: Vec<&str> = mix.iter().map(|(l, _)| l.as_str()).collect();
    stats.print(
        &format!(
            "search mix ({:?}, {connections} connections, round-robin over {n} queries)",
            server.backend
        ),
        elapsed,
        &order,
    );
    if let (Some(total), Some(s)) = (
        count_total,
        stats.ops.get("Observation?code&_summary=count"),
    ) {
        let p50 = percentile_ms(&s.latencies_us, 0.5);
        println!(
            "count by code: {total} matches / p50 {p50:.2} ms = {:.0} resources/s counted per connection",
            total as f64 / (p50 / 1000.0).max(1e-9)
        );
    }
    server_cpu(server, &encoded).await?;
    if only.is_some() {
        return Ok(());
    }
    count_large(server).await
}

fn urls_of(mix: &[(String, String)]) -> Vec<(String, String)> {
    mix.iter()
        .map(|(l, q)| (l.clone(), percent_encode_query(q)))
        .collect()
}

/// Server CPU time (ns) of a process: the sum over its threads of `/proc/PID/task/*/schedstat`'s
/// first field (time on a CPU). `None` where /proc cannot tell (not Linux, process gone).
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// Server CPU per request of each query, sequential on one keep-alive connection (5 warm-up
/// requests, then 200): what a query costs the server, apart from the client sharing the
/// machine and from waiting under load.
async fn server_cpu(server: &Server, urls: &[(String, String)]) -> Result<()> {
    let Some(pid) = server.pid else {
        println!("\n(server CPU per request: no server process id; pass --pid with --url)");
        return Ok(());
    };
    const N: usize = 200;
    println!("\n== server CPU per request (1 connection, {N} sequential requests each) ==");
    println!("{:<40} {:>12} {:>12}", "query", "CPU ms", "wall ms");
    let client = http_client(1)?;
    let mut round = 0.0;
    for (label, q) in urls {
        let url = format!("{}/{q}", server.base);
        for _ in 0..5 {
            exchange(client.get(&url)).await.map_err(|e| anyhow!(e))?;
        }
        let (Some(c0), t0) = (process_cpu_ns(pid), Instant::now()) else {
            println!("(server CPU per request: /proc/{pid} unreadable)");
            return Ok(());
        };
        for _ in 0..N {
            let (status, body) = exchange(client.get(&url)).await.map_err(|e| anyhow!(e))?;
            expect(status, 200, &body).map_err(|e| anyhow!("{label}: {e}"))?;
        }
        let wall = t0.elapsed().as_secs_f64() * 1000.0 / N as f64;
        let cpu = process_cpu_ns(pid).unwrap_or(c0).saturating_sub(c0) as f64 / 1e6 / N as f64;
        round += cpu;
        println!("{label:<40} {cpu:>12.3} {wall:>12.3}");
    }
    println!("{:<40} {round:>12.3}", "one round of the queries");
    Ok(())
}

/// `_summary=count` over a large match set, one connection, sequential: the counting rate
/// (matches / p50) is meaningful only when the count dominates the request's fixed cost.
async fn count_large(server: &Server) -> Result<()> {
    println!(
        "\n== _summary=count, large match sets (1 connection, 200 sequential requests each) =="
    );
    println!(
        "{:<44} {:>8} {:>9} {:>9} {:>14}",
        "query", "total", "p50 ms", "p99 ms", "resources/s"
    );
    for q in [
        "Observation?status=final&_summary=count",
        "Observation?category=vital-signs&_summary=count",
        "Observation?_summary=count",
    ] {
        let total = server.get_json(q).await?["total"].as_u64().unwrap_or(0);
        let mut lat = Vec::with_capacity(200);
        for _ in 0..200 {
            let t0 = Instant::now();
            let (status, body) = exchange(server.client.get(format!("{}/{q}", server.base)))
                .await
                .map_err(|e| anyhow!(e))?;
            expect(status, 200, &body).map_err(|e| anyhow!(e))?;
            lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
        lat.sort_unstable();
        let p50 = percentile_ms(&lat, 0.5);
        println!(
            "{:<44} {:>8} {:>9.2} {:>9.2} {:>14.0}",
            q,
            total,
            p50,
            percentile_ms(&lat, 0.99),
            total as f64 / (p50 / 1000.0).max(1e-9)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// storage: index rows per resource, bytes on disk per byte of JSON

const INDEX_TABLES: [&str; 7] = [
    "search_string",
    "search_token",
    "search_reference",
    "search_date",
    "search_number",
    "search_quantity",
    "search_uri",
];

fn index_count_sql(table: &str) -> &'static str {
    match table {
        "search_string" => "SELECT COUNT(*) FROM search_string",
        "search_token" => "SELECT COUNT(*) FROM search_token",
        "search_reference" => "SELECT COUNT(*) FROM search_reference",
        "search_date" => "SELECT COUNT(*) FROM search_date",
        "search_number" => "SELECT COUNT(*) FROM search_number",
        "search_quantity" => "SELECT COUNT(*) FROM search_quantity",
        _ => "SELECT COUNT(*) FROM search_uri",
    }
}

struct StorageFigures {
    resources: i64,
    history: i64,
    index_rows: Vec<(String, i64)>,
    stored_json_bytes: i64,
    disk_bytes: u64,
    disk_note: &'static str,
}

macro_rules! scalar {
    ($conn:expr, $sql:expr) => {
        sqlx::query_scalar::<_, i64>($sql)
            .fetch_one(&mut $conn)
            .await
            .with_context(|| format!("query failed: {}", $sql))?
    };
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().ends_with(".log"))
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn storage_figures(server: &Server) -> Result<StorageFigures> {
    let mut index_rows = Vec::new();
    match &server.pg {
        None => {
            let opts = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(server.data_dir.path().join("kiln.db"))
                .read_only(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&opts)
                .await
                .context("cannot open kiln.db")?;
            let resources = scalar!(conn, "SELECT COUNT(*) FROM resources WHERE deleted = 0");
            let history = scalar!(conn, "SELECT COUNT(*) FROM resource_history");
            for t in INDEX_TABLES {
                index_rows.push((t.to_string(), scalar!(conn, index_count_sql(t))));
            }
            let stored_json_bytes = scalar!(
                conn,
                "SELECT COALESCE(SUM(LENGTH(CAST(content AS BLOB))), 0) FROM resource_history"
            );
            let _ = conn.close().await;
            Ok(StorageFigures {
                resources,
                history,
                index_rows,
                stored_json_bytes,
                disk_bytes: dir_size(server.data_dir.path()),
                disk_note: "files in the data dir (kiln.db + WAL)",
            })
        }
        Some((_, _, url)) => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            let resources = scalar!(conn, "SELECT COUNT(*) FROM resources WHERE deleted = 0");
            let history = scalar!(conn, "SELECT COUNT(*) FROM resource_history");
            for t in INDEX_TABLES {
                index_rows.push((t.to_string(), scalar!(conn, index_count_sql(t))));
            }
            let stored_json_bytes = scalar!(
                conn,
                "SELECT COALESCE(SUM(octet_length(content)), 0)::BIGINT FROM resource_history"
            );
            let disk = scalar!(conn, "SELECT pg_database_size(current_database())");
            let _ = conn.close().await;
            Ok(StorageFigures {
                resources,
                history,
                index_rows,
                stored_json_bytes,
                disk_bytes: u64::try_from(disk).unwrap_or(0),
                disk_note: "pg_database_size (includes ~7.5 MB of an empty database)",
            })
        }
    }
}

async fn storage(server: &Server, posted_json_bytes: u64) -> Result<()> {
    let f = storage_figures(server).await?;
    println!("\n== storage ({:?}) ==", server.backend);
    println!("resources (current)        {:>14}", f.resources);
    println!("history rows               {:>14}", f.history);
    let total: i64 = f.index_rows.iter().map(|r| r.1).sum();
    for (t, n) in &f.index_rows {
        println!(
            "{:<26} {:>14}  ({:.2} per resource)",
            t,
            n,
            *n as f64 / f.resources.max(1) as f64
        );
    }
    println!(
        "index rows, all tables     {:>14}  ({:.2} per resource)",
        total,
        total as f64 / f.resources.max(1) as f64
    );
    println!("JSON posted (Bundles)      {:>14} bytes", posted_json_bytes);
    println!(
        "JSON stored (history)      {:>14} bytes",
        f.stored_json_bytes
    );
    println!(
        "on disk                    {:>14} bytes  [{}]",
        f.disk_bytes, f.disk_note
    );
    println!(
        "bytes on disk per byte of stored JSON: {:.2}",
        f.disk_bytes as f64 / f.stored_json_bytes.max(1) as f64
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// startup

fn vm_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn startup(target: &Target, runs: usize) -> Result<()> {
    let kiln = kiln_binary(target)?;
    let client = http_client(4)?;
    let mut times = Vec::new();
    let mut rss = Vec::new();
    println!(
        "\n== startup ({:?}, fresh store each run) ==",
        target.backend
    );
    println!(
        "{:<6} {:>22} {:>20}",
        "run", "exec → 200 /metadata", "idle RSS after 1 s"
    );
    for run in 0..runs.clamp(1, 50) {
        let dir = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
        let pg = match target.backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let m = target
                    .database
                    .as_deref()
                    .ok_or_else(|| anyhow!("--backend postgres needs --database"))?;
                Some(create_pg_database(m).await?)
            }
        };
        let r = spawn_kiln(
            &kiln,
            dir.path(),
            pg.as_ref().map(|p| p.2.as_str()),
            &client,
        )
        .await;
        let r = match r {
            Ok((mut child, _, t)) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let kb = vm_rss_kb(child.id());
                terminate(&mut child);
                Ok((t, kb))
            }
            Err(e) => Err(e),
        };
        if let Some((m, name, _)) = &pg {
            drop_pg_database(m, name).await;
        }
        let (t, kb) = r?;
        println!(
            "{:<6} {:>19.1} ms {:>17} MB",
            run + 1,
            t.as_secs_f64() * 1000.0,
            kb.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
        );
        times.push(t);
        if let Some(k) = kb {
            rss.push(k);
        }
    }
    let t = median(times).unwrap_or_default();
    println!(
        "median {:>19.1} ms {:>17} MB",
        t.as_secs_f64() * 1000.0,
        median(rss).map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_prefix_and_query_are_kept() {
        let (p, q) = split_database_url("postgres://postgres@127.0.0.1:5432/test").unwrap();
        assert_eq!(p, "postgres://postgres@127.0.0.1:5432/");
        assert_eq!(q, "");
        let (p, q) = split_database_url("postgres://u:pw@h/db?sslmode=disable").unwrap();
        assert_eq!(
            (p.as_str(), q.as_str()),
            ("postgres://u:pw@h/", "?sslmode=disable")
        );
        let (p, _) = split_database_url("postgres://h:5432").unwrap();
        assert_eq!(p, "postgres://h:5432/");
        assert!(split_database_url("no-scheme").is_err());
    }

    #[test]
    fn percentiles_on_sorted_micros() {
        let v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&v, 0.0), 1.0);
        assert_eq!(percentile_ms(&v, 0.5), 51.0);
        assert_eq!(percentile_ms(&v, 0.99), 99.0);
        assert_eq!(percentile_ms(&v, 1.0), 100.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }

    #[test]
    fn stats_merge_counts_requests_and_errors() {
        let mut a = Stats::default();
        let t = Instant::now();
        a.record("read", t, Ok(()));
        a.record("read", t, Err("HTTP 500".into()));
        let mut b = Stats::default();
        b.record("read", t, Ok(()));
        b.record("create", t, Err("HTTP 400".into()));
        a.merge(b);
        assert_eq!(a.ops["read"].latencies_us.len(), 3);
        assert_eq!(a.ops["read"].errors, 1);
        assert_eq!(a.ops["read"].first_error.as_deref(), Some("HTTP 500"));
        assert_eq!(a.ops["create"].errors, 1);
    }

    #[test]
    fn location_header_gives_the_logical_id() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            "location",
            "http://127.0.0.1:1/fhir/Patient/abc/_history/1"
                .parse()
                .unwrap(),
        );
        assert_eq!(location_id(&h).as_deref(), Some("abc"));
        h.insert("location", "http://x/fhir/Patient/abc".parse().unwrap());
        assert_eq!(location_id(&h), None);
    }

    #[test]
    fn search_mix_uses_the_picked_values() {
        let p = Picks {
            family: "Lemke".into(),
            birthdate: "1980-01-02".into(),
            patient_id: "p1".into(),
            code_system: "http://loinc.org".into(),
            code: "8302-2".into(),
            value: "170.5".into(),
            date: "2015-01-01".into(),
            condition_text: "Hypertension".into(),
        };
        let mix = search_mix(&p);
        assert_eq!(mix.len(), 11);
        let queries: Vec<&str> = mix.iter().map(|(_, q)| q.as_str()).collect();
        assert!(queries.contains(&"Patient?name=Lemke"));
        assert!(queries.contains(&"Observation?patient=p1&code=http://loinc.org|8302-2"));
        assert!(queries.contains(&"Observation?code=8302-2&value-quantity=gt170.5"));
        assert!(queries.contains(&"Encounter?subject.name=Lemke"));
        assert!(queries.contains(&"Observation?code=8302-2&_summary=count"));
        assert_eq!(
            percent_encode_query("Observation?code=a|b c"),
            "Observation?code=a%7Cb%20c"
        );
    }

    #[test]
    fn generated_resources_are_valid_shapes() {
        let p = patient(3);
        assert_eq!(p["resourceType"], "Patient");
        assert_eq!(p["gender"], "male");
        assert_eq!(p["birthDate"].as_str().map(str::len), Some(10));
        let o = observation("p1", 7);
        assert_eq!(o["subject"]["reference"], "Patient/p1");
        assert_eq!(o["valueQuantity"]["value"], 67);
    }

    #[test]
    fn own_cpu_time_is_read_from_proc() {
        let pid = std::process::id();
        let a = process_cpu_ns(pid).expect("/proc/self readable on Linux");
        // ~20 ms on a CPU, then a sleep so the scheduler accounts the slice
        let t0 = Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        std::thread::sleep(Duration::from_millis(2));
        let b = process_cpu_ns(pid).unwrap();
        assert!(b > a, "{a} -> {b}");
        assert!(process_cpu_ns(u32::MAX).is_none());
    }

    #[test]
    fn median_of_unsorted_values() {
        assert_eq!(median(vec![5, 1, 3]), Some(3));
        assert_eq!(median(Vec::<u32>::new()), None);
    }
}
