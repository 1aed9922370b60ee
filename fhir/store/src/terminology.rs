//! Loaded code systems in the database (`kiln terminology load … --database postgres://…`), so
//! every Kiln node on one PostgreSQL database serves the same releases without a shared
//! directory.
//!
//! Two tables (migration 3): `terminology_system` has one row per loaded item (a code system
//! snapshot, a companion resource such as the GEM ConceptMap, the UCUM essence) naming its
//! current `generation`; `terminology_chunk` holds the item's content, the same gzip'd bytes a
//! file snapshot holds, split into rows of at most [`CHUNK_BYTES`] keyed by
//! (id, generation, seq). The store does not interpret the bytes (kiln-terminology encodes and
//! decodes them).
//!
//! **Atomicity.** A save runs in one transaction: it takes the next generation of the item (an
//! upsert that also locks the item's row, so two loads of one item queue), writes the new
//! chunks, records their count and size, and deletes every other generation's chunks (garbage
//! collection). Nothing of it is visible before the commit; a failed or interrupted save (an
//! error, the process killed, the connection lost) rolls back as a whole and the previous
//! generation stays current and complete. Readers take the head and the chunks in one
//! consistent snapshot, and check that the chunk count and total size match the head.

use sqlx::Row;

use crate::backend::Pools;
use crate::{Result, Store, StoreError};

/// Size of one content row.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The current generation of one loaded item (a `terminology_system` row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminologyHead {
    /// Store id of the item (`icd10cm`, `loinc`, `snomed`, `icd10cm-gem`, `ucum`).
    pub id: String,
    /// What the content is (`code-system`, `resource`, `ucum`), for the reader to decode it.
    pub kind: String,
    /// Increases by one with every completed load of the item.
    pub generation: i64,
    /// Completion time of the load (µs since the Unix epoch).
    pub loaded_at: i64,
    /// Canonical URL and version of the content, when it has them.
    pub url: Option<String>,
    pub version: Option<String>,
    /// A one-line human summary (counts), as the load printed it.
    pub summary: Option<String>,
    /// Number of content rows and total content bytes.
    pub chunks: i64,
    pub size: i64,
}

/// What a save records about the content besides the bytes.
#[derive(Debug, Clone, Default)]
pub struct TerminologyItem<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub url: Option<&'a str>,
    pub version: Option<&'a str>,
    pub summary: Option<&'a str>,
}

pub(crate) fn migration(dialect: crate::Dialect) -> Vec<String> {
    let (int, blob) = match dialect {
        crate::Dialect::Sqlite => ("INTEGER", "BLOB"),
        crate::Dialect::Postgres => ("BIGINT", "BYTEA"),
    };
    let mut v = vec![
        format!(
            "CREATE TABLE IF NOT EXISTS terminology_system (
                id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                generation {int} NOT NULL,
                loaded_at {int} NOT NULL,
                url TEXT,
                version TEXT,
                summary TEXT,
                chunks {int} NOT NULL,
                size {int} NOT NULL
            )"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS terminology_chunk (
                id TEXT NOT NULL,
                generation {int} NOT NULL,
                seq {int} NOT NULL,
                data {blob} NOT NULL,
                PRIMARY KEY (id, generation, seq)
            )"
        ),
    ];
    if dialect == crate::Dialect::Postgres {
        // the content is gzip'd already: TOAST compression would only cost CPU
        v.push("ALTER TABLE terminology_chunk ALTER COLUMN data SET STORAGE EXTERNAL".to_string());
    }
    v
}

const HEAD_COLUMNS: &str = "id, kind, generation, loaded_at, url, version, summary, chunks, size";

macro_rules! head_from_row {
    ($row:expr) => {{
        let r = $row;
        TerminologyHead {
            id: r.try_get(0)?,
            kind: r.try_get(1)?,
            generation: r.try_get(2)?,
            loaded_at: r.try_get(3)?,
            url: r.try_get(4)?,
            version: r.try_get(5)?,
            summary: r.try_get(6)?,
            chunks: r.try_get(7)?,
            size: r.try_get(8)?,
        }
    }};
}

