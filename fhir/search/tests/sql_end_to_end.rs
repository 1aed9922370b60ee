//! End-to-end: index Synthea resources into a real database with the generated schema and
//! INSERTs, run planned searches (all pages via keyset cursors) and compare the results with
//! the in-memory matcher. SQLite in memory always; PostgreSQL when `KILN_TEST_DATABASE_URL` is set
//! (a schema `kiln_search_test_<pid>` of its own, dropped afterwards). Skips with a notice when `../shared` is absent.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use kiln_search::{
    estimate_sql, include_sql, index_resource, insert_batch, matches, parse, plan, plan_with,
    schema, Dialect, Estimates, KeyKind, PageRequest, Registry, SearchQuery, SqlValue,
};
use serde_json::Value;
use sqlx::{Connection, Row};

fn shared() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/synthea-r4"
    ));
    if p.is_dir() {
        Some(p)
    } else {
        println!(
            "NOTICE: {} absent; skipping the end-to-end search test",
            p.display()
        );
        None
    }
}

/// Loads `n` Synthea bundles, rewriting `urn:uuid:` and conditional (`Type?identifier=`)
/// references to `Type/id` as the store's transaction processing would.
fn load_corpus(n: usize) -> Option<Vec<Value>> {
    let dir = shared()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    // identifier → Type/id across all loaded bundles (Organization / Practitioner are shared)
    let mut by_ident: HashMap<String, String> = HashMap::new();
    let mut raw = Vec::new();
    for f in files
        .iter()
        .filter(|f| {
            !f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("hospital")
                && !f
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("practitioner")
        })
        .take(n)
        .chain(files.iter().filter(|f| {
            let n = f.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with("hospital") || n.starts_with("practitioner")
        }))
    {
        let text = std::fs::read_to_string(f).ok()?;
        let b: Value = serde_json::from_str(&text).ok()?;
        for e in b["entry"].as_array()? {
            let r = &e["resource"];
            let t = r["resourceType"].as_str()?;
            let id = r["id"].as_str()?;
            for i in r["identifier"].as_array().into_iter().flatten() {
                if let (Some(s), Some(v)) = (i["system"].as_str(), i["value"].as_str()) {
                    by_ident.insert(format!("{t}?identifier={s}|{v}"), format!("{t}/{id}"));
                }
            }
        }
        raw.push(b);
    }
    for b in raw {
        let mut text = b.to_string();
        for e in b["entry"].as_array()? {
            let full = e["fullUrl"].as_str()?;
            let t = e["resource"]["resourceType"].as_str()?;
            let id = e["resource"]["id"].as_str()?;
            text = text.replace(&format!("\"{full}\""), &format!("\"{t}/{id}\""));
        }
        let b: Value = serde_json::from_str(&text).ok()?;
        for e in b["entry"].as_array()? {
            let mut r = e["resource"].clone();
            let t = r["resourceType"].as_str()?.to_string();
            let id = r["id"].as_str()?.to_string();
            if !seen.insert(format!("{t}/{id}")) {
                continue;
            }
            fix_conditional(&mut r, &by_ident);
            r["meta"] = serde_json::json!({"lastUpdated": format!("2024-01-{:02}T00:00:00Z", 1 + out.len() % 28)});
            out.push(r);
        }
    }
    Some(out)
}

fn fix_conditional(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "reference" {
                    if let Some(s) = x.as_str() {
                        if let Some(t) = map.get(s) {
                            *x = Value::String(t.clone());
                        }
                    }
                } else {
                    fix_conditional(x, map);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| fix_conditional(x, map)),
        _ => {}
    }
}

enum Db {
    Sqlite(sqlx::SqliteConnection),
    Pg(sqlx::PgConnection),
}

macro_rules! bound {
    ($sql:expr, $params:expr) => {{
        let mut q = sqlx::query(sqlx::AssertSqlSafe($sql.to_string()));
        for p in $params.iter() {
            q = match p {
                SqlValue::Null => q.bind(None::<String>),
                SqlValue::Int(i) => q.bind(*i),
                SqlValue::Real(f) => q.bind(*f),
                SqlValue::Text(s) => q.bind(s.clone()),
            };
        }
        q
    }};
}

