//! `kiln-search`: the FHIR R4 search engine — SearchParameter registry, index extraction,
//! query parsing, SQL planning (SQLite + PostgreSQL) and in-memory matching.
//!
//! This crate never touches the database: it produces SQL text + parameters (placeholders
//! `$1, $2, …`) and index rows; `kiln-store` executes them.

pub mod filter;
pub mod index;
pub mod matcher;
pub mod path;
pub mod plan;
pub mod query;
pub mod registry;
pub mod value;

pub use index::{delete_statements, index_resource, insert_batch, schema, IndexEntries};
pub use matcher::matches;
pub use plan::{include_sql, plan, KeyKind, PageRequest, SqlPlan};
pub use query::{
    parse, Criterion, Include, Modifier, ParamClause, Prefix, SearchQuery, SearchValue, SortKey,
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
