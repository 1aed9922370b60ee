//! `kiln-fhirpath`: a FHIRPath (N1 + the FHIR R4 additions) engine over `serde_json::Value`
//! resources.
//!
//! ```
//! use kiln_fhirpath::{evaluate, Context, Expression};
//! let patient = serde_json::json!({"resourceType": "Patient", "name": [{"given": ["Peter", "James"]}]});
//! let expr = Expression::parse("Patient.name.given.first()").unwrap();
//! let out = evaluate(&expr, &patient, &Context::new(&patient)).unwrap();
//! assert_eq!(out[0].to_json(), serde_json::json!("Peter"));
//! ```
//!
//! Nodes of the result borrow from the input JSON (`Item<'a>`); FHIR types come from the
//! `kiln-fhir` R4 model (choice types, `is`/`as`/`ofType`, primitive typing of `date`,
//! `decimal`, … elements).

mod boundary;
pub mod datetime;
mod error;
mod eval;
mod model;
mod parser;
pub mod patch;
mod strings;
pub mod units;
mod value;

pub use error::{Error, ErrorKind};
pub use eval::{Context, MemberOf, Resolver};
pub use value::{Item, JsonRef, Node, Quantity};

use once_cell::sync::Lazy;
use parser::Ast;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A compiled FHIRPath expression (cheap to clone; `Send + Sync`).
#[derive(Clone, Debug)]
pub struct Expression {
    inner: Arc<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    source: String,
    ast: Ast,
}

impl Expression {
    /// Parses and checks an expression (syntax, known functions, argument counts).
    pub fn parse(src: &str) -> Result<Expression, Error> {
        let ast = parser::parse(src)?;
        check(&ast)?;
        Ok(Expression {
            inner: Arc::new(Compiled {
                source: src.to_string(),
                ast,
            }),
        })
    }

    /// The expression text as given.
    pub fn source(&self) -> &str {
        &self.inner.source
    }
}

static CACHE: Lazy<RwLock<HashMap<String, Expression>>> = Lazy::new(|| RwLock::new(HashMap::new()));
const CACHE_LIMIT: usize = 10_000;

/// Compiles `src` once per process and returns the cached expression afterwards.
pub fn compile_cached(src: &str) -> Result<Expression, Error> {
    if let Ok(cache) = CACHE.read() {
        if let Some(e) = cache.get(src) {
            return Ok(e.clone());
        }
    }
    let e = Expression::parse(src)?;
    if let Ok(mut cache) = CACHE.write() {
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(src.to_string(), e.clone());
    }
    Ok(e)
}

static REGEX_CACHE: Lazy<RwLock<HashMap<String, regex::Regex>>> =
    Lazy::new(|| RwLock::new(HashMap::new()));

pub(crate) fn regex_cached(pattern: &str) -> Result<regex::Regex, Error> {
    if let Ok(cache) = REGEX_CACHE.read() {
        if let Some(r) = cache.get(pattern) {
            return Ok(r.clone());
        }
    }
    let re = regex::RegexBuilder::new(pattern)
        .dot_matches_new_line(true)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| Error::execution(format!("invalid regular expression: {e}")))?;
    if let Ok(mut cache) = REGEX_CACHE.write() {
        if cache.len() >= 1000 {
            cache.clear();
        }
        cache.insert(pattern.to_string(), re.clone());
    }
    Ok(re)
}

/// Evaluates `expr` on `input` (a resource or any element JSON).
pub fn evaluate<'a>(
    expr: &Expression,
    input: &'a Value,
    ctx: &Context<'a>,
) -> Result<Vec<Item<'a>>, Error> {
    eval::evaluate_ast(&expr.inner.ast, input, ctx)
}

/// Evaluates `expr` with `focus` as the input collection (e.g. typed element nodes returned by an
/// earlier evaluation, as needed for element-level invariants). `%resource`/`%rootResource` come
/// from `ctx`.
pub fn evaluate_on<'a>(
    expr: &Expression,
    focus: Vec<Item<'a>>,
    ctx: &Context<'a>,
) -> Result<Vec<Item<'a>>, Error> {
    eval::evaluate_ast_on(&expr.inner.ast, focus, ctx, None)
}

/// Parses (cached) and evaluates `src` on `input` with `%resource` = `input`.
pub fn evaluate_str<'a>(src: &str, input: &'a Value) -> Result<Vec<Item<'a>>, Error> {
    let expr = compile_cached(src)?;
    evaluate(&expr, input, &Context::new(input))
}