macro_rules! decode_row {
    ($row:expr, $kinds:expr) => {{
        let rid: i64 = $row.try_get(0).unwrap();
        let mut keys = Vec::new();
        for (i, k) in $kinds.iter().enumerate() {
            let v = match k {
                KeyKind::Int => $row
                    .try_get::<Option<i64>, _>(i + 1)
                    .unwrap()
                    .map(SqlValue::Int),
                KeyKind::Real => $row
                    .try_get::<Option<f64>, _>(i + 1)
                    .unwrap()
                    .map(SqlValue::Real),
                KeyKind::Text => $row
                    .try_get::<Option<String>, _>(i + 1)
                    .unwrap()
                    .map(SqlValue::Text),
            };
            keys.push(v.unwrap_or(SqlValue::Null));
        }
        (rid, keys)
    }};
}

impl Db {
    fn dialect(&self) -> Dialect {
        match self {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Pg(_) => Dialect::Postgres,
        }
    }

    async fn exec(&mut self, sql: &str, params: &[SqlValue]) {
        let r = match self {
            Db::Sqlite(c) => bound!(sql, params).execute(&mut *c).await.map(|_| ()),
            Db::Pg(c) => bound!(sql, params).execute(&mut *c).await.map(|_| ()),
        };
        if let Err(e) = r {
            panic!("{e}\nSQL: {}", &sql[..sql.len().min(400)]);
        }
    }

    async fn rows(
        &mut self,
        sql: &str,
        params: &[SqlValue],
        kinds: &[KeyKind],
    ) -> Vec<(i64, Vec<SqlValue>)> {
        match self {
            Db::Sqlite(c) => {
                let rows = bound!(sql, params)
                    .fetch_all(&mut *c)
                    .await
                    .unwrap_or_else(|e| panic!("{e}\nSQL: {}", &sql[..sql.len().min(400)]));
                rows.iter().map(|r| decode_row!(r, kinds)).collect()
            }
            Db::Pg(c) => {
                let rows = bound!(sql, params)
                    .fetch_all(&mut *c)
                    .await
                    .unwrap_or_else(|e| panic!("{e}\nSQL: {}", &sql[..sql.len().min(400)]));
                rows.iter().map(|r| decode_row!(r, kinds)).collect()
            }
        }
    }

    /// The integer columns of the first row.
    async fn ints(&mut self, sql: &str, params: &[SqlValue]) -> Vec<i64> {
        macro_rules! first_row {
            ($c:expr) => {{
                let row = bound!(sql, params)
                    .fetch_one(&mut *$c)
                    .await
                    .unwrap_or_else(|e| panic!("{e}\nSQL: {sql}"));
                (0..row.len())
                    .map(|i| row.try_get::<i64, _>(i).unwrap())
                    .collect()
            }};
        }
        match self {
            Db::Sqlite(c) => first_row!(c),
            Db::Pg(c) => first_row!(c),
        }
    }

    async fn count(&mut self, sql: &str, params: &[SqlValue]) -> i64 {
        match self {
            Db::Sqlite(c) => bound!(sql, params)
                .fetch_one(&mut *c)
                .await
                .unwrap()
                .try_get(0)
                .unwrap(),
            Db::Pg(c) => bound!(sql, params)
                .fetch_one(&mut *c)
                .await
                .unwrap()
                .try_get(0)
                .unwrap(),
        }
    }
}

struct Loaded {
    resources: Vec<Value>,
    /// rid → index in `resources`
    by_rid: HashMap<i64, usize>,
}

