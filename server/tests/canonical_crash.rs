//! The canonical terminology load at first start (`server/src/canonical.rs`) is one transaction:
//! `kiln serve` killed with SIGKILL in the middle of it (150 ms after its start is logged, before
//! the server answers) leaves
//! no half load behind — no canonical resource, history row, index row or load record — and the
//! next start stores the whole bundle.
//!
//! Runs on the embedded SQLite store, and on PostgreSQL too when `KILN_TEST_DATABASE_URL` names a
//! maintenance connection (a fresh database `kiln_canon_crash_<random>` is created and dropped).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, Row};

const TYPES_IN: &str = "('CodeSystem', 'ValueSet', 'ConceptMap', 'NamingSystem')";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A `kiln serve` child that is killed when dropped, so a failing assertion leaves no server
/// running behind the test.
struct Server(Child);

impl std::ops::Deref for Server {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(data_dir: &Path, database: Option<&str>, port: u16, log: &Path) -> Server {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("server log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--auth")
        .arg("off")
        .env_remove("KILN_DATABASE")
        .env_remove("KILN_CONFIG")
        .env_remove("KILN_NO_CANONICAL_TERMINOLOGY")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(db) = database {
        cmd.arg("--database").arg(db);
    }
    Server(cmd.spawn().expect("start kiln serve"))
}

async fn ready(client: &reqwest::Client, port: u16) -> bool {
    client
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// What the database holds of the canonical load: (resources, history rows, index rows of
/// them, load records).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Held {
    resources: i64,
    history: i64,
    uri_rows: i64,
    loads: i64,
}

const COUNTS: [&str; 4] = [
    "SELECT count(*) FROM resources WHERE deleted = 0 AND res_type IN ",
    "SELECT count(*) FROM resource_history WHERE res_type IN ",
    "SELECT count(*) FROM search_uri u JOIN resources r ON r.rid = u.rid WHERE r.res_type IN ",
    "SELECT count(*) FROM kiln_canonical_loads WHERE ",
];

fn count_sql(i: usize) -> String {
    if i == 3 {
        format!("{}name = 'r4-terminology'", COUNTS[3])
    } else {
        format!("{}{TYPES_IN}", COUNTS[i])
    }
}

async fn held(data: &Path, database: Option<&str>) -> Held {
    let mut v = [0i64; 4];
    match database {
        None => {
            let url = format!("sqlite://{}?mode=rw", data.join("kiln.db").display());
            let mut c = sqlx::SqliteConnection::connect(&url)
                .await
                .expect("open the SQLite file");
            for (i, slot) in v.iter_mut().enumerate() {
                *slot = sqlx::query(sqlx::AssertSqlSafe(count_sql(i)))
                    .fetch_one(&mut c)
                    .await
                    .expect("count")
                    .get(0);
            }
            let _ = c.close().await;
        }
        Some(url) => {
            let mut c = sqlx::PgConnection::connect(url)
                .await
                .expect("connect to the test database");
            for (i, slot) in v.iter_mut().enumerate() {
                *slot = sqlx::query(sqlx::AssertSqlSafe(count_sql(i)))
                    .fetch_one(&mut c)
                    .await
                    .expect("count")
                    .get(0);
            }
            let _ = c.close().await;
        }
    }
    Held {
        resources: v[0],
        history: v[1],
        uri_rows: v[2],
        loads: v[3],
    }
}

/// Whether the load has started: its log line (after the transaction and its lock are taken).
fn load_started(log: &Path) -> bool {
    std::fs::read_to_string(log)
        .is_ok_and(|l| l.contains("storing the canonical terminology resources"))
}

async fn kill_mid_load(database: Option<(String, String, String)>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("kiln.log");
    let data = dir.path().join("data");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let url = database.as_ref().map(|d| d.0.as_str());
    let db_name = database.as_ref().map(|d| d.1.clone()).unwrap_or_default();
    let mut watcher = match &database {
        Some((_, _, admin)) => Some(
            sqlx::PgConnection::connect(admin)
                .await
                .expect("maintenance connection"),
        ),
        None => None,
    };
    let vendored = kiln_server::canonical::vendored_resources()
        .expect("vendored bundle")
        .len() as i64;

    let port = free_port();
    let mut child = start(&data, url, port, &log);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "kiln exited early ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if load_started(&log) {
            break;
        }
        assert!(Instant::now() < deadline, "the load never started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // well inside the load (seconds in a debug build), which has not answered yet
    tokio::time::sleep(Duration::from_millis(150)).await;
    // connections wait in the listener's backlog during the load: a probe that times out is
    // a server that has not answered
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    assert!(
        !ready(&probe, port).await,
        "the load finished before the kill: nothing to test"
    );
    child.kill().expect("SIGKILL kiln");
    let _ = child.wait();
    if let Some(w) = watcher.as_mut() {
        // PostgreSQL notices the closed connection and rolls back: wait for the backend to go
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 = sqlx::query(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&db_name)
            .fetch_one(&mut *w)
            .await
            .expect("pg_stat_activity")
            .get(0);
            if n == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let after_kill = held(&data, url).await;
    assert_eq!(
        after_kill,
        Held {
            resources: 0,
            history: 0,
            uri_rows: 0,
            loads: 0
        },
        "a load killed mid-way left rows behind"
    );

    // the next start stores everything
    let port = free_port();
    let mut child = start(&data, url, port, &log);
    let deadline = Instant::now() + Duration::from_secs(180);
    while !ready(&client, port).await {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "kiln exited early ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "restarted kiln never got ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let after_restart = held(&data, url).await;
    assert_eq!(after_restart.resources, vendored, "{after_restart:?}");
    assert_eq!(after_restart.history, vendored, "{after_restart:?}");
    assert_eq!(after_restart.loads, 1, "{after_restart:?}");
    // every vendored resource has a url: at least one uri index row each
    assert!(
        after_restart.uri_rows >= vendored,
        "index rows missing: {after_restart:?}"
    );
    println!(
        "canonical load killed mid-way ({}): nothing left behind; restart stored {} resources",
        if url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        after_restart.resources
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_canonical_load_sqlite() {
    kill_mid_load(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_canonical_load_postgres() {
    let Ok(admin) = std::env::var("KILN_TEST_DATABASE_URL") else {
        eprintln!("notice: KILN_TEST_DATABASE_URL is not set: skipping the PostgreSQL variant");
        return;
    };
    let name = format!("kiln_canon_crash_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("maintenance connection");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create the test database");
    let url = match admin.rsplit_once('/') {
        Some((head, _))
            if head.contains("://") && head.split("://").nth(1).is_some_and(|h| !h.is_empty()) =>
        {
            format!("{head}/{name}")
        }
        _ => format!("{admin}/{name}"),
    };
    kill_mid_load(Some((url, name.clone(), admin.clone()))).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await;
    let _ = conn.close().await;
}
