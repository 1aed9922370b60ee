//! History at instance, type and system level, newest first, paged by a keyset cursor on the
//! history row id (stable while new versions are written).

use crate::backend::Pools;
use crate::{Result, SqlValue, StoreError};

#[derive(Debug, Clone)]
pub enum HistoryScope {
    System,
    Type(String),
    Instance(String, String),
}

#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub scope: HistoryScope,
    /// `_since`: versions last updated at or after this instant (µs).
    pub since: Option<i64>,
    /// `_at`: versions that were current at this instant (µs).
    pub at: Option<i64>,
    pub count: usize,
    /// Opaque cursor from a previous page: only rows older than it.
    pub before: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub hid: i64,
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    pub last_updated: i64,
    pub deleted: bool,
    pub method: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// Cursor for the next (older) page, if there is one.
    pub next: Option<i64>,
    /// Total number of matching versions.
    pub total: i64,
}

pub(crate) async fn history(pools: &Pools, q: &HistoryQuery) -> Result<HistoryPage> {
    let mut conds: Vec<String> = Vec::new();
    let mut params: Vec<SqlValue> = Vec::new();
    let p = |v: SqlValue, params: &mut Vec<SqlValue>| {
        params.push(v);
        format!("${}", params.len())
    };
    match &q.scope {
        HistoryScope::System => {}
        HistoryScope::Type(t) => {
            let a = p(SqlValue::Text(t.clone()), &mut params);
            conds.push(format!("h.res_type = {a}"));
        }
        HistoryScope::Instance(t, id) => {
            let a = p(SqlValue::Text(t.clone()), &mut params);
            let b = p(SqlValue::Text(id.clone()), &mut params);
            conds.push(format!("h.res_type = {a} AND h.res_id = {b}"));
        }
    }
    if let Some(since) = q.since {
        let a = p(SqlValue::Int(since), &mut params);
        conds.push(format!("h.last_updated >= {a}"));
    }
    if let Some(at) = q.at {
        let a = p(SqlValue::Int(at), &mut params);
        conds.push(format!(
            "h.last_updated <= {a} AND NOT EXISTS (SELECT 1 FROM resource_history h2 \
             WHERE h2.res_type = h.res_type AND h2.res_id = h.res_id AND h2.version > h.version \
             AND h2.last_updated <= {a})"
        ));
    }
    let where_all = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    let count_sql = format!("SELECT COUNT(*) FROM resource_history h {where_all}");
    let mut page_conds = conds.clone();
    let mut page_params = params.clone();
    if let Some(b) = q.before {
        page_params.push(SqlValue::Int(b));
        page_conds.push(format!("h.hid < ${}", page_params.len()));
    }
    let where_page = if page_conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", page_conds.join(" AND "))
    };
    let limit = q.count.clamp(0, 1000) as i64 + 1;
    let sql = format!(
        "SELECT h.hid, h.res_type, h.res_id, h.version, h.last_updated, h.deleted, h.method, h.content \
         FROM resource_history h {where_page} ORDER BY h.hid DESC LIMIT {limit}"
    );
    let total: i64 = {
        let rows = pools.query_rows(&count_sql, &params).await?;
        rows.first()
            .and_then(|r| r.first())
            .and_then(SqlValue::as_i64)
            .unwrap_or(0)
    };
    let mut entries = pools
        .query_rows(&sql, &page_params)
        .await?
        .into_iter()
        .map(history_entry)
        .collect::<Result<Vec<HistoryEntry>>>()?;
    let next = if entries.len() as i64 > limit - 1 {
        entries.truncate((limit - 1) as usize);
        entries.last().map(|e| e.hid)
    } else {
        None
    };
    Ok(HistoryPage {
        entries,
        next,
        total,
    })
}

/// A row of the history page query (`hid, res_type, res_id, version, last_updated, deleted,
/// method, content`).
fn history_entry(row: Vec<SqlValue>) -> Result<HistoryEntry> {
    let mut cols = row.into_iter();
    let mut next = |name: &str| {
        cols.next()
            .ok_or_else(|| StoreError::Corrupt(format!("history row without {name}")))
    };
    let int = |v: SqlValue, name: &str| {
        v.as_i64()
            .ok_or_else(|| StoreError::Corrupt(format!("history {name} is not an integer")))
    };
    let text = |v: SqlValue, name: &str| match v {
        SqlValue::Text(s) => Ok(s),
        _ => Err(StoreError::Corrupt(format!("history {name} is not text"))),
    };
    Ok(HistoryEntry {
        hid: int(next("hid")?, "hid")?,
        resource_type: text(next("res_type")?, "res_type")?,
        id: text(next("res_id")?, "res_id")?,
        version: int(next("version")?, "version")?,
        last_updated: int(next("last_updated")?, "last_updated")?,
        deleted: int(next("deleted")?, "deleted")? != 0,
        method: text(next("method")?, "method")?,
        content: text(next("content")?, "content")?,
    })
}