async fn load(db: &mut Db, registry: &Registry, resources: Vec<Value>) -> Loaded {
    let d = db.dialect();
    let table = match d {
        Dialect::Sqlite => "CREATE TABLE resources (rid INTEGER PRIMARY KEY, res_type TEXT NOT NULL, res_id TEXT NOT NULL, version INTEGER NOT NULL, last_updated BIGINT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, content TEXT NOT NULL, UNIQUE(res_type, res_id))",
        Dialect::Postgres => "CREATE TABLE resources (rid BIGSERIAL PRIMARY KEY, res_type TEXT NOT NULL, res_id TEXT NOT NULL, version INTEGER NOT NULL, last_updated BIGINT NOT NULL, deleted SMALLINT NOT NULL DEFAULT 0, content TEXT NOT NULL, UNIQUE(res_type, res_id))",
    };
    db.exec(table, &[]).await;
    for s in schema(d) {
        db.exec(&s, &[]).await;
    }
    // schema is idempotent
    for s in schema(d) {
        db.exec(&s, &[]).await;
    }
    db.exec("BEGIN", &[]).await;
    let started = Instant::now();
    let mut by_rid = HashMap::new();
    let mut index_rows = 0;
    let mut extract = std::time::Duration::ZERO;
    let mut resource_insert = std::time::Duration::ZERO;
    for chunk_start in (0..resources.len()).step_by(200) {
        let chunk = &resources[chunk_start..(chunk_start + 200).min(resources.len())];
        let mut sql = String::from("INSERT INTO resources (rid, res_type, res_id, version, last_updated, deleted, content) VALUES ");
        let mut params = Vec::new();
        let mut entries = Vec::new();
        for (i, r) in chunk.iter().enumerate() {
            let rid = (chunk_start + i + 1) as i64;
            by_rid.insert(rid, chunk_start + i);
            if i > 0 {
                sql.push(',');
            }
            let n = params.len();
            // `?N` on SQLite: `$N` are named parameters there, quadratic to bind in bulk
            let m = if d == Dialect::Sqlite { '?' } else { '$' };
            sql.push_str(&format!(
                "({m}{},{m}{},{m}{},1,{m}{},0,{m}{})",
                n + 1,
                n + 2,
                n + 3,
                n + 4,
                n + 5
            ));
            let lu =
                kiln_search::value::parse_date_range(r["meta"]["lastUpdated"].as_str().unwrap())
                    .unwrap()
                    .low;
            params.extend([
                SqlValue::Int(rid),
                SqlValue::Text(r["resourceType"].as_str().unwrap().into()),
                SqlValue::Text(r["id"].as_str().unwrap().into()),
                SqlValue::Int(lu),
                SqlValue::Text(r.to_string()),
            ]);
            let t = Instant::now();
            entries.push((rid, index_resource(registry, r)));
            extract += t.elapsed();
        }
        let t = Instant::now();
        db.exec(&sql, &params).await;
        resource_insert += t.elapsed();
        index_rows += entries.iter().map(|(_, e)| e.len()).sum::<usize>();
        let refs: Vec<(i64, &kiln_search::IndexEntries)> =
            entries.iter().map(|(r, e)| (*r, e)).collect();
        for (s, p) in insert_batch(d, &refs) {
            db.exec(&s, &p).await;
        }
    }
    db.exec("COMMIT", &[]).await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{d:?}: indexed {} resources ({index_rows} index rows) in {secs:.2}s = {:.0} resources/s (extraction {extract:?}, resource rows {resource_insert:?})",
        resources.len(),
        resources.len() as f64 / secs
    );
    Loaded { resources, by_rid }
}

fn params(list: &[(&str, String)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.clone()))
        .collect()
}

/// Runs a query through every page; checks ordering invariants; returns the ids in order.
async fn run_all_pages(
    db: &mut Db,
    q: &SearchQuery,
    loaded: &Loaded,
    page_size: usize,
    estimates: &Estimates,
) -> Vec<String> {
    let d = db.dialect();
    let mut out = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let p = plan_with(
            q,
            d,
            &PageRequest {
                count: page_size,
                cursor: cursor.clone(),
            },
            estimates,
        )
        .unwrap();
        let t = Instant::now();
        let rows = db.rows(&p.sql, &p.params, &p.sort_keys).await;
        if std::env::var("KILN_SEARCH_TEST_SQL").is_ok() {
            println!("  page query: {:?}", t.elapsed());
        }
        let more = rows.len() > page_size;
        for (rid, _) in rows.iter().take(page_size) {
            let r = &loaded.resources[loaded.by_rid[rid]];
            out.push(format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            ));
        }
        pages += 1;
        assert!(pages < 10_000);
        if !more {
            if cursor.is_none() {
                let total = db.count(&p.count_sql, &p.count_params).await;
                assert_eq!(
                    total as usize,
                    out.len(),
                    "_total for {:?}",
                    q.self_link_params()
                );
            }
            break;
        }
        let (rid, keys) = &rows[page_size - 1];
        cursor = Some(p.next_cursor(keys, *rid));
    }
    out
}

