//! `kiln-search`: the FHIR R4 search engine — SearchParameter registry, index extraction,
//! query parsing, SQL planning (SQLite + PostgreSQL) and in-memory matching.
//!
//! This crate never touches the database: it produces SQL text + parameters (placeholders
//! `$1, $2, …`) and index rows; `kiln-store` executes them.
//!
//! Integration, in order:
//! 1. [`Registry::r4()`] once (official parameters + Patient compartment); [`Registry::add`] for
//!    custom SearchParameter resources.
//! 2. Migration: run every statement of [`schema`] (idempotent; after `resources` exists).
//! 3. Every write, in the resource's transaction: [`delete_statements`] with `$1` = rid, then
//!    [`index_resource`] → [`IndexEntries::insert_statements`] (or [`insert_batch`] for bulk).
//!    Bind [`SqlValue::Null`] as a NULL text (`Option::<String>::None`).
//! 4. Search: [`parse`] (+ [`SearchQuery::with_compartment`]) → [`plan`] → run `sql`, fetch
//!    `page_size + 1` rows of `rid, k0, k1…` (kinds in `sort_keys`); if the extra row is present,
//!    the next link carries `_cursor=` [`SqlPlan::next_cursor`] of the last row of the page.
//!    `_total=accurate` → `count_sql`. Includes: [`include_sql`] with the page's rids, then with
//!    the new rids and `iterate_only = true` until nothing new.
//! 5. Conditional operations / subscriptions: [`matches`].

pub mod codes;
pub mod filter;
pub mod index;
pub mod matcher;
pub mod path;
pub mod plan;
pub mod query;
pub mod registry;
pub mod value;

pub use codes::{CodeSetRequest, PendingCodeSet};
pub use index::{
    contained_resources, delete_statements, index_contained, index_resource, insert_batch, schema,
    IndexEntries,
};
pub use matcher::matches;
pub use plan::{
    estimate_sql, include_sql, included_rows_sql, page_resource_columns, page_with_resources_sql,
    plan, plan_with, Estimates, KeyKind, PageRequest, SqlPlan,
};
pub use query::{
    parse, Compartment, Criterion, Include, Modifier, ParamClause, Prefix, SearchQuery,
    SearchValue, SortKey, ANY_COMPARTMENT,
};
pub use registry::{ParamType, Registry, SearchParam};

/// SQL dialect of the generated statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A bound SQL parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}