/// Evaluates `expr` as a condition (invariants, criteria) with FHIRPath singleton evaluation:
/// empty → `None`; a single Boolean → its value; a single non-Boolean item → `true`; more than
/// one item → error.
pub fn evaluate_boolean<'a>(
    expr: &Expression,
    input: &'a Value,
    ctx: &Context<'a>,
) -> Result<Option<bool>, Error> {
    let items = evaluate(expr, input, ctx)?;
    match items.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(match one {
            Item::Node(n) if n.value.is_none() => return Ok(None),
            other => other.as_bool().unwrap_or(true),
        })),
        _ => Err(Error::execution(format!(
            "expected a single Boolean, got {} items",
            items.len()
        ))),
    }
}

/// Evaluates `src` and renders the result collection as a JSON array (FHIR nodes as their JSON,
/// System primitives as JSON values, quantities as `{value, unit}`, dates as strings).
pub fn eval_to_json_array(src: &str, input: &Value) -> Result<Value, Error> {
    let items = evaluate_str(src, input)?;
    Ok(Value::Array(items.iter().map(Item::to_json).collect()))
}

/// Known functions with (min, max) argument counts.
fn arity(name: &str) -> Option<(usize, usize)> {
    Some(match name {
        "empty" | "allTrue" | "anyTrue" | "allFalse" | "anyFalse" | "count" | "distinct"
        | "isDistinct" | "single" | "first" | "last" | "tail" | "toBoolean"
        | "convertsToBoolean" | "toInteger" | "convertsToInteger" | "toDecimal"
        | "convertsToDecimal" | "toString" | "convertsToString" | "toDate" | "convertsToDate"
        | "toDateTime" | "convertsToDateTime" | "toTime" | "convertsToTime" | "upper" | "lower"
        | "length" | "toChars" | "trim" | "abs" | "ceiling" | "exp" | "floor" | "ln" | "sqrt"
        | "truncate" | "children" | "descendants" | "now" | "today" | "timeOfDay" | "not"
        | "hasValue" | "getValue" | "resolve" | "htmlChecks" | "htmlchecks" | "type"
        | "precision" | "sum" | "min" | "max" | "avg" => (0, 0),
        "exists" | "toQuantity" | "convertsToQuantity" | "round" | "lowBoundary"
        | "highBoundary" => (0, 1),
        "all" | "subsetOf" | "supersetOf" | "where" | "select" | "repeat" | "ofType" | "is"
        | "as" | "skip" | "take" | "intersect" | "exclude" | "union" | "combine" | "indexOf"
        | "lastIndexOf" | "startsWith" | "endsWith" | "contains" | "matches" | "matchesFull"
        | "log" | "power" | "extension" | "memberOf" | "conformsTo" | "encode" | "decode"
        | "escape" | "unescape" | "comparable" | "subsumes" | "subsumedBy" => (1, 1),
        "split" | "join" => (0, 1),
        "substring" | "trace" | "aggregate" => (1, 2),
        "replace" | "replaceMatches" => (2, 2),
        "iif" => (2, 3),
        "sort" => (0, usize::MAX),
        _ => return None,
    })
}

/// Compile-time checks: known functions, argument counts, type arguments.
fn check(ast: &Ast) -> Result<(), Error> {
    match ast {
        Ast::Empty
        | Ast::Literal(_)
        | Ast::This
        | Ast::Index
        | Ast::Total
        | Ast::Variable(_)
        | Ast::Identifier(_) => Ok(()),
        Ast::Member(t, _) | Ast::Negate(t, _) | Ast::Is(t, _) | Ast::As(t, _) => check(t),
        Ast::Indexer(a, b) | Ast::Binary(_, a, b, _) => {
            check(a)?;
            check(b)
        }
        Ast::Call {
            target,
            name,
            args,
            pos,
        } => {
            let (min, max) = arity(name)
                .ok_or_else(|| Error::semantic(format!("unknown function '{name}'"), Some(*pos)))?;
            if args.len() < min || args.len() > max {
                return Err(Error::semantic(
                    format!(
                        "function '{name}' takes {} argument(s), {} given",
                        if min == max {
                            min.to_string()
                        } else {
                            format!("{min}..{max}")
                        },
                        args.len()
                    ),
                    Some(*pos),
                ));
            }
            if matches!(name.as_str(), "is" | "as" | "ofType")
                && !matches!(args[0], Ast::Identifier(_) | Ast::Member(..))
            {
                return Err(Error::semantic(
                    format!("{name}() expects a type name"),
                    Some(*pos),
                ));
            }
            if let Some(t) = target {
                check(t)?;
            }
            args.iter().try_for_each(check)
        }
    }
}

#[cfg(test)]
mod tests;