async fn check_against_matcher(
    db: &mut Db,
    registry: &Registry,
    loaded: &Loaded,
    rt: &str,
    list: &[(&str, String)],
) -> usize {
    let q = parse(registry, Some(rt), &params(list), true)
        .unwrap_or_else(|e| panic!("{list:?}: {e:?}"));
    if std::env::var("KILN_SEARCH_TEST_SQL").is_ok() {
        let p = plan(
            &q,
            db.dialect(),
            &PageRequest {
                count: 10,
                cursor: None,
            },
        )
        .unwrap();
        println!("SQL {rt}?{list:?}\n{}\n{:?}", p.sql, p.params);
        if let Db::Sqlite(c) = db {
            let eqp = format!("EXPLAIN QUERY PLAN {}", p.sql);
            for row in bound!(eqp, p.params).fetch_all(&mut *c).await.unwrap() {
                let detail: String = row.try_get(3).unwrap();
                println!("  plan: {detail}");
            }
        }
    }
    // the plans the database's estimates choose, and the other forms forced: every range
    // counted as large (a `_has` probed per candidate) or as small (collected as a set)
    let mut regimes = vec![("no estimates", Estimates::new())];
    if let Some((sql, ps, keys)) = estimate_sql(&q, db.dialect()) {
        let counts = db.ints(&sql, &ps).await;
        assert_eq!(counts.len(), keys.len());
        let real: Estimates = keys
            .iter()
            .cloned()
            .zip(counts.iter().map(|n| *n as u64))
            .collect();
        let large: Estimates = keys
            .iter()
            .map(|k| (k.clone(), kiln_search::plan::ESTIMATE_CAP))
            .collect();
        let small: Estimates = keys.iter().map(|k| (k.clone(), 0)).collect();
        regimes.extend([
            ("estimated", real),
            ("all large", large),
            ("all small", small),
        ]);
    }
    let mut results = Vec::new();
    for (name, est) in &regimes[1..] {
        results.push((*name, run_all_pages(db, &q, loaded, 100_000, est).await));
    }
    let t0 = Instant::now();
    let got = run_all_pages(db, &q, loaded, 100_000, &regimes[0].1).await;
    let one_page = t0.elapsed();
    for (name, other) in results {
        assert_eq!(
            other, got,
            "{name}: other results or order for {rt}?{list:?}"
        );
    }
    let got_set: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(
        got_set.len(),
        got.len(),
        "duplicates across pages for {list:?}"
    );
    let expected: BTreeSet<String> = loaded
        .resources
        .iter()
        .filter(|r| matches(registry, &q, r))
        .map(|r| {
            format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(got_set, expected, "{:?} {rt}?{list:?}", db.dialect());
    // again in small pages (about 8 pages) through keyset cursors: same results, same order
    let small = (expected.len() / 8).max(3);
    let t1 = Instant::now();
    let paged = run_all_pages(db, &q, loaded, small, &Estimates::new()).await;
    for (name, est) in &regimes[1..] {
        let other = run_all_pages(db, &q, loaded, small, est).await;
        assert_eq!(other, got, "{name}, in pages: {rt}?{list:?}");
    }
    assert_eq!(
        paged, got,
        "paging changed the results or their order for {list:?}"
    );
    println!(
        "{:?} {rt}?{list:?}: {} results ({:?} in one page, {:?} in pages of {small})",
        db.dialect(),
        got.len(),
        one_page,
        t1.elapsed()
    );
    got.len()
}

async fn scenario(mut db: Db, corpus: Vec<Value>) {
    let registry = Registry::r4();
    let loaded = load(&mut db, &registry, corpus).await;
    let first_patient = loaded
        .resources
        .iter()
        .find(|r| r["resourceType"] == "Patient")
        .unwrap()
        .clone();
    let pid = first_patient["id"].as_str().unwrap().to_string();
    let city = first_patient["address"][0]["city"]
        .as_str()
        .unwrap_or("Boston")
        .to_string();
    let family = first_patient["name"][0]["family"]
        .as_str()
        .unwrap()
        .to_string();
    let s = |x: &str| x.to_string();
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, usize);
    let cases: Vec<Case> = vec![
        // two ranges (a reference and a token): either may drive
        (
            "Observation",
            vec![
                ("code", s("http://loinc.org|29463-7")),
                ("patient", pid.clone()),
            ],
            1,
        ),
        (
            "Observation",
            vec![
                ("subject", format!("Patient/{pid}")),
                ("status", s("final")),
            ],
            1,
        ),
        ("Patient", vec![("gender", s("female"))], 1),
        ("Patient", vec![("name", family[..3].to_lowercase())], 1),
        ("Patient", vec![("family:exact", family.clone())], 1),
        ("Patient", vec![("name:contains", s("an"))], 1),
        (
            "Patient",
            vec![("birthdate", s("ge1960")), ("birthdate", s("lt1990"))],
            0,
        ),
        ("Patient", vec![("address-city:exact", city.clone())], 1),
        ("Patient", vec![("_id", pid.clone())], 1),
        ("Patient", vec![("deceased", s("true"))], 0),
        (
            "Patient",
            vec![(
                "_filter",
                s("gender eq male and (birthdate lt 1960 or name sw \"a\")"),
            )],
            0,
        ),
        ("Patient", vec![("_sort", s("birthdate"))], 1),
        ("Patient", vec![("_sort", s("-family,_id"))], 1),
        (
            "Patient",
            vec![(
                "identifier",
                s("https://github.com/synthetichealth/synthea|") + &pid,
            )],
            1,
        ),
        (
            "Observation",
            vec![("code", s("http://loinc.org|8302-2"))],
            1,
        ),
        (
            "Observation",
            vec![("code", s("8302-2,29463-7")), ("_sort", s("-date"))],
            1,
        ),
        ("Observation", vec![("value-quantity", s("gt100"))], 1),
        (
            "Observation",
            vec![("value-quantity", s("ge1.6|http://unitsofmeasure.org|m"))],
            0,
        ),
        (
            "Observation",
            vec![("date", s("ge2015")), ("_sort", s("-date"))],
            1,
        ),
        (
            "Observation",
            vec![(
                "component-code-value-quantity",
                s("http://loinc.org|8480-6$gt130"),
            )],
            0,
        ),
        (
            "Observation",
            vec![("subject", format!("Patient/{pid}"))],
            1,
        ),
        (
            "Observation",
            vec![("patient", pid.clone()), ("category", s("vital-signs"))],
            1,
        ),
        ("Observation", vec![("status:not", s("final"))], 0),
        ("Observation", vec![("code:missing", s("true"))], 0),
        (
            "Observation",
            vec![
                ("value-quantity:missing", s("true")),
                ("patient", pid.clone()),
            ],
            0,
        ),
        (
            "Observation",
            vec![
                ("_sort", s("value-quantity,-date")),
                ("patient", pid.clone()),
            ],
            1,
        ),
        ("Condition", vec![("code:text", s("diabetes"))], 0),
        (
            "Condition",
            vec![
                ("onset-date", s("lt2000-01-01")),
                ("clinical-status", s("active")),
            ],
            0,
        ),
        (
            "Encounter",
            vec![("class", s("AMB")), ("_sort", s("date"))],
            1,
        ),
        (
            "Encounter",
            vec![("date", s("2015")), ("_lastUpdated", s("ge2024-01-10"))],
            0,
        ),
        (
            "MedicationRequest",
            vec![("intent", s("order")), ("status", s("active,stopped"))],
            0,
        ),
        (
            "Immunization",
            vec![("vaccine-code", s("http://hl7.org/fhir/sid/cvx|140"))],
            0,
        ),
        ("Claim", vec![("patient", pid.clone())], 1),
        ("Organization", vec![("name", s("a"))], 0),
        ("Practitioner", vec![("_content", s("dr."))], 0),
    ];
    let mut nonzero = 0;
    for (rt, list, min) in &cases {
        let n = check_against_matcher(&mut db, &registry, &loaded, rt, list).await;
        assert!(n >= *min, "{rt}?{list:?} expected results");
        if n > 0 {
            nonzero += 1;
        }
    }
    assert!(
        nonzero * 10 >= cases.len() * 8,
        "most queries should return something ({nonzero})"
    );

    // sort order: birthdate ascending, missing last
    let q = parse(
        &registry,
        Some("Patient"),
        &params(&[("_sort", s("birthdate"))]),
        true,
    )
    .unwrap();
    let ids = run_all_pages(&mut db, &q, &loaded, 5, &Estimates::new()).await;
    let dates: Vec<String> = ids
        .iter()
        .map(|i| {
            loaded
                .resources
                .iter()
                .find(|r| format!("Patient/{}", r["id"].as_str().unwrap()) == *i)
                .unwrap()["birthDate"]
                .as_str()
                .unwrap_or("~")
                .to_string()
        })
        .collect();
    let mut sorted = dates.clone();
    sorted.sort();
    assert_eq!(dates, sorted);

    // chain: observations whose subject is a female patient
    let q = parse(
        &registry,
        Some("Observation"),
        &params(&[
            ("subject:Patient.gender", s("female")),
            ("code", s("8302-2")),
        ]),
        true,
    )
    .unwrap();
    let got: BTreeSet<String> = run_all_pages(&mut db, &q, &loaded, 50, &Estimates::new())
        .await
        .into_iter()
        .collect();
    let females: BTreeSet<String> = loaded
        .resources
        .iter()
        .filter(|r| r["resourceType"] == "Patient" && r["gender"] == "female")
        .map(|r| format!("Patient/{}", r["id"].as_str().unwrap()))
        .collect();
    let expected: BTreeSet<String> = loaded
        .resources
        .iter()
        .filter(|r| {
            r["resourceType"] == "Observation"
                && r["code"]["coding"][0]["code"] == "8302-2"
                && females.contains(r["subject"]["reference"].as_str().unwrap_or(""))
        })
        .map(|r| format!("Observation/{}", r["id"].as_str().unwrap()))
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(got, expected, "chain");

    // two-level chain: Encounter?subject:Patient.general-practitioner.name=<x> — just must run
    let q = parse(
        &registry,
        Some("Encounter"),
        &params(&[("subject:Patient.general-practitioner.name", s("a"))]),
        true,
    )
    .unwrap();
    run_all_pages(&mut db, &q, &loaded, 50, &Estimates::new()).await;

    // _has: patients with a body-height observation above 180 cm
    let q = parse(
        &registry,
        Some("Patient"),
        &params(&[(
            "_has:Observation:patient:value-quantity",
            s("gt180|http://unitsofmeasure.org|cm"),
        )]),
        true,
    )
    .unwrap();
    let got: BTreeSet<String> = run_all_pages(&mut db, &q, &loaded, 50, &Estimates::new())
        .await
        .into_iter()
        .collect();
    let oq = parse(
        &registry,
        Some("Observation"),
        &params(&[("value-quantity", s("gt180|http://unitsofmeasure.org|cm"))]),
        true,
    )
    .unwrap();
    let expected: BTreeSet<String> = loaded
        .resources
        .iter()
        .filter(|r| matches(&registry, &oq, r))
        .filter_map(|r| r["subject"]["reference"].as_str().map(str::to_string))
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(got, expected, "_has");

    // _has over one token of the sources: a set of the referenced ids or a probe per patient
    // through the references to it, by the estimate of the sources' range; same patients
    let q = parse(
        &registry,
        Some("Patient"),
        &params(&[("_has:Observation:patient:code", s("8302-2"))]),
        true,
    )
    .unwrap();
    let (sql, ps, keys) = estimate_sql(&q, db.dialect())
        .map(|(sql, ps, keys)| (Some(sql), ps, keys))
        .unwrap_or((None, Vec::new(), Vec::new()));
    let oq = parse(
        &registry,
        Some("Observation"),
        &params(&[("code", s("8302-2"))]),
        true,
    )
    .unwrap();
    let expected: Vec<String> = {
        let refs: BTreeSet<String> = loaded
            .resources
            .iter()
            .filter(|r| matches(&registry, &oq, r))
            .filter_map(|r| r["subject"]["reference"].as_str().map(str::to_string))
            .collect();
        // in rid order, as the page is
        let mut by_rid: Vec<(i64, String)> = loaded
            .by_rid
            .iter()
            .map(|(rid, i)| (*rid, &loaded.resources[*i]))
            .filter(|(_, r)| r["resourceType"] == "Patient")
            .map(|(rid, r)| (rid, format!("Patient/{}", r["id"].as_str().unwrap())))
            .filter(|(_, id)| refs.contains(id))
            .collect();
        by_rid.sort();
        by_rid.into_iter().map(|(_, id)| id).collect()
    };
    assert!(!expected.is_empty());
    let mut regimes = vec![Estimates::new()];
    if let Some(sql) = sql {
        assert_eq!(keys, vec!["t|Observation|code|*|8302-2".to_string()]);
        let n = db.ints(&sql, &ps).await[0];
        assert!(n > 0, "estimate of the sources' range");
        for v in [n as u64, 0, kiln_search::plan::ESTIMATE_CAP] {
            regimes.push(keys.iter().map(|k| (k.clone(), v)).collect());
        }
    }
    for est in &regimes {
        for page in [50, 3] {
            let got = run_all_pages(&mut db, &q, &loaded, page, est).await;
            assert_eq!(
                got, expected,
                "_has by token, estimates {est:?}, pages of {page}"
            );
        }
    }

    // compartment
    let q = parse(&registry, Some("Condition"), &[], true)
        .unwrap()
        .with_compartment(&registry, "Patient", &pid)
        .unwrap();
    let got = run_all_pages(&mut db, &q, &loaded, 50, &Estimates::new()).await;
    let expected = loaded
        .resources
        .iter()
        .filter(|r| matches(&registry, &q, r))
        .count();
    assert_eq!(got.len(), expected);
    assert!(expected > 0);

    let q = parse(&registry, Some("Patient"), &[], true)
        .unwrap()
        .with_compartment(&registry, "Patient", &pid)
        .unwrap();
    assert_eq!(
        run_all_pages(&mut db, &q, &loaded, 50, &Estimates::new()).await,
        vec![format!("Patient/{pid}")]
    );

    // includes / revincludes
    let q = parse(
        &registry,
        Some("Patient"),
        &params(&[
            ("_id", pid.clone()),
            ("_revinclude", s("Encounter:patient")),
            ("_include", s("Patient:general-practitioner")),
        ]),
        true,
    )
    .unwrap();
    let p = plan(
        &q,
        db.dialect(),
        &PageRequest {
            count: 10,
            cursor: None,
        },
    )
    .unwrap();
    let rows = db.rows(&p.sql, &p.params, &p.sort_keys).await;
    assert_eq!(rows.len(), 1);
    let (sql, ps) = include_sql(&q, db.dialect(), &[rows[0].0], false).unwrap();
    let inc = db.rows(&sql, &ps, &[]).await;
    let encounters = loaded
        .resources
        .iter()
        .filter(|r| {
            r["resourceType"] == "Encounter"
                && r["subject"]["reference"] == format!("Patient/{pid}")
        })
        .count();
    let gps = first_patient["generalPractitioner"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0);
    assert_eq!(inc.len(), encounters + gps, "included rids");
    assert!(encounters > 0);
    // iterate level: Encounter → its Patient (iterate include)
    let q = parse(
        &registry,
        Some("Encounter"),
        &params(&[
            ("patient", pid.clone()),
            ("_include:iterate", s("Encounter:subject")),
        ]),
        true,
    )
    .unwrap();
    let p = plan(
        &q,
        db.dialect(),
        &PageRequest {
            count: 3,
            cursor: None,
        },
    )
    .unwrap();
    let rows = db.rows(&p.sql, &p.params, &p.sort_keys).await;
    let rids: Vec<i64> = rows.iter().take(3).map(|r| r.0).collect();
    let (sql, ps) = include_sql(&q, db.dialect(), &rids, true).unwrap();
    let inc = db.rows(&sql, &ps, &[]).await;
    assert_eq!(inc.len(), 1, "UNION de-duplicates the shared patient");
}

#[tokio::test]
async fn sqlite_end_to_end() {
    let Some(corpus) = load_corpus(bundle_count()) else {
        return;
    };
    // KILN_SEARCH_TEST_SQLITE=/tmp/x.db keeps the database for inspection
    let url = match std::env::var("KILN_SEARCH_TEST_SQLITE") {
        Ok(path) => {
            let _ = std::fs::remove_file(&path);
            format!("sqlite://{path}?mode=rwc")
        }
        Err(_) => "sqlite::memory:".to_string(),
    };
    let conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    scenario(Db::Sqlite(conn), corpus).await;
}

#[tokio::test]
async fn postgres_end_to_end() {
    let Ok(url) = std::env::var("KILN_TEST_DATABASE_URL") else {
        println!("NOTICE: KILN_TEST_DATABASE_URL unset; skipping the PostgreSQL search test");
        return;
    };
    let Some(corpus) = load_corpus(bundle_count()) else {
        return;
    };
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    // a schema of this run's own, so concurrent runs on one database cannot interfere
    let schema = format!("kiln_search_test_{}", std::process::id());
    for s in [
        format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        format!("CREATE SCHEMA {schema}"),
        format!("SET search_path TO {schema}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(s))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    scenario(Db::Pg(conn), corpus).await;
    if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&mut c)
        .await;
    }
}

/// Patient bundles to load: 8 by default, `KILN_SEARCH_TEST_BUNDLES=100` for the whole corpus.
fn bundle_count() -> usize {
    std::env::var("KILN_SEARCH_TEST_BUNDLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}