/// The body of a save, written once for both backends' transaction types.
macro_rules! save_in_tx {
    ($tx:expr, $item:expr, $chunks:expr) => {{
        let tx = $tx;
        let item: &TerminologyItem<'_> = $item;
        let now = crate::now_micros();
        // next generation; the upsert locks the item's row until the commit, so concurrent
        // loads of one item queue here instead of interleaving
        let generation: i64 = sqlx::query_scalar(
            "INSERT INTO terminology_system (id, kind, generation, loaded_at, chunks, size) \
             VALUES ($1, $2, 1, $3, 0, 0) \
             ON CONFLICT (id) DO UPDATE SET generation = terminology_system.generation + 1 \
             RETURNING generation",
        )
        .bind(item.id)
        .bind(item.kind)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let mut seq: i64 = 0;
        let mut size: i64 = 0;
        for chunk in $chunks {
            let chunk: Vec<u8> = chunk?;
            if chunk.is_empty() {
                continue;
            }
            for part in chunk.chunks(CHUNK_BYTES) {
                sqlx::query(
                    "INSERT INTO terminology_chunk (id, generation, seq, data) VALUES ($1, $2, $3, $4)",
                )
                .bind(item.id)
                .bind(generation)
                .bind(seq)
                .bind(part)
                .execute(&mut *tx)
                .await?;
                seq += 1;
                size += part.len() as i64;
            }
        }
        let head_sql = format!(
            "UPDATE terminology_system SET kind = $2, loaded_at = $3, url = $4, version = $5, \
             summary = $6, chunks = $7, size = $8 WHERE id = $1 RETURNING {HEAD_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(head_sql))
            .bind(item.id)
            .bind(item.kind)
            .bind(crate::now_micros().max(now))
            .bind(item.url)
            .bind(item.version)
            .bind(item.summary)
            .bind(seq)
            .bind(size)
            .fetch_one(&mut *tx)
            .await?;
        let head = head_from_row!(&row);
        // garbage collection: the previous generations' content goes with this commit
        sqlx::query("DELETE FROM terminology_chunk WHERE id = $1 AND generation <> $2")
            .bind(item.id)
            .bind(generation)
            .execute(&mut *tx)
            .await?;
        head
    }};
}

/// The body of a read, written once for both backends' transaction types.
macro_rules! read_in_tx {
    ($tx:expr, $id:expr) => {{
        let tx = $tx;
        let head_sql = format!("SELECT {HEAD_COLUMNS} FROM terminology_system WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(head_sql))
            .bind($id)
            .fetch_optional(&mut *tx)
            .await?;
        match row {
            None => None,
            Some(row) => {
                let head = head_from_row!(&row);
                let rows = sqlx::query(
                    "SELECT data FROM terminology_chunk WHERE id = $1 AND generation = $2 ORDER BY seq",
                )
                .bind($id)
                .bind(head.generation)
                .fetch_all(&mut *tx)
                .await?;
                let mut data = Vec::with_capacity(head.size.max(0) as usize);
                for r in &rows {
                    let part: &[u8] = r.try_get(0)?;
                    data.extend_from_slice(part);
                }
                if rows.len() as i64 != head.chunks || data.len() as i64 != head.size {
                    return Err(StoreError::Corrupt(format!(
                        "terminology item {} generation {}: {} rows / {} bytes stored, {} / {} recorded",
                        head.id,
                        head.generation,
                        rows.len(),
                        data.len(),
                        head.chunks,
                        head.size
                    )));
                }
                Some((head, data))
            }
        }
    }};
}

impl Store {
    /// Every loaded item's current head, by id: what a node polls to notice a new load.
    pub async fn terminology_heads(&self) -> Result<Vec<TerminologyHead>> {
        let sql = format!("SELECT {HEAD_COLUMNS} FROM terminology_system ORDER BY id");
        crate::backend::on_read_pool!(self.pools(), |p| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(p).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push(head_from_row!(r));
            }
            Ok(out)
        })
    }

    /// Saves `data` as the new generation of `item` atomically (see the module docs).
    pub async fn save_terminology(
        &self,
        item: &TerminologyItem<'_>,
        data: &[u8],
    ) -> Result<TerminologyHead> {
        self.save_terminology_chunks(
            item,
            data.chunks(CHUNK_BYTES)
                .map(|c| Ok::<_, StoreError>(c.to_vec())),
        )
        .await
    }

    /// Saves the content produced by `chunks` (any sizes) as the new generation of `item`; an
    /// `Err` from `chunks` aborts the save and leaves the previous generation current.
    pub async fn save_terminology_chunks<I>(
        &self,
        item: &TerminologyItem<'_>,
        chunks: I,
    ) -> Result<TerminologyHead>
    where
        I: IntoIterator<Item = Result<Vec<u8>>>,
    {
        if item.id.is_empty() || item.kind.is_empty() {
            return Err(StoreError::Config(
                "a terminology item needs an id and a kind".into(),
            ));
        }
        match self.pools() {
            Pools::Sqlite { write, .. } => {
                let mut tx = write.begin_with("BEGIN IMMEDIATE").await?;
                let head = save_in_tx!(&mut *tx, item, chunks);
                tx.commit().await?;
                Ok(head)
            }
            Pools::Postgres { pool, .. } => {
                let mut tx = pool.begin().await?;
                let head = save_in_tx!(&mut *tx, item, chunks);
                tx.commit().await?;
                Ok(head)
            }
        }
    }

    /// The current generation of `id` and its content, or `None` when it was never loaded.
    pub async fn read_terminology(&self, id: &str) -> Result<Option<(TerminologyHead, Vec<u8>)>> {
        match self.pools() {
            Pools::Sqlite { read, .. } => {
                // a read transaction in WAL mode sees one snapshot
                let mut tx = read.begin().await?;
                let r = read_in_tx!(&mut *tx, id);
                tx.commit().await?;
                Ok(r)
            }
            Pools::Postgres { pool, .. } => {
                let mut tx = pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?;
                let r = read_in_tx!(&mut *tx, id);
                tx.commit().await?;
                Ok(r)
            }
        }
    }

    /// Removes a loaded item (head and content) in one transaction; `false` when there was none.
    pub async fn delete_terminology(&self, id: &str) -> Result<bool> {
        macro_rules! delete_in_tx {
            ($tx:expr) => {{
                let tx = $tx;
                sqlx::query("DELETE FROM terminology_chunk WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM terminology_system WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    > 0
            }};
        }
        match self.pools() {
            Pools::Sqlite { write, .. } => {
                let mut tx = write.begin_with("BEGIN IMMEDIATE").await?;
                let found = delete_in_tx!(&mut *tx);
                tx.commit().await?;
                Ok(found)
            }
            Pools::Postgres { pool, .. } => {
                let mut tx = pool.begin().await?;
                let found = delete_in_tx!(&mut *tx);
                tx.commit().await?;
                Ok(found)
            }
        }
    }

    /// Number of content rows of every generation of `id` (tests: garbage collection).
    pub async fn terminology_chunk_rows(&self, id: &str) -> Result<i64> {
        crate::backend::on_read_pool!(self.pools(), |p| {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM terminology_chunk WHERE id = $1")
                .bind(id)
                .fetch_one(p)
                .await?;
            Ok(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreConfig;

    fn item(id: &str) -> TerminologyItem<'_> {
        TerminologyItem {
            id,
            kind: "code-system",
            url: Some("http://hl7.org/fhir/sid/icd-10-cm"),
            version: Some("v"),
            summary: Some("test"),
        }
    }

    /// Content of `n` bytes that differs per `seed`.
    fn content(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    async fn sqlite() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &StoreConfig {
                data_dir: dir.path().to_path_buf(),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
        (store, dir)
    }

    /// A store on a fresh database on `KILN_TEST_DATABASE_URL`, dropped by `drop_pg`.
    async fn postgres() -> Option<(Store, crate::test_pg::TestDatabase)> {
        let db = crate::test_pg::TestDatabase::create("kiln_txdb").await?;
        let store = Store::open(&db.config(4), None).await.unwrap();
        Some((store, db))
    }

    async fn drop_pg(store: Store, db: crate::test_pg::TestDatabase) {
        store.close().await;
        db.drop().await;
    }

    async fn atomic_saves(store: &Store) {
        assert!(store.terminology_heads().await.unwrap().is_empty());
        assert!(store.read_terminology("icd10cm").await.unwrap().is_none());

        // generation 1: several rows, read back byte for byte
        let v1 = content(2 * CHUNK_BYTES + 1234, 1);
        let h1 = store.save_terminology(&item("icd10cm"), &v1).await.unwrap();
        assert_eq!((h1.generation, h1.chunks, h1.size), (1, 3, v1.len() as i64));
        let (h, data) = store.read_terminology("icd10cm").await.unwrap().unwrap();
        assert_eq!(h, h1);
        assert!(data == v1);

        // a save whose content fails half-way: generation 1 stays current and complete, and
        // nothing of the failed generation is left behind
        let failing = (0..5).map(|i| {
            if i < 3 {
                Ok(content(CHUNK_BYTES, 7))
            } else {
                Err(StoreError::Corrupt("the release file is malformed".into()))
            }
        });
        let err = store
            .save_terminology_chunks(&item("icd10cm"), failing)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
        let (h, data) = store.read_terminology("icd10cm").await.unwrap().unwrap();
        assert_eq!(h, h1);
        assert!(data == v1);
        assert_eq!(store.terminology_chunk_rows("icd10cm").await.unwrap(), 3);

        // an interrupted save (the future dropped while it writes: what a killed process or a
        // lost connection amounts to): whenever the interruption lands, the item is either
        // still generation 1 or completely generation 2
        let big = content(12 * CHUNK_BYTES, 9);
        for delay_ms in [1u64, 5, 20] {
            let r = tokio::time::timeout(
                std::time::Duration::from_millis(delay_ms),
                store.save_terminology(&item("icd10cm"), &big),
            )
            .await;
            let (h, data) = store.read_terminology("icd10cm").await.unwrap().unwrap();
            match r {
                Err(_) if h.generation == h1.generation => assert!(data == v1),
                _ => {
                    assert!(data == big, "generation {} is not complete", h.generation);
                    break;
                }
            }
        }

        // the next save takes the next generation and collects every older one's rows
        let v3 = content(10, 3);
        let h3 = store
            .save_terminology(
                &TerminologyItem {
                    version: Some("v3"),
                    ..item("icd10cm")
                },
                &v3,
            )
            .await
            .unwrap();
        assert!(h3.generation > h1.generation);
        assert!(h3.loaded_at >= h1.loaded_at);
        assert_eq!(h3.version.as_deref(), Some("v3"));
        assert_eq!(store.terminology_chunk_rows("icd10cm").await.unwrap(), 1);
        assert_eq!(
            store.read_terminology("icd10cm").await.unwrap().unwrap().1,
            v3
        );

        // items are independent
        store.save_terminology(&item("loinc"), b"x").await.unwrap();
        let heads = store.terminology_heads().await.unwrap();
        assert_eq!(
            heads.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
            vec!["icd10cm", "loinc"]
        );
        assert_eq!(heads[0], h3);

        // an empty content is a valid (zero-row) generation
        let e = store.save_terminology(&item("empty"), b"").await.unwrap();
        assert_eq!((e.chunks, e.size), (0, 0));
        assert_eq!(
            store.read_terminology("empty").await.unwrap().unwrap().1,
            Vec::<u8>::new()
        );

        assert!(store.delete_terminology("loinc").await.unwrap());
        assert!(!store.delete_terminology("loinc").await.unwrap());
        assert!(store.read_terminology("loinc").await.unwrap().is_none());
        assert_eq!(store.terminology_chunk_rows("loinc").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn saves_are_atomic_sqlite() {
        let (store, _dir) = sqlite().await;
        atomic_saves(&store).await;
        store.close().await;
    }

    #[tokio::test]
    async fn saves_are_atomic_postgres() {
        let Some((store, db)) = postgres().await else {
            return;
        };
        atomic_saves(&store).await;
        drop_pg(store, db).await;
    }

    /// A load stopped half-way, as seen from another connection: while it writes, readers get
    /// the previous generation complete; when its connection dies (`kill`: the server side of
    /// a `kill -9`ed loader, done with `pg_terminate_backend`) or its input fails, everything
    /// of it is rolled back.
    async fn stopped_mid_load(store: &Store, kill: bool) {
        let v1 = content(CHUNK_BYTES + 10, 1);
        let h1 = store.save_terminology(&item("snomed"), &v1).await.unwrap();
        let (mid_tx, mid_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let chunks = (0..6).map(move |i| {
            if i == 3 {
                // half-way: tell the test, wait until it has looked (and maybe killed us);
                // the worker's other tasks move to another thread meanwhile
                tokio::task::block_in_place(|| {
                    mid_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                });
                if !kill {
                    return Err(StoreError::Corrupt("input failed half-way".into()));
                }
            }
            Ok(content(CHUNK_BYTES, 2))
        });
        let st = store.clone();
        let load =
            tokio::spawn(async move { st.save_terminology_chunks(&item("snomed"), chunks).await });
        tokio::task::spawn_blocking(move || mid_rx.recv().unwrap())
            .await
            .unwrap();
        let (h, data) = store.read_terminology("snomed").await.unwrap().unwrap();
        assert_eq!(h, h1, "a load in progress is invisible");
        assert!(data == v1);
        if kill {
            let killed: Vec<bool> = crate::backend::on_read_pool!(store.pools(), |p| {
                sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid() \
                     AND state LIKE 'idle in transaction%'",
                )
                .fetch_all(p)
                .await
                .unwrap()
            });
            assert_eq!(killed, vec![true], "the loader's connection");
        }
        go_tx.send(()).unwrap();
        assert!(load.await.unwrap().is_err());
        let (h, data) = store.read_terminology("snomed").await.unwrap().unwrap();
        assert_eq!(h, h1);
        assert!(data == v1);
        assert_eq!(store.terminology_chunk_rows("snomed").await.unwrap(), 2);
        // and the next load goes through
        let h2 = store
            .save_terminology(&item("snomed"), b"v2")
            .await
            .unwrap();
        assert!(h2.generation > h1.generation);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_stopped_half_way_changes_nothing_sqlite() {
        let (store, _dir) = sqlite().await;
        stopped_mid_load(&store, false).await;
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_load_changes_nothing_postgres() {
        let Some((store, db)) = postgres().await else {
            return;
        };
        stopped_mid_load(&store, true).await;
        drop_pg(store, db).await;
    }

    /// Two loads of one item at once on PostgreSQL: they queue on the item's row, both
    /// complete, and the item ends as the later one, complete.
    #[tokio::test]
    async fn concurrent_saves_queue_postgres() {
        let Some((store, db)) = postgres().await else {
            return;
        };
        let a = content(3 * CHUNK_BYTES, 1);
        let b = content(3 * CHUNK_BYTES + 5, 2);
        let it = item("snomed");
        let (ra, rb) = tokio::join!(
            store.save_terminology(&it, &a),
            store.save_terminology(&it, &b)
        );
        let (ha, hb) = (ra.unwrap(), rb.unwrap());
        assert_ne!(ha.generation, hb.generation);
        let (h, data) = store.read_terminology("snomed").await.unwrap().unwrap();
        assert_eq!(h.generation, ha.generation.max(hb.generation));
        assert!(data == if h.generation == ha.generation { a } else { b });
        assert_eq!(
            store.terminology_chunk_rows("snomed").await.unwrap(),
            h.chunks
        );
        drop_pg(store, db).await;
    }
}
