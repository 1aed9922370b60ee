//! The FHIRPath evaluator: navigation over borrowed JSON, operators with three-valued logic and
//! empty propagation, and the function library.

use crate::datetime::{DateTimeValue, Precision, TimeValue};
use crate::error::Error;
use crate::model::{self, ChildLookup};
use crate::parser::{make_type_spec, Ast, BinOp, Literal, TypeSpec};
use crate::units;
use crate::value::{
    number_text, parse_decimal, quantity_from_json, Item, JsonRef, Node, Prim, Quantity,
};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::Value;
use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

type Coll<'a> = Vec<Item<'a>>;
type R<T> = Result<T, Error>;

/// Resolver for `resolve()` references not found in the root Bundle / contained resources.
pub type Resolver<'a> = &'a (dyn Fn(&str) -> Option<Value> + Sync);

/// Terminology hook for `memberOf(valueSetUrl)`: receives the JSON of a `code`/`string`
/// (a JSON string), `Coding` or `CodeableConcept` and the value set URL; `None` = unknown.
pub type MemberOf<'a> = &'a (dyn Fn(&Value, &str) -> Option<bool> + Sync);

/// Evaluation context: `%resource`, `%rootResource`, user variables, reference resolver.
#[derive(Clone)]
pub struct Context<'a> {
    pub(crate) resource: Option<&'a Value>,
    pub(crate) root: Option<&'a Value>,
    pub(crate) variables: HashMap<String, Vec<Item<'static>>>,
    pub(crate) resolver: Option<Resolver<'a>>,
    pub(crate) member_of: Option<MemberOf<'a>>,
    pub(crate) strict: bool,
    pub(crate) reference_stubs: bool,
    pub(crate) lenient_as: bool,
}

impl<'a> Context<'a> {
    /// A context whose `%resource` and `%rootResource` are `resource`.
    pub fn new(resource: &'a Value) -> Self {
        Context {
            resource: Some(resource),
            root: Some(resource),
            variables: HashMap::new(),
            resolver: None,
            member_of: None,
            strict: false,
            reference_stubs: true,
            lenient_as: false,
        }
    }

    /// A context without `%resource` (it then defaults to the evaluated input).
    pub fn empty() -> Self {
        Context {
            resource: None,
            root: None,
            variables: HashMap::new(),
            resolver: None,
            member_of: None,
            strict: false,
            reference_stubs: true,
            lenient_as: false,
        }
    }

    /// Sets `%rootResource` (e.g. the Bundle or container resource). `resolve()` looks up
    /// references in it when it is a Bundle (`entry.fullUrl`, `Type/id`) and in its `contained`.
    pub fn with_root(mut self, root: &'a Value) -> Self {
        self.root = Some(root);
        self
    }

    /// Defines `%name`. JSON primitives become System values; objects become FHIR nodes (typed by
    /// their `resourceType` when present).
    pub fn with_variable(mut self, name: &str, values: Vec<Value>) -> Self {
        let items = values.into_iter().map(owned_item).collect();
        self.variables.insert(name.to_string(), items);
        self
    }

    /// Resolver used by `resolve()` for references not found in the root Bundle or contained
    /// resources.
    pub fn with_resolver(mut self, resolver: Resolver<'a>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// Terminology used by `memberOf()` (without it `memberOf()` returns empty).
    pub fn with_member_of(mut self, member_of: MemberOf<'a>) -> Self {
        self.member_of = Some(member_of);
        self
    }

    /// When a reference cannot be resolved (not contained, not in the root Bundle, no resolver
    /// result) but names its target type (`Patient/123`, `http://x/fhir/Patient/123`),
    /// `resolve()` returns a stub `{"resourceType": "Patient", "id": "123"}` so that search
    /// parameter expressions like `subject.where(resolve() is Patient)` work during indexing.
    /// On by default; disable for validation-style checks (`resolve().exists()`).
    pub fn with_reference_stubs(mut self, enabled: bool) -> Self {
        self.reference_stubs = enabled;
        self
    }

    /// Lenient `as()`: the function filters a collection like `ofType()` instead of signalling
    /// an error for more than one item (N1 and fhirpath.js error; the Java validator filters).
    /// R4's own `dom-3` invariant (`descendants().as(canonical)`) needs this.
    pub fn with_lenient_as(mut self, lenient: bool) -> Self {
        self.lenient_as = lenient;
        self
    }

    /// Strict mode: navigating to an element the FHIR model does not define (`Patient.given1`)
    /// or starting a path with a non-matching resource type is an error instead of empty.
    pub fn with_strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }
}

/// Turns an owned JSON value into an item (System value for primitives, shared node otherwise).
pub(crate) fn owned_item(v: Value) -> Item<'static> {
    match v {
        Value::Bool(b) => Item::Boolean(b),
        Value::String(s) => Item::String(s),
        Value::Number(n) => {
            let t = number_text(&n);
            match t.parse::<i64>() {
                Ok(i) => Item::Integer(i),
                Err(_) => parse_decimal(&t).map_or(Item::String(t.to_string()), Item::Decimal),
            }
        }
        other => {
            let t = other
                .get("resourceType")
                .and_then(Value::as_str)
                .and_then(model::resource_type);
            Item::node(JsonRef::Shared(Arc::new(other)), t)
        }
    }
}

/// Per-invocation frame: the focus (`$this`), `$index` and `$total`.
#[derive(Clone, Copy)]
struct Frame<'f, 'a> {
    focus: &'f [Item<'a>],
    index: Option<usize>,
    total: Option<&'f [Item<'a>]>,
}

pub(crate) struct Evaluator<'c, 'a> {
    ctx: &'c Context<'a>,
    /// `%context`: the evaluated input.
    input: &'c [Item<'a>],
    resource: Option<&'a Value>,
    root: Option<&'a Value>,
}

fn exec(msg: impl Into<String>) -> Error {
    Error::execution(msg)
}

fn resource_item<'a>(v: &'a Value) -> Item<'a> {
    let t = v
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(model::resource_type);
    Item::node(JsonRef::Borrowed(v), t)
}

pub(crate) fn evaluate_ast<'a>(ast: &Ast, input: &'a Value, ctx: &Context<'a>) -> R<Vec<Item<'a>>> {
    evaluate_ast_on(ast, vec![resource_item(input)], ctx, Some(input))
}

/// Evaluates with an arbitrary focus collection (typed nodes from an earlier evaluation).
pub(crate) fn evaluate_ast_on<'a>(
    ast: &Ast,
    focus: Vec<Item<'a>>,
    ctx: &Context<'a>,
    input_json: Option<&'a Value>,
) -> R<Vec<Item<'a>>> {
    let ev = Evaluator {
        ctx,
        input: &focus,
        resource: ctx.resource.or(input_json),
        root: ctx.root.or(ctx.resource).or(input_json),
    };
    ev.eval(
        ast,
        Frame {
            focus: &focus,
            index: None,
            total: None,
        },
    )
}

fn bool_coll<'a>(b: bool) -> Coll<'a> {
    vec![Item::Boolean(b)]
}

fn opt_bool<'a>(b: Option<bool>) -> Coll<'a> {
    b.map(bool_coll).unwrap_or_default()
}

/// Singleton evaluation to Boolean: empty → None; one Boolean → it; one other item → true.
fn singleton_bool(c: &[Item<'_>], what: &str) -> R<Option<bool>> {
    match c {
        [] => Ok(None),
        [one] => Ok(Some(match one.prim() {
            Prim::Bool(b) => b,
            Prim::Null => return Ok(None),
            _ => true,
        })),
        _ => Err(exec(format!(
            "{what}: expected a single boolean, got a collection of {}",
            c.len()
        ))),
    }
}

fn single<'x, 'a>(c: &'x [Item<'a>], what: &str) -> R<Option<&'x Item<'a>>> {
    match c {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        _ => Err(exec(format!(
            "{what}: expected a single item, got {}",
            c.len()
        ))),
    }
}

fn dec_of(p: &Prim<'_>) -> Option<Decimal> {
    match p {
        Prim::Int(i) => Some(Decimal::from(*i)),
        Prim::Dec(d) => Some(*d),
        _ => None,
    }
}

fn dt_of(p: &Prim<'_>) -> Option<DateTimeValue> {
    match p {
        Prim::Date(d) | Prim::DateTime(d) => Some(*d),
        Prim::Str(s) => DateTimeValue::parse_datetime(s),
        _ => None,
    }
}

fn is_temporal(p: &Prim<'_>) -> bool {
    matches!(p, Prim::Date(_) | Prim::DateTime(_))
}

/// Quantity comparison after unit conversion; `None` when not comparable.
fn qty_cmp(a: &Quantity, b: &Quantity) -> Option<Ordering> {
    if a.unit == b.unit
        || (units::calendar_unit(&a.unit).is_some()
            && units::calendar_unit(&a.unit) == units::calendar_unit(&b.unit))
    {
        return Some(a.value.cmp(&b.value));
    }
    let (av, ac) = units::to_canonical(a.value, &a.unit)?;
    let (bv, bc) = units::to_canonical(b.value, &b.unit)?;
    if !ac.comparable(&bc) {
        return None;
    }
    Some(av.cmp(&bv))
}

/// FHIRPath `=` on two items: `None` = empty result.
fn prim_eq(a: &Prim<'_>, b: &Prim<'_>) -> Option<bool> {
    use Prim::*;
    match (a, b) {
        (Null, _) | (_, Null) => None,
        (Bool(x), Bool(y)) => Some(x == y),
        (Str(x), Str(y)) => Some(x == y),
        (Int(x), Int(y)) => Some(x == y),
        (Int(_) | Dec(_), Int(_) | Dec(_)) => Some(dec_of(a) == dec_of(b)),
        (Date(_) | DateTime(_), Date(_) | DateTime(_)) => {
            let (x, y) = (dt_of(a)?, dt_of(b)?);
            x.compare(&y).map(|o| o == Ordering::Equal)
        }
        (Str(_), Date(_) | DateTime(_)) | (Date(_) | DateTime(_), Str(_)) => {
            match (dt_of(a), dt_of(b)) {
                (Some(x), Some(y)) => x.compare(&y).map(|o| o == Ordering::Equal),
                _ => Some(false),
            }
        }
        (Time(x), Time(y)) => x.compare(y).map(|o| o == Ordering::Equal),
        (Str(s), Time(t)) | (Time(t), Str(s)) => match crate::datetime::TimeValue::parse(s) {
            Some(x) => x.compare(t).map(|o| o == Ordering::Equal),
            None => Some(false),
        },
        (Qty(x), Qty(y)) => qty_cmp(x, y).map(|o| o == Ordering::Equal),
        (Obj(x), Obj(y)) => Some(x == y),
        _ => Some(false),
    }
}

fn normalize_ws(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn dec_equiv(x: Decimal, y: Decimal) -> bool {
    let scale = x.scale().min(y.scale());
    x.round_dp_with_strategy(scale, RoundingStrategy::MidpointAwayFromZero)
        == y.round_dp_with_strategy(scale, RoundingStrategy::MidpointAwayFromZero)
}

/// FHIRPath `~` on two items.
fn prim_equiv(a: &Prim<'_>, b: &Prim<'_>) -> bool {
    use Prim::*;
    match (a, b) {
        (Null, Null) => true,
        (Null, _) | (_, Null) => false,
        (Str(x), Str(y)) => normalize_ws(x) == normalize_ws(y),
        (Int(_) | Dec(_), Int(_) | Dec(_)) => match (dec_of(a), dec_of(b)) {
            (Some(x), Some(y)) => dec_equiv(x, y),
            _ => false,
        },
        (Qty(x), Qty(y)) => {
            if x.unit == y.unit {
                return dec_equiv(x.value, y.value);
            }
            match units::convert(y.value, &y.unit, &x.unit) {
                Some(yv) => dec_equiv(x.value, yv),
                None => false,
            }
        }
        (Obj(x), Obj(y)) => json_equiv(x, y),
        _ => prim_eq(a, b) == Some(true),
    }
}

fn json_equiv(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => normalize_ws(x) == normalize_ws(y),
        (Value::Object(x), Value::Object(y)) => {
            let keys = |o: &serde_json::Map<String, Value>| {
                o.keys().filter(|k| k.as_str() != "id").count()
            };
            keys(x) == keys(y)
                && x.iter()
                    .filter(|(k, _)| k.as_str() != "id")
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equiv(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| json_equiv(v, w))
        }
        _ => a == b,
    }
}

fn prim_type_name(p: &Prim<'_>) -> &'static str {
    match p {
        Prim::Bool(_) => "Boolean",
        Prim::Str(_) => "String",
        Prim::Int(_) => "Integer",
        Prim::Dec(_) => "Decimal",
        Prim::Date(_) => "Date",
        Prim::DateTime(_) => "DateTime",
        Prim::Time(_) => "Time",
        Prim::Qty(_) => "Quantity",
        Prim::Obj(_) => "complex element",
        Prim::Null => "empty",
    }
}

/// FHIRPath ordering (`<` etc.): `Ok(None)` = empty result; error for incomparable types.
fn prim_cmp(a: &Prim<'_>, b: &Prim<'_>) -> R<Option<Ordering>> {
    use Prim::*;
    Ok(match (a, b) {
        (Null, _) | (_, Null) => None,
        (Str(x), Str(y)) => Some(x.cmp(y)),
        (Int(x), Int(y)) => Some(x.cmp(y)),
        (Int(_) | Dec(_), Int(_) | Dec(_)) => dec_of(a).zip(dec_of(b)).map(|(x, y)| x.cmp(&y)),
        (Date(_) | DateTime(_), Date(_) | DateTime(_))
        | (Str(_), Date(_) | DateTime(_))
        | (Date(_) | DateTime(_), Str(_)) => match (dt_of(a), dt_of(b)) {
            (Some(x), Some(y)) => x.compare(&y),
            _ => {
                return Err(exec(format!(
                    "cannot compare {} with {}",
                    prim_type_name(a),
                    prim_type_name(b)
                )))
            }
        },
        (Time(x), Time(y)) => x.compare(y),
        (Str(s), Time(t)) => TimeValue::parse(s).and_then(|x| x.compare(t)),
        (Time(t), Str(s)) => TimeValue::parse(s).and_then(|x| t.compare(&x)),
        (Qty(x), Qty(y)) => qty_cmp(x, y),
        _ => {
            return Err(exec(format!(
                "cannot compare {} with {}",
                prim_type_name(a),
                prim_type_name(b)
            )))
        }
    })
}

fn items_eq(a: &Item<'_>, b: &Item<'_>) -> Option<bool> {
    if let (Item::Node(x), Item::Node(y)) = (a, b) {
        if let (Some(xv), Some(yv)) = (&x.value, &y.value) {
            if xv.same(yv) {
                return Some(true);
            }
        }
    }
    prim_eq(&a.prim(), &b.prim())
}

/// Equality used for union/distinct/intersect/exclude/in/contains (empty counts as unequal).
fn same_value(a: &Item<'_>, b: &Item<'_>) -> bool {
    items_eq(a, b) == Some(true)
}

fn distinct<'a>(c: Coll<'a>) -> Coll<'a> {
    let mut out: Coll<'a> = Vec::with_capacity(c.len());
    for item in c {
        if !out.iter().any(|o| same_value(o, &item)) {
            out.push(item);
        }
    }
    out
}

fn system_type_name(item: &Item<'_>) -> Option<&'static str> {
    Some(match item {
        Item::Boolean(_) => "Boolean",
        Item::String(_) => "String",
        Item::Integer(_) => "Integer",
        Item::Decimal(_) => "Decimal",
        Item::Date(_) => "Date",
        Item::DateTime(_) => "DateTime",
        Item::Time(_) => "Time",
        Item::Quantity(_) => "Quantity",
        Item::Node(_) => return None,
    })
}

/// Best-known FHIR type of a node (model type, or guessed from JSON when untyped).
fn node_type_guess(n: &Node<'_>) -> Option<&'static str> {
    if let Some(t) = n.type_name {
        return Some(t);
    }
    let v = n.value.as_deref()?;
    match v {
        Value::Bool(_) => Some("boolean"),
        Value::String(_) => Some("string"),
        Value::Number(num) => {
            if number_text(num).contains(['.', 'e', 'E']) {
                Some("decimal")
            } else {
                Some("integer")
            }
        }
        Value::Object(o) => o
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(model::resource_type),
        _ => None,
    }
}

/// `is` semantics; `exact` (for `as`/`ofType`) does not accept FHIR primitive subtypes
/// (`code` is not `as(string)`), but complex/resource subtypes are accepted.
fn item_is(item: &Item<'_>, ts: &TypeSpec, exact: bool) -> bool {
    let ns = ts.namespace.as_deref();
    match item {
        Item::Node(n) => {
            if ns == Some("System") {
                return false;
            }
            let Some(t) = node_type_guess(n) else {
                return false;
            };
            if t == ts.name {
                return true;
            }
            if exact && model::is_fhir_primitive(&ts.name) {
                return false;
            }
            model::is_subtype(t, &ts.name)
        }
        _ => {
            if !matches!(ns, None | Some("System")) {
                return false;
            }
            system_type_name(item) == Some(ts.name.as_str())
        }
    }
}

const SYSTEM_TYPES: [&str; 9] = [
    "Boolean", "String", "Integer", "Decimal", "Date", "DateTime", "Time", "Quantity", "Any",
];

/// Unknown type names are an error (`as(string1)`).
fn check_type_spec(ts: &TypeSpec) -> R<()> {
    let ok = match ts.namespace.as_deref() {
        Some("System") => true,
        Some("FHIR") => model::is_fhir_type(&ts.name),
        None => SYSTEM_TYPES.contains(&ts.name.as_str()) || model::is_fhir_type(&ts.name),
        Some(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(exec(format!("unknown type '{}'", ts.name)))
    }
}

fn ast_type_spec(ast: &Ast) -> Option<TypeSpec> {
    fn parts(ast: &Ast, out: &mut Vec<String>) -> bool {
        match ast {
            Ast::Identifier(n) => {
                out.push(n.clone());
                true
            }
            Ast::Member(t, n) if parts(t, out) => {
                out.push(n.clone());
                true
            }
            _ => false,
        }
    }
    let mut v = Vec::new();
    parts(ast, &mut v).then(|| make_type_spec(v))
}

/// Parses `10 'mg'`, `4 days`, `1.5` (unit `1`) from a string.
fn parse_quantity_str(s: &str) -> Option<Quantity> {
    let s = s.trim();
    let end = s
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || ((*c == '-' || *c == '+') && *i == 0)))
        .map(|(i, _)| i)
        .unwrap_or(s.len());
    let (num, rest) = s.split_at(end);
    if num.is_empty() || num.ends_with('.') || num.starts_with('.') {
        return None;
    }
    let value = Decimal::from_str_exact(num).ok()?;
    let rest = rest.trim();
    let unit = if rest.is_empty() {
        "1".to_string()
    } else if let Some(q) = rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        q.to_string()
    } else if units::calendar_unit(rest).is_some() {
        rest.to_string()
    } else {
        return None;
    };
    Some(Quantity { value, unit })
}

fn is_int_text(s: &str) -> bool {
    let d = s.strip_prefix(['+', '-']).unwrap_or(s);
    !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
}

fn is_dec_text(s: &str) -> bool {
    let d = s.strip_prefix(['+', '-']).unwrap_or(s);
    let mut parts = d.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next();
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

fn to_f64(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(f64::NAN)
}

fn from_f64(x: f64) -> Option<Decimal> {
    if !x.is_finite() {
        return None;
    }
    Decimal::try_from(x).ok().map(|d| d.normalize())
}

fn calendar_name(unit: &str) -> Option<&'static str> {
    units::duration_unit(unit)
}

impl<'c, 'a> Evaluator<'c, 'a> {
    fn eval(&self, ast: &Ast, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        // Arms delegate to non-inlined helpers so the recursive frame stays small (deep
        // expressions must evaluate within a 2 MiB thread stack, e.g. tokio workers).
        match ast {
            Ast::Empty => Ok(vec![]),
            Ast::Literal(l) => Ok(vec![literal_item(l)]),
            Ast::This => Ok(fr.focus.to_vec()),
            Ast::Index => Ok(fr
                .index
                .map(|i| vec![Item::Integer(i as i64)])
                .unwrap_or_default()),
            Ast::Total => Ok(fr.total.map(|t| t.to_vec()).unwrap_or_default()),
            Ast::Variable(name) => self.variable(name),
            Ast::Identifier(name) => self.eval_identifier(name, fr),
            Ast::Member(target, name) => self.eval_member(target, name, fr),
            Ast::Call {
                target, name, args, ..
            } => self.eval_call(target.as_deref(), name, args, fr),
            Ast::Indexer(target, idx) => self.eval_indexer(target, idx, fr),
            Ast::Negate(inner, pos) => self.eval_negate(inner, *pos, fr),
            Ast::Binary(BinOp::Union, _, _, _) => self.eval_union(ast, fr),
            Ast::Binary(op, l, r, pos) => self.binary(*op, l, r, fr).map_err(|e| e.at(*pos)),
            Ast::Is(e, ts) => self.eval_is(e, ts, fr),
            Ast::As(e, ts) => self.eval_as(e, ts, fr),
        }
    }

    #[inline(never)]
    fn eval_identifier(&self, name: &str, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        let mut out = Vec::new();
        for item in fr.focus {
            if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                if let Item::Node(n) = item {
                    if let Some(t) = node_type_guess(n) {
                        if t == name || model::is_subtype(t, name) {
                            out.push(item.clone());
                            continue;
                        }
                    }
                    if self.ctx.strict && model::is_fhir_type(name) {
                        return Err(Error::semantic(
                            format!("the context is not of type {name}"),
                            None,
                        ));
                    }
                }
            }
            self.navigate(item, name, &mut out)?;
        }
        Ok(out)
    }

    #[inline(never)]
    fn eval_member(&self, target: &Ast, name: &str, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        if self.ctx.strict {
            if let Ast::As(_, ts) = target {
                if model::has_element(&ts.name, name) == Some(false) {
                    return Err(Error::semantic(
                        format!("'{name}' is not an element of {}", ts.name),
                        None,
                    ));
                }
            }
        }
        let t = self.eval(target, fr)?;
        let mut out = Vec::with_capacity(t.len());
        for item in &t {
            self.navigate(item, name, &mut out)?;
        }
        Ok(out)
    }

    #[inline(never)]
    fn eval_call(
        &self,
        target: Option<&Ast>,
        name: &str,
        args: &[Ast],
        fr: Frame<'_, 'a>,
    ) -> R<Coll<'a>> {
        if self.ctx.strict && matches!(name, "skip" | "take" | "first" | "last" | "tail") {
            if let Some(Ast::Call { name: inner, .. }) = target {
                if matches!(inner.as_str(), "children" | "descendants") {
                    return Err(Error::semantic(
                        format!("{name}() needs an ordered collection; {inner}() is unordered"),
                        None,
                    ));
                }
            }
        }
        let input = match target {
            Some(t) => self.eval(t, fr)?,
            None => fr.focus.to_vec(),
        };
        self.call(name, input, args, fr)
    }

    #[inline(never)]
    fn eval_indexer(&self, target: &Ast, idx: &Ast, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        let t = self.eval(target, fr)?;
        let i = self.eval(idx, fr)?;
        match single(&i, "indexer")?.map(Item::prim) {
            None => Ok(vec![]),
            Some(Prim::Int(i)) => Ok(usize::try_from(i)
                .ok()
                .and_then(|i| t.into_iter().nth(i))
                .into_iter()
                .collect()),
            Some(_) => Err(exec("indexer must be an Integer")),
        }
    }

    #[inline(never)]
    fn eval_negate(&self, inner: &Ast, pos: usize, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        let v = self.eval(inner, fr).map_err(|e| e.at(pos))?;
        match single(&v, "unary minus")? {
            None => Ok(vec![]),
            Some(item) => Ok(vec![match item.prim() {
                Prim::Int(i) => {
                    Item::Integer(i.checked_neg().ok_or_else(|| exec("integer overflow"))?)
                }
                Prim::Dec(d) => Item::Decimal(-d),
                Prim::Qty(q) => Item::Quantity(Quantity {
                    value: -q.value,
                    unit: q.unit.clone(),
                }),
                p => {
                    return Err(exec(format!(
                        "unary minus cannot be applied to {}",
                        prim_type_name(&p)
                    ))
                    .at(pos))
                }
            }]),
        }
    }

    /// `a | b | c …` evaluated iteratively (long unions are common in search parameters).
    #[inline(never)]
    fn eval_union(&self, ast: &Ast, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        let mut operands = Vec::new();
        let mut cur = ast;
        while let Ast::Binary(BinOp::Union, l, r, _) = cur {
            operands.push(&**r);
            cur = l;
        }
        operands.push(cur);
        let mut all = Vec::new();
        for op in operands.into_iter().rev() {
            all.extend(self.eval(op, fr)?);
        }
        Ok(distinct(all))
    }

    #[inline(never)]
    fn eval_is(&self, e: &Ast, ts: &TypeSpec, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        check_type_spec(ts)?;
        let v = self.eval(e, fr)?;
        Ok(match single(&v, "is")? {
            None => vec![],
            Some(item) => bool_coll(item_is(item, ts, false)),
        })
    }

    #[inline(never)]
    fn eval_as(&self, e: &Ast, ts: &TypeSpec, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        check_type_spec(ts)?;
        // The operator form filters (R4 search parameters apply it to collections,
        // e.g. `Observation.component.value as Quantity`); `as()` requires one item.
        let v = self.eval(e, fr)?;
        Ok(v.into_iter().filter(|i| item_is(i, ts, true)).collect())
    }

    fn variable(&self, name: &str) -> R<Coll<'a>> {
        let s = |v: &str| Ok(vec![Item::String(v.to_string())]);
        match name {
            "ucum" => s(crate::value::UCUM),
            "sct" => s("http://snomed.info/sct"),
            "loinc" => s("http://loinc.org"),
            "context" => Ok(self.input.to_vec()),
            "resource" => Ok(self.resource.map(resource_item).into_iter().collect()),
            "rootResource" => Ok(self.root.map(resource_item).into_iter().collect()),
            _ => {
                if let Some(v) = self.ctx.variables.get(name) {
                    return Ok(v.clone());
                }
                if let Some(vs) = name.strip_prefix("vs-") {
                    return s(&format!("http://hl7.org/fhir/ValueSet/{vs}"));
                }
                if let Some(ext) = name.strip_prefix("ext-") {
                    return s(&format!("http://hl7.org/fhir/StructureDefinition/{ext}"));
                }
                Err(exec(format!("undefined variable %{name}")))
            }
        }
    }

    /// Appends the children named `name` of `item` to `out`.
    fn navigate(&self, item: &Item<'a>, name: &str, out: &mut Coll<'a>) -> R<()> {
        let Item::Node(node) = item else {
            return Ok(());
        };
        // Primitive: only `id`/`extension` from the `_name` companion.
        let (container, parent_type) = match &node.value {
            Some(v) if v.is_object() => (v.clone(), node.type_name),
            _ => match &node.ext {
                Some(e) => (e.clone(), Some("Element")),
                None => return Ok(()),
            },
        };
        let Value::Object(obj) = &*container else {
            return Ok(());
        };
        let lookup = model::lookup_child(parent_type, name);
        match lookup {
            ChildLookup::Direct(t) => {
                self.push_children(&container, name, t, out);
            }
            ChildLookup::ChoiceSpecific => {
                // FHIRPath names choice elements without the type suffix (`value`, then
                // `ofType(Quantity)`); `valueQuantity` is a semantic error (official suite).
                return Err(Error::semantic(
                    format!(
                        "'{name}' is a type-specific JSON name; use the choice element name with ofType()/as()"
                    ),
                    None,
                ));
            }
            ChildLookup::Choice(info) => {
                let mut found: Option<(&str, &'static str)> = None;
                for key in obj.keys() {
                    let base = key.strip_prefix('_').unwrap_or(key);
                    if let Some(t) = model::choice_key_type(info, name, base) {
                        found = Some((base, t));
                        break;
                    }
                }
                if let Some((key, t)) = found {
                    let key = key.to_string();
                    self.push_children(&container, &key, Some(t), out);
                }
            }
            ChildLookup::Unknown => {
                if obj.contains_key(name) {
                    // Not in the model (e.g. `valueQuantity` spelled out): still navigable.
                    let t = model::json_child_type(parent_type, name);
                    if self.ctx.strict {
                        return Err(Error::semantic(
                            format!(
                                "'{name}' is not an element of {}",
                                parent_type.unwrap_or("?")
                            ),
                            None,
                        ));
                    }
                    self.push_children(&container, name, t, out);
                } else if self.ctx.strict {
                    return Err(Error::semantic(
                        format!(
                            "'{name}' is not an element of {}",
                            parent_type.unwrap_or("?")
                        ),
                        None,
                    ));
                }
            }
            ChildLookup::NoModel => {
                if obj.contains_key(name) || with_underscore(name, |k| obj.contains_key(k)) {
                    self.push_children(&container, name, None, out);
                } else {
                    // Heuristic choice resolution: `value` → `valueQuantity`.
                    for key in obj.keys() {
                        if let Some(suffix) = key.strip_prefix(name) {
                            if suffix.starts_with(|c: char| c.is_ascii_uppercase()) {
                                if let Some(t) = model::choice_suffix_type(suffix) {
                                    let key = key.clone();
                                    self.push_children(&container, &key, Some(t), out);
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn push_children(
        &self,
        container: &JsonRef<'a>,
        key: &str,
        t: Option<&'static str>,
        out: &mut Coll<'a>,
    ) {
        let value = container.child(|v| v.get(key));
        let ext = with_underscore(key, |k| container.child(|v| v.get(k)));
        let typed = |v: &Value| -> Option<&'static str> {
            match t {
                Some("Resource") | Some("DomainResource") | None => v
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .and_then(model::resource_type)
                    .or(t),
                _ => t,
            }
        };
        match (value, ext) {
            (Some(v), ext) if v.is_array() => {
                let n = v.as_array().map_or(0, Vec::len);
                for i in 0..n {
                    let item_v = v.child(|a| a.get(i).filter(|x| !x.is_null()));
                    let item_e = ext
                        .as_ref()
                        .and_then(|e| e.child(|a| a.get(i).filter(|x| !x.is_null())));
                    if item_v.is_none() && item_e.is_none() {
                        continue;
                    }
                    let ty = item_v.as_deref().and_then(typed).or(t);
                    out.push(Item::Node(Node {
                        value: item_v,
                        ext: item_e,
                        type_name: ty,
                    }));
                }
            }
            (Some(v), ext) => {
                if v.is_null() && ext.is_none() {
                    return;
                }
                let ty = typed(&v);
                out.push(Item::Node(Node {
                    value: if v.is_null() { None } else { Some(v) },
                    ext: ext.filter(|e| e.is_object()),
                    type_name: ty,
                }));
            }
            (None, Some(e)) => {
                if let Some(arr) = e.as_array() {
                    for i in 0..arr.len() {
                        if let Some(ie) = e.child(|a| a.get(i).filter(|x| !x.is_null())) {
                            out.push(Item::Node(Node {
                                value: None,
                                ext: Some(ie),
                                type_name: t,
                            }));
                        }
                    }
                } else {
                    out.push(Item::Node(Node {
                        value: None,
                        ext: Some(e),
                        type_name: t,
                    }));
                }
            }
            (None, None) => {}
        }
    }

    fn children(&self, item: &Item<'a>, out: &mut Coll<'a>) {
        let Item::Node(node) = item else { return };
        let (container, parent_type) = match &node.value {
            Some(v) if v.is_object() => (v.clone(), node.type_name),
            _ => match &node.ext {
                Some(e) => (e.clone(), Some("Element")),
                None => return,
            },
        };
        let Some(obj) = container.as_object() else {
            return;
        };
        for key in obj.keys() {
            if key == "resourceType" {
                continue;
            }
            if let Some(base) = key.strip_prefix('_') {
                if obj.contains_key(base) {
                    continue;
                }
                let t = model::json_child_type(parent_type, base);
                self.push_children(&container, base, t, out);
                continue;
            }
            let t = model::json_child_type(parent_type, key);
            self.push_children(&container, key, t, out);
        }
    }

    #[inline(never)]
    fn binary(&self, op: BinOp, l: &Ast, r: &Ast, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        // Boolean operators short-circuit where the result is already known.
        match op {
            BinOp::And | BinOp::Or | BinOp::Implies | BinOp::Xor => {
                let a = singleton_bool(&self.eval(l, fr)?, "boolean operator")?;
                match (op, a) {
                    (BinOp::And, Some(false)) => return Ok(bool_coll(false)),
                    (BinOp::Or, Some(true)) => return Ok(bool_coll(true)),
                    (BinOp::Implies, Some(false)) => return Ok(bool_coll(true)),
                    _ => {}
                }
                let b = singleton_bool(&self.eval(r, fr)?, "boolean operator")?;
                return Ok(opt_bool(match op {
                    BinOp::And => match (a, b) {
                        (_, Some(false)) => Some(false),
                        (Some(true), Some(true)) => Some(true),
                        _ => None,
                    },
                    BinOp::Or => match (a, b) {
                        (_, Some(true)) => Some(true),
                        (Some(false), Some(false)) => Some(false),
                        _ => None,
                    },
                    BinOp::Xor => a.zip(b).map(|(x, y)| x != y),
                    _ => match (a, b) {
                        (Some(true), b) => b,
                        (None, Some(true)) => Some(true),
                        _ => None,
                    },
                }));
            }
            _ => {}
        }
        let a = self.eval(l, fr)?;
        let b = self.eval(r, fr)?;
        match op {
            BinOp::Union => {
                let mut all = a;
                all.extend(b);
                Ok(distinct(all))
            }
            BinOp::Eq | BinOp::Ne => {
                let res = if a.is_empty() || b.is_empty() {
                    None
                } else if a.len() != b.len() {
                    Some(false)
                } else {
                    let mut res = Some(true);
                    for (x, y) in a.iter().zip(&b) {
                        match items_eq(x, y) {
                            Some(true) => {}
                            Some(false) => {
                                res = Some(false);
                                break;
                            }
                            None => {
                                res = None;
                            }
                        }
                    }
                    res
                };
                Ok(opt_bool(if op == BinOp::Eq {
                    res
                } else {
                    res.map(|x| !x)
                }))
            }
            BinOp::Equiv | BinOp::NotEquiv => {
                let res = if a.len() != b.len() {
                    false
                } else {
                    let mut used = vec![false; b.len()];
                    a.iter().all(|x| {
                        let px = x.prim();
                        for (j, y) in b.iter().enumerate() {
                            if !used[j] && prim_equiv(&px, &y.prim()) {
                                used[j] = true;
                                return true;
                            }
                        }
                        false
                    })
                };
                Ok(bool_coll(if op == BinOp::Equiv { res } else { !res }))
            }
            BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => {
                let (Some(x), Some(y)) = (single(&a, "comparison")?, single(&b, "comparison")?)
                else {
                    return Ok(vec![]);
                };
                let o = prim_cmp(&x.prim(), &y.prim())?;
                Ok(opt_bool(o.map(|o| match op {
                    BinOp::Lt => o == Ordering::Less,
                    BinOp::Gt => o == Ordering::Greater,
                    BinOp::Le => o != Ordering::Greater,
                    _ => o != Ordering::Less,
                })))
            }
            BinOp::In | BinOp::Contains => {
                let (elem, coll) = if op == BinOp::In { (a, b) } else { (b, a) };
                match single(&elem, "membership")? {
                    None => Ok(vec![]),
                    Some(e) => Ok(bool_coll(coll.iter().any(|c| same_value(e, c)))),
                }
            }
            BinOp::Concat => {
                let s = |c: &Coll<'a>| -> R<String> {
                    Ok(match single(c, "&")? {
                        None => String::new(),
                        Some(i) => i.to_fhirpath_string().unwrap_or_default(),
                    })
                };
                Ok(vec![Item::String(s(&a)? + &s(&b)?)])
            }
            _ => {
                let (Some(x), Some(y)) = (single(&a, "arithmetic")?, single(&b, "arithmetic")?)
                else {
                    return Ok(vec![]);
                };
                Ok(arith(op, &x.prim(), &y.prim())?.into_iter().collect())
            }
        }
    }

    fn lambda(&self, body: &Ast, item: &Item<'a>, index: usize) -> R<Coll<'a>> {
        self.eval(
            body,
            Frame {
                focus: std::slice::from_ref(item),
                index: Some(index),
                total: None,
            },
        )
    }

    fn arg(&self, args: &[Ast], i: usize, fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        match args.get(i) {
            Some(a) => self.eval(a, fr),
            None => Ok(vec![]),
        }
    }

    fn arg_string(&self, args: &[Ast], i: usize, fr: Frame<'_, 'a>) -> R<Option<String>> {
        let v = self.arg(args, i, fr)?;
        match single(&v, "argument")? {
            None => Ok(None),
            Some(item) => match item.prim() {
                Prim::Str(s) => Ok(Some(s.to_string())),
                p => Err(exec(format!(
                    "expected a String argument, got {}",
                    prim_type_name(&p)
                ))),
            },
        }
    }

    fn arg_int(&self, args: &[Ast], i: usize, fr: Frame<'_, 'a>) -> R<Option<i64>> {
        let v = self.arg(args, i, fr)?;
        match single(&v, "argument")? {
            None => Ok(None),
            Some(item) => match item.prim() {
                Prim::Int(n) => Ok(Some(n)),
                p => Err(exec(format!(
                    "expected an Integer argument, got {}",
                    prim_type_name(&p)
                ))),
            },
        }
    }

    fn type_arg(&self, args: &[Ast]) -> R<TypeSpec> {
        let ts = args
            .first()
            .and_then(ast_type_spec)
            .ok_or_else(|| Error::semantic("expected a type name argument", None))?;
        check_type_spec(&ts)?;
        Ok(ts)
    }

    fn call(&self, name: &str, input: Coll<'a>, args: &[Ast], fr: Frame<'_, 'a>) -> R<Coll<'a>> {
        match name {
            "empty" | "exists" | "all" | "allTrue" | "anyTrue" | "allFalse" | "anyFalse"
            | "subsetOf" | "supersetOf" | "count" | "distinct" | "isDistinct" => {
                self.call_existence(name, input, args, fr)
            }
            "where" | "select" | "repeat" | "ofType" | "is" | "as" => {
                self.call_filter(name, input, args, fr)
            }
            "single" | "first" | "last" | "tail" | "skip" | "take" | "intersect" | "exclude"
            | "union" | "combine" => self.call_subset(name, input, args, fr),
            "iif" => self.call_iif(name, input, args, fr),
            "toBoolean" | "convertsToBoolean" | "toInteger" | "convertsToInteger" | "toDecimal"
            | "convertsToDecimal" | "toString" | "convertsToString" | "toDate"
            | "convertsToDate" | "toDateTime" | "convertsToDateTime" | "toTime"
            | "convertsToTime" | "toQuantity" | "convertsToQuantity" => {
                self.call_conversion(name, input, args, fr)
            }
            "indexOf" | "lastIndexOf" | "substring" | "startsWith" | "endsWith" | "contains"
            | "upper" | "lower" | "trim" | "length" | "toChars" | "replace" | "matches"
            | "matchesFull" | "replaceMatches" | "split" | "join" | "encode" | "decode"
            | "escape" | "unescape" => self.call_string(name, input, args, fr),
            "abs" | "ceiling" | "floor" | "truncate" | "exp" | "ln" | "sqrt" | "round" | "log"
            | "power" => self.call_math(name, input, args, fr),
            "children" | "descendants" | "trace" | "now" | "today" | "timeOfDay" | "not"
            | "aggregate" | "sort" | "type" | "extension" | "hasValue" | "getValue" | "resolve"
            | "memberOf" | "subsumes" | "subsumedBy" | "conformsTo" | "htmlChecks"
            | "htmlchecks" | "lowBoundary" | "highBoundary" | "precision" | "comparable"
            | "sum" | "min" | "max" | "avg" => self.call_misc(name, input, args, fr),
            _ => Err(Error::semantic(format!("unknown function {name}()"), None)),
        }
    }

    #[inline(never)]
    fn call_existence(
        &self,
        name: &str,
        input: Coll<'a>,
        args: &[Ast],
        fr: Frame<'_, 'a>,
    ) -> R<Coll<'a>> {
        let _ = (&args, &fr);
        match name {
            "empty" => Ok(bool_coll(input.is_empty())),
            "exists" => {
                if let Some(crit) = args.first() {
                    for (i, item) in input.iter().enumerate() {
                        if singleton_bool(&self.lambda(crit, item, i)?, "exists")? == Some(true) {
                            return Ok(bool_coll(true));
                        }
                    }
                    Ok(bool_coll(false))
                } else {
                    Ok(bool_coll(!input.is_empty()))
                }
            }
            "all" => {
                let crit = &args[0];
                for (i, item) in input.iter().enumerate() {
                    if singleton_bool(&self.lambda(crit, item, i)?, "all")? != Some(true) {
                        return Ok(bool_coll(false));
                    }
                }
                Ok(bool_coll(true))
            }
            "allTrue" | "anyTrue" | "allFalse" | "anyFalse" => {
                let mut bools = Vec::with_capacity(input.len());
                for i in &input {
                    match i.prim() {
                        Prim::Bool(b) => bools.push(b),
                        p => {
                            return Err(exec(format!(
                                "{name} expects Booleans, got {}",
                                prim_type_name(&p)
                            )))
                        }
                    }
                }
                Ok(bool_coll(match name {
                    "allTrue" => bools.iter().all(|b| *b),
                    "anyTrue" => bools.iter().any(|b| *b),
                    "allFalse" => bools.iter().all(|b| !*b),
                    _ => bools.iter().any(|b| !*b),
                }))
            }
            "subsetOf" | "supersetOf" => {
                let other = self.arg(args, 0, fr)?;
                let (sub, sup) = if name == "subsetOf" {
                    (&input, &other)
                } else {
                    (&other, &input)
                };
                Ok(bool_coll(
                    sub.iter().all(|x| sup.iter().any(|y| same_value(x, y))),
                ))
            }
            "count" => Ok(vec![Item::Integer(input.len() as i64)]),
            "distinct" => Ok(distinct(input)),
            "isDistinct" => {
                let n = input.len();
                Ok(bool_coll(distinct(input).len() == n))
            }
            // ---- filtering and projection
            _ => Err(Error::semantic(format!("unknown function {name}()"), None)),
        }
    }

    #[inline(never)]
    fn call_filter(
        &self,
        name: &str,
        input: Coll<'a>,
        args: &[Ast],
        fr: Frame<'_, 'a>,
    ) -> R<Coll<'a>> {
        let _ = (&args, &fr);
        match name {
            "where" => {
                let mut out = Vec::new();
                for (i, item) in input.into_iter().enumerate() {
                    if singleton_bool(&self.lambda(&args[0], &item, i)?, "where")? == Some(true) {
                        out.push(item);
                    }
                }
                Ok(out)
            }
            "select" => {
                let mut out = Vec::new();
                for (i, item) in input.iter().enumerate() {
                    out.extend(self.lambda(&args[0], item, i)?);
                }
                Ok(out)
            }
            "repeat" => {
                // Nodes are deduplicated by identity (hash of the JSON address), System values
                // by equality.
                let mut out: Coll<'a> = Vec::new();
                let mut seen_nodes: std::collections::HashSet<usize> = Default::default();
                let mut values: Coll<'a> = Vec::new();
                let mut queue = input;
                let mut levels = 0usize;
                while !queue.is_empty() {
                    let mut next = Vec::new();
                    for (i, item) in queue.iter().enumerate() {
                        for r in self.lambda(&args[0], item, i)? {
                            let fresh = match &r {
                                Item::Node(Node { value: Some(v), .. }) => {
                                    seen_nodes.insert(&**v as *const Value as usize)
                                }
                                _ => {
                                    if values.iter().any(|o| same_value(o, &r)) {
                                        false
                                    } else {
                                        values.push(r.clone());
                                        true
                                    }
                                }
                            };
                            if fresh {
                                out.push(r.clone());
                                next.push(r);
                            }
                        }
                    }
                    queue = next;
                    levels += 1;
                    if levels > 1_000 || out.len() > 100_000 {
                        return Err(exec("repeat() did not terminate"));
                    }
                }
                Ok(out)
            }
            "ofType" => {
                let ts = self.type_arg(args)?;
                Ok(input
                    .into_iter()
                    .filter(|i| item_is(i, &ts, true))
                    .collect())
            }
            "is" => {
                let ts = self.type_arg(args)?;
                Ok(match single(&input, "is()")? {
                    None => vec![],
                    Some(i) => bool_coll(item_is(i, &ts, false)),
                })
            }
            "as" => {
                let ts = self.type_arg(args)?;
                if input.len() > 1 && !self.ctx.lenient_as {
                    return Err(exec("as() requires a single item"));
                }
                Ok(input
                    .into_iter()
                    .filter(|i| item_is(i, &ts, true))
                    .collect())
            }
            // ---- subsetting
            _ => Err(Error::semantic(format!("unknown function {name}()"), None)),
        }
    }

    #[inline(never)]
    fn call_subset(
        &self,
        name: &str,
        input: Coll<'a>,
        args: &[Ast],
        fr: Frame<'_, 'a>,
    ) -> R<Coll<'a>> {
        let _ = (&args, &fr);
        match name {
            "single" => {
                if input.len() > 1 {
                    return Err(exec("single() on a collection with more than one item"));
                }
                Ok(input)
            }
            "first" => Ok(input.into_iter().take(1).collect()),
            "last" => Ok(input.into_iter().last().into_iter().collect()),
            "tail" => Ok(input.into_iter().skip(1).collect()),
            "skip" => {
                let n = self.arg_int(args, 0, fr)?.unwrap_or(0).max(0) as usize;
                Ok(input.into_iter().skip(n).collect())
            }
            "take" => {
                let n = self.arg_int(args, 0, fr)?.unwrap_or(0).max(0) as usize;
                Ok(input.into_iter().take(n).collect())
            }
            "intersect" => {
                let other = self.arg(args, 0, fr)?;
                let kept: Coll<'a> = input
                    .into_iter()
                    .filter(|x| other.iter().any(|y| same_value(x, y)))
                    .collect();
                Ok(distinct(kept))
            }
            "exclude" => {
                let other = self.arg(args, 0, fr)?;
                Ok(input
                    .into_iter()
                    .filter(|x| !other.iter().any(|y| same_value(x, y)))
                    .collect())
            }
            // ---- combining
            "union" => {
                let mut all = input;
                all.extend(self.arg(args, 0, fr)?);
                Ok(distinct(all))
            }
            "combine" => {
                let mut all = input;
                all.extend(self.arg(args, 0, fr)?);
                Ok(all)
            }
            // ---- conversion
            _ => Err(Error::semantic(format!("unknown function {name}()"), None)),
        }
    }

    #[inline(never)]
    fn call_iif(
        &self,
        name: &str,
        input: Coll<'a>,
        args: &[Ast],
        fr: Frame<'_, 'a>,
    ) -> R<Coll<'a>> {
        let _ = (&args, &fr);
        match name {
            "iif" => {
                if input.len() > 1 {
                    return Err(exec("iif() requires an input of at most one item"));
                }
                let sub = Frame {
                    focus: &input,
                    index: fr.index,
                    total: fr.total,
                };
                let frame = if args.is_empty() { fr } else { sub };
                let c = self.eval(&args[0], frame)?;
                let cond = match c.as_slice() {
                    [] => None,
                    [one] => match one.prim() {
                        Prim::Bool(b) => Some(b),
                        _ => return Err(exec("iif() criterion must be a Boolean")),
                    },
                    _ => return Err(exec("iif() criterion must be a single Boolean")),
                };
                if cond == Some(true) {
                    self.eval(&args[1], frame)
                } else {
                    self.arg(args, 2, frame)
                }
            }
            _ => Err(Error::semantic(format!("unknown function {name}()"), None)),
        }
    }

    #[inline(never)]
    fn call_conversion(
        &self,
        name: &str,
        input: Coll<'a>,
        args: &[Ast],
        fr: Frame<'_, 'a>,
    ) -> R<Coll<'a>> {
        let _ = (&args, &fr);
        match name {
            "toBoolean" | "convertsToBoolean" => self.convert(name, input, |i| match i.prim() {
                Prim::Bool(b) => Some(Item::Boolean(b)),
                Prim::Int(1) => Some(Item::Boolean(true)),
                Prim::Int(0) => Some(Item::Boolean(false)),
                Prim::Dec(d) if d == Decimal::ONE => Some(Item::Boolean(true)),
                Prim::Dec(d) if d.is_zero() => Some(Item::Boolean(false)),
                Prim::Str(s) => match s.to_ascii_lowercase().as_str() {
                    "true" | "t" | "yes" | "y" | "1" | "1.0" => Some(Item::Boolean(true)),
                    "false" | "f" | "no" | "n" | "0" | "0.0" => Some(Item::Boolean(false)),
                    _ => None,
                },
                _ => None,
            }),
            "toInteger" | "convertsToInteger" => self.convert(name, input, |i| match i.prim() {
                Prim::Int(n) => Some(Item::Integer(n)),
                Prim::Bool(b) => Some(Item::Integer(b as i64)),
                Prim::Str(s) if is_int_text(s) => s
                    .trim_start_matches('+')
                    .parse::<i32>()
                    .ok()
                    .map(|n| Item::Integer(n as i64)),
                _ => None,
            }),
            "toDecimal" | "convertsToDecimal" => self.convert(name, input, |i| match i.prim() {
                Prim::Int(n) => Some(Item::Decimal(Decimal::from(n))),
                Prim::Dec(d) => Some(Item::Decimal(d)),
                Prim::Bool(b) => Some(Item::Decimal(if b { Decimal::ONE } else { Decimal::ZERO })),
                Prim::Str(s) if is_dec_text(s) => {
                    Decimal::from_str_exact(s.trim_start_matches('+'))
                        .ok()
                        .map(Item::Decimal)
                }
                _ => None,
            }),
            "toString" | "convertsToString" => {
                self.convert(name, input, |i| i.to_fhirpath_string().map(Item::String))
            }
            "toDate" | "convertsToDate" => self.convert(name, input, |i| match i.prim() {
                Prim::Date(d) => Some(Item::Date(d)),
                Prim::DateTime(mut d) => {
                    d.precision = d.precision.min(Precision::Day);
                    d.tz_minutes = None;
                    Some(Item::Date(d))
                }
                Prim::Str(s) => DateTimeValue::parse_date(s).map(Item::Date).or_else(|| {
                    DateTimeValue::parse_datetime(s).map(|mut d| {
                        d.precision = d.precision.min(Precision::Day);
                        d.tz_minutes = None;
                        Item::Date(d)
                    })
                }),
                _ => None,
            }),
            "toDateTime" | "convertsToDateTime" => self.convert(name, input, |i| match i.prim() {
                Prim::Date(d) | Prim::DateTime(d) => Some(Item::DateTime(d)),
                Prim::Str(s) => DateTimeValue::parse_datetime(s).map(Item::DateTime),
                _ => None,
            }),
            "toTime" | "convertsToTime" => self.convert(name, input, |i| match i.prim() {
                Prim::Time(t) => Some(Item::Time(t)),
                Prim::Str(s) => TimeValue::parse(s.strip_prefix('T').unwrap_or(s)).map(Item::Time),
                _ => None,
            }),
            "toQuantity" | "convertsToQuantity" => {
                let target_unit = self.arg_string(args, 0, fr)?;
                self.convert(name, input, |i| {
                    let q = match i.prim() {
                        Prim::Int(n) => Quantity {
                            value: Decimal::from(n),
                            unit: "1".into(),
                        },
                        Prim::Dec(d) => Quantity {
                            value: d,
                            unit: "1".into(),
                        },
                        Prim::Bool(b) => Quantity {
                            value: if b { Decimal::ONE } else { Decimal::ZERO },
                            unit: "1".into(),
                        },
                        Prim::Qty(q) => q.into_owned(),
                        Prim::Str(s) => parse_quantity_str(s)?,
                        _ => return None,
                    };
                    match &target_unit {
                        None => Some(Item::Quantity(q)),
                        Some(u) => units::convert(q.value, &q.unit, u).map(|v| {
                            Item::Quantity(Quantity {
                                value: v,
                                unit: u.clone(),
                            })
                        }),
                    }
                })
            }
            // ---- strings
            _ => Err(Error::semantic(format!("unknown function {name}()"), None)),
        }
    }

    #[inline(never)]
    fn call_string(
        &self,
        name: &str,
        input: Coll<'a>,
        args: &[Ast],
        fr: Frame<'_, 'a>,
    ) -> R<Coll<'a>> {
        let _ = (&args, &fr);
        match name {
            "indexOf" | "lastIndexOf" => self.string_fn(input, |s| {
                let Some(sub) = self.arg_string(args, 0, fr)? else {
                    return Ok(None);
                };
                let found = if name == "indexOf" {
                    s.find(&sub)
                } else {
                    s.rfind(&sub)
                };
                Ok(Some(Item::Integer(match found {
                    Some(b) => s[..b].chars().count() as i64,
                    None => -1,
                })))
            }),
            "substring" => self.string_fn(input, |s| {
                let Some(start) = self.arg_int(args, 0, fr)? else {
                    return Ok(None);
                };
                let len = if args.len() > 1 {
                    match self.arg_int(args, 1, fr)? {
                        Some(l) => Some(l),
                        None => return Ok(None),
                    }
                } else {
                    None
                };
                let n = s.chars().count() as i64;
                if start < 0 || start >= n {
                    return Ok(None);
                }
                let take = len.unwrap_or(n).max(0) as usize;
                Ok(Some(Item::String(
                    s.chars().skip(start as usize).take(take).collect(),
                )))
            }),
            "startsWith" | "endsWith" | "contains" => self.string_fn(input, |s| {
                let Some(sub) = self.arg_string(args, 0, fr)? else {
                    return Ok(None);
                };
                Ok(Some(Item::Boolean(match name {
                    "startsWith" => s.starts_with(&sub),
                    "endsWith" => s.ends_with(&sub),
                    _ => s.contains(&sub),
                })))
            }),
            "upper" => self.string_fn(input, |s| Ok(Some(Item::String(s.to_uppercase())))),
            "lower" => self.string_fn(input, |s| Ok(Some(Item::String(s.to_lowercase())))),
            "trim" => self.string_fn(input, |s| Ok(Some(Item::String(s.trim().to_string())))),
            "length" => {
                self.string_fn(input, |s| Ok(Some(Item::Integer(s.chars().count() as i64))))
            }
            "toChars" => {
                let Some(item) = single(&input, "toChars")? else {
                    return Ok(vec![]);
                };
                match item.prim() {
                    Prim::Str(s) => Ok(s.chars().map(|c| Item::String(c.to_string())).collect()),
                    _ => Err(exec("toChars() expects a String")),
                }
            }
            "replace" => self.string_fn(input, |s| {
                let (Some(pat), Some(rep)) =
                    (self.arg_string(args, 0, fr)?, self.arg_string(args, 1, fr)?)
                else {
                    return Ok(None);
                };
                if pat.is_empty() {
                    let mut out = rep.clone();
                    for c in s.chars() {
                        out.push(c);
                        out.push_str(&rep);
                    }
                    return Ok(Some(Item::String(out)));
                }
                Ok(Some(Item::String(s.replace(&pat, &rep))))
            }),
            "matches" | "matchesFull" => self.string_fn(input, |s| {
                let Some(pat) = self.arg_string(args, 0, fr)? else {
                    return Ok(None);
                };
                let pat = if name == "matchesFull" {
                    format!("^(?:{pat})$")
                } else {
                    pat
                };
                let re = crate::regex_cached(&pat)?;
                Ok(Some(Item::Boolean(re.is_match(s))))
            }),
            "replaceMatches" => self.string_fn(input, |s| {
                let (Some(pat), Some(rep)) =
                    (self.arg_string(args, 0, fr)?, self.arg_string(args, 1, fr)?)
                else {
                    return Ok(None);
                };
                if pat.is_empty() {
                    return Ok(Some(Item::String(s.to_string())));
                }
                let re = crate::regex_cached(&pat)?;
                let rep = group_refs_braced(&rep);
                Ok(Some(Item::String(
                    re.replace_all(s, rep.as_str()).into_owned(),
                )))
            }),
            "split" => self.string_fn_multi(input, |s| {
                let Some(sep) = self.arg_string(args, 0, fr)? else {
                    return Ok(vec![]);
                };
                if sep.is_empty() {
                    return Ok(s.chars().map(|c| Item::String(c.to_string())).collect());
                }
                Ok(s.split(sep.as_str())
                    .map(|p| Item::String(p.to_string()))
                    .collect())
            }),
            "join" => {
                let sep = self.arg_string(args, 0, fr)?.unwrap_or_default();
                let mut parts = Vec::with_capacity(input.len());
                for i in &input {
                    match i.prim() {
                        Prim::Str(s) => parts.push(s.to_string()),
                        p => {
                            return Err(exec(format!(
                                "join() expects Strings, got {}",
                                prim_type_name(&p)
                            )))
                        }
                    }
                }
                Ok(vec![Item::String(parts.join(&sep))])
            }
            "encode" | "decode" | "escape" | "unescape" => self.string_fn(input, |s| {
                let Some(fmt) = self.arg_string(args, 0, fr)? else {
                    return Ok(None);
                };
                Ok(crate::strings::transform(name, &fmt, s).map(Item::String))
            }),
            // ---- math
            _ => Err(Error::semantic(format!("unknown function {name}()"), None)),
        }
    }

    #[inline(never)]
    fn call_math(
        &self,
        name: &str,
        input: Coll<'a>,
        args: &[Ast],
        fr: Frame<'_, 'a>,
    ) -> R<Coll<'a>> {
        let _ = (&args, &fr);
        match name {
            "abs" | "ceiling" | "floor" | "truncate" | "exp" | "ln" | "sqrt" => {
                let Some(item) = single(&input, name)? else {
                    return Ok(vec![]);
                };
                Ok(math1(name, &item.prim())?.into_iter().collect())
            }
            "round" => {
                let Some(item) = single(&input, name)? else {
                    return Ok(vec![]);
                };
                let digits = self.arg_int(args, 0, fr)?.unwrap_or(0);
                if !(0..=28).contains(&digits) {
                    return Err(exec("round() precision must be between 0 and 28"));
                }
                match dec_of(&item.prim()) {
                    Some(d) => Ok(vec![Item::Decimal(d.round_dp_with_strategy(
                        digits as u32,
                        RoundingStrategy::MidpointAwayFromZero,
                    ))]),
                    None => Err(exec("round() expects a number")),
                }
            }
            "log" | "power" => {
                let Some(item) = single(&input, name)? else {
                    return Ok(vec![]);
                };
                let a = self.arg(args, 0, fr)?;
                let Some(arg) = single(&a, name)? else {
                    return Ok(vec![]);
                };
                let (x, y) = (item.prim(), arg.prim());
                if name == "power" {
                    if let (Prim::Int(b), Prim::Int(e)) = (&x, &y) {
                        if *e >= 0 {
                            return Ok(u32::try_from(*e)
                                .ok()
                                .and_then(|e| b.checked_pow(e))
                                .map(Item::Integer)
                                .into_iter()
                                .collect());
                        }
                    }
                }
                let (Some(xv), Some(yv)) = (dec_of(&x), dec_of(&y)) else {
                    return Err(exec(format!("{name}() expects numbers")));
                };
                let r = if name == "log" {
                    to_f64(xv).ln() / to_f64(yv).ln()
                } else {
                    to_f64(xv).powf(to_f64(yv))
                };
                Ok(from_f64(r).map(Item::Decimal).into_iter().collect())
            }
            // ---- tree navigation
            _ => Err(Error::semantic(format!("unknown function {name}()"), None)),
        }
    }

    #[inline(never)]
    fn call_misc(
        &self,
        name: &str,
        input: Coll<'a>,
        args: &[Ast],
        fr: Frame<'_, 'a>,
    ) -> R<Coll<'a>> {
        let _ = (&args, &fr);
        match name {
            "children" => {
                let mut out = Vec::new();
                for i in &input {
                    self.children(i, &mut out);
                }
                Ok(out)
            }
            "descendants" => {
                let mut out = Vec::new();
                let mut level = input;
                while !level.is_empty() {
                    let mut next = Vec::new();
                    for i in &level {
                        self.children(i, &mut next);
                    }
                    out.extend(next.iter().cloned());
                    level = next;
                }
                Ok(out)
            }
            // ---- utility
            "trace" => Ok(input),
            "now" => Ok(vec![Item::DateTime(DateTimeValue::now())]),
            "today" => Ok(vec![Item::Date(DateTimeValue::today())]),
            "timeOfDay" => Ok(vec![Item::Time(TimeValue::now())]),
            "not" => Ok(opt_bool(singleton_bool(&input, "not()")?.map(|b| !b))),
            "aggregate" => {
                let mut total = self.arg(args, 1, fr)?;
                for (i, item) in input.iter().enumerate() {
                    total = self.eval(
                        &args[0],
                        Frame {
                            focus: std::slice::from_ref(item),
                            index: Some(i),
                            total: Some(&total),
                        },
                    )?;
                }
                Ok(total)
            }
            "sort" => self.sort(input, args),
            "type" => Ok(input.iter().map(type_info_item).collect()),
            // ---- FHIR extras
            "extension" => {
                let Some(url) = self.arg_string(args, 0, fr)? else {
                    return Ok(vec![]);
                };
                let mut exts = Vec::new();
                for i in &input {
                    self.navigate(i, "extension", &mut exts)?;
                }
                Ok(exts
                    .into_iter()
                    .filter(|e| {
                        e.as_json_node()
                            .and_then(|v| v.get("url"))
                            .and_then(Value::as_str)
                            == Some(url.as_str())
                    })
                    .collect())
            }
            "hasValue" => Ok(bool_coll(match input.as_slice() {
                [Item::Node(n)] => n.value.as_deref().is_some_and(|v| !v.is_object()),
                [_] => true,
                _ => false,
            })),
            "getValue" => Ok(match input.as_slice() {
                [Item::Node(n)] => match n.prim() {
                    Prim::Bool(b) => vec![Item::Boolean(b)],
                    Prim::Str(s) => vec![Item::String(s.to_string())],
                    Prim::Int(i) => vec![Item::Integer(i)],
                    Prim::Dec(d) => vec![Item::Decimal(d)],
                    Prim::Date(d) => vec![Item::Date(d)],
                    Prim::DateTime(d) => vec![Item::DateTime(d)],
                    Prim::Time(t) => vec![Item::Time(t)],
                    _ => vec![],
                },
                [one] if system_type_name(one).is_some() => input,
                _ => vec![],
            }),
            "resolve" => {
                let mut out = Vec::new();
                for i in &input {
                    let reference = match i.prim() {
                        Prim::Str(s) => Some(s.to_string()),
                        Prim::Obj(v) => v
                            .get("reference")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        _ => None,
                    };
                    if let Some(r) = reference {
                        if let Some(item) = self.resolve_reference(&r) {
                            out.push(item);
                        }
                    }
                }
                Ok(out)
            }
            "memberOf" => {
                let Some(url) = self.arg_string(args, 0, fr)? else {
                    return Ok(vec![]);
                };
                let Some(item) = single(&input, "memberOf")? else {
                    return Ok(vec![]);
                };
                let Some(hook) = self.ctx.member_of else {
                    // No terminology service configured: unknown → empty.
                    return Ok(vec![]);
                };
                Ok(opt_bool(hook(&item.to_json(), &url)))
            }
            "subsumes" | "subsumedBy" => {
                // No terminology service in the engine: unknown → empty.
                Ok(vec![])
            }
            "conformsTo" => {
                let Some(url) = self.arg_string(args, 0, fr)? else {
                    return Ok(vec![]);
                };
                let Some(item) = single(&input, "conformsTo")? else {
                    return Ok(vec![]);
                };
                match url.strip_prefix("http://hl7.org/fhir/StructureDefinition/") {
                    Some(t) if model::is_fhir_type(t) => Ok(bool_coll(item_is(
                        item,
                        &TypeSpec {
                            namespace: None,
                            name: t.to_string(),
                        },
                        false,
                    ))),
                    _ => Err(exec(format!(
                        "conformsTo(): profile '{url}' is not known (only base types are)"
                    ))),
                }
            }
            "htmlChecks" | "htmlchecks" => Ok(bool_coll(true)),
            "lowBoundary" | "highBoundary" => {
                let Some(item) = single(&input, name)? else {
                    return Ok(vec![]);
                };
                let precision = self.arg_int(args, 0, fr)?;
                Ok(
                    crate::boundary::boundary(&item.prim(), name == "highBoundary", precision)
                        .into_iter()
                        .collect(),
                )
            }
            "precision" => {
                let Some(item) = single(&input, name)? else {
                    return Ok(vec![]);
                };
                Ok(crate::boundary::precision(item).into_iter().collect())
            }
            "comparable" => {
                let Some(item) = single(&input, name)? else {
                    return Ok(vec![]);
                };
                let other = self.arg(args, 0, fr)?;
                let Some(o) = single(&other, name)? else {
                    return Ok(vec![]);
                };
                match (item.prim(), o.prim()) {
                    (Prim::Qty(a), Prim::Qty(b)) => Ok(bool_coll(qty_cmp(&a, &b).is_some())),
                    _ => Err(exec("comparable() expects Quantities")),
                }
            }
            "sum" | "min" | "max" | "avg" => self.aggregate_fn(name, input),
            _ => Err(Error::semantic(format!("unknown function {name}()"), None)),
        }
    }

    fn aggregate_fn(&self, name: &str, input: Coll<'a>) -> R<Coll<'a>> {
        if input.is_empty() {
            return Ok(if name == "sum" {
                vec![Item::Integer(0)]
            } else {
                vec![]
            });
        }
        match name {
            "sum" | "avg" => {
                let mut acc: Option<Item<'a>> = None;
                for i in &input {
                    acc = Some(match acc {
                        None => i.clone(),
                        Some(a) => arith(BinOp::Add, &a.prim(), &i.prim())?
                            .ok_or_else(|| exec("sum(): overflow"))?,
                    });
                }
                let total = acc.unwrap_or(Item::Integer(0));
                if name == "sum" {
                    return Ok(vec![total]);
                }
                Ok(
                    arith(BinOp::Div, &total.prim(), &Prim::Int(input.len() as i64))?
                        .into_iter()
                        .collect(),
                )
            }
            _ => {
                let mut best = input[0].clone();
                for i in &input[1..] {
                    let o = prim_cmp(&i.prim(), &best.prim())?;
                    let better = match o {
                        Some(Ordering::Less) => name == "min",
                        Some(Ordering::Greater) => name == "max",
                        _ => false,
                    };
                    if better {
                        best = i.clone();
                    }
                }
                Ok(vec![best])
            }
        }
    }

    fn sort(&self, input: Coll<'a>, args: &[Ast]) -> R<Coll<'a>> {
        let mut keyed: Vec<(Vec<Coll<'a>>, Item<'a>)> = Vec::with_capacity(input.len());
        let mut desc = Vec::new();
        let keys: Vec<&Ast> = args
            .iter()
            .map(|a| match a {
                Ast::Negate(inner, _) => {
                    desc.push(true);
                    &**inner
                }
                other => {
                    desc.push(false);
                    other
                }
            })
            .collect();
        for (i, item) in input.into_iter().enumerate() {
            let mut ks = Vec::with_capacity(keys.len());
            for k in &keys {
                ks.push(self.lambda(k, &item, i)?);
            }
            keyed.push((ks, item));
        }
        let mut err = None;
        let cmp_items = |a: &Item<'_>, b: &Item<'_>, err: &mut Option<Error>| -> Ordering {
            match prim_cmp(&a.prim(), &b.prim()) {
                Ok(Some(o)) => o,
                Ok(None) => Ordering::Equal,
                Err(e) => {
                    err.get_or_insert(e);
                    Ordering::Equal
                }
            }
        };
        if keys.is_empty() {
            keyed.sort_by(|a, b| cmp_items(&a.1, &b.1, &mut err));
        } else {
            keyed.sort_by(|a, b| {
                for (k, d) in desc.iter().enumerate() {
                    // Empty keys sort first in both directions.
                    let o = match (a.0[k].first(), b.0[k].first()) {
                        (None, None) => Ordering::Equal,
                        (None, Some(_)) => Ordering::Less,
                        (Some(_), None) => Ordering::Greater,
                        (Some(x), Some(y)) => {
                            let o = cmp_items(x, y, &mut err);
                            if *d {
                                o.reverse()
                            } else {
                                o
                            }
                        }
                    };
                    if o != Ordering::Equal {
                        return o;
                    }
                }
                Ordering::Equal
            });
        }
        if let Some(e) = err {
            return Err(e);
        }
        Ok(keyed.into_iter().map(|(_, i)| i).collect())
    }

    fn convert(
        &self,
        name: &str,
        input: Coll<'a>,
        f: impl Fn(&Item<'a>) -> Option<Item<'a>>,
    ) -> R<Coll<'a>> {
        let Some(item) = single(&input, name)? else {
            return Ok(vec![]);
        };
        let r = f(item);
        if name.starts_with("convertsTo") {
            Ok(bool_coll(r.is_some()))
        } else {
            Ok(r.into_iter().collect())
        }
    }

    fn string_fn(
        &self,
        input: Coll<'a>,
        f: impl FnOnce(&str) -> R<Option<Item<'a>>>,
    ) -> R<Coll<'a>> {
        let Some(item) = single(&input, "string function")? else {
            return Ok(vec![]);
        };
        let s = string_of(item)?;
        Ok(f(&s)?.into_iter().collect())
    }

    fn string_fn_multi(&self, input: Coll<'a>, f: impl FnOnce(&str) -> R<Coll<'a>>) -> R<Coll<'a>> {
        let Some(item) = single(&input, "string function")? else {
            return Ok(vec![]);
        };
        let s = string_of(item)?;
        f(&s)
    }

    fn resolve_reference(&self, reference: &str) -> Option<Item<'a>> {
        if let Some(id) = reference.strip_prefix('#') {
            for holder in [self.resource, self.root].into_iter().flatten() {
                if let Some(arr) = holder.get("contained").and_then(Value::as_array) {
                    if let Some(r) = arr
                        .iter()
                        .find(|c| c.get("id").and_then(Value::as_str) == Some(id))
                    {
                        return Some(resource_item(r));
                    }
                }
            }
            return None;
        }
        let plain = match reference.find("/_history/") {
            Some(i) => &reference[..i],
            None => reference,
        };
        for holder in [self.root, self.resource].into_iter().flatten() {
            if holder.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
                continue;
            }
            let Some(entries) = holder.get("entry").and_then(Value::as_array) else {
                continue;
            };
            for e in entries {
                let Some(res) = e.get("resource") else {
                    continue;
                };
                let full = e.get("fullUrl").and_then(Value::as_str);
                if full == Some(plain) {
                    return Some(resource_item(res));
                }
                let (Some(t), Some(id)) = (
                    res.get("resourceType").and_then(Value::as_str),
                    res.get("id").and_then(Value::as_str),
                ) else {
                    continue;
                };
                let rel_len = t.len() + 1 + id.len();
                if plain.len() >= rel_len && plain.ends_with(id) {
                    let rel = &plain[plain.len() - rel_len..];
                    let prefix_ok = plain.len() == rel_len
                        || plain.as_bytes()[plain.len() - rel_len - 1] == b'/';
                    if prefix_ok && rel.starts_with(t) && rel.as_bytes()[t.len()] == b'/' {
                        return Some(resource_item(res));
                    }
                }
            }
        }
        if let Some(resolver) = self.ctx.resolver {
            if let Some(v) = resolver(reference) {
                return Some(owned_item(v));
            }
        }
        if self.ctx.reference_stubs {
            return reference_stub(plain);
        }
        None
    }
}

/// `{"resourceType": T, "id": id}` for a `…/T/id` reference whose `T` is a resource type.
fn reference_stub(reference: &str) -> Option<Item<'static>> {
    let mut parts = reference.rsplit('/');
    let id = parts.next()?;
    let t = parts.next()?;
    let t = model::resource_type(t)?;
    if id.is_empty() {
        return None;
    }
    let mut m = serde_json::Map::new();
    m.insert("resourceType".into(), Value::String(t.to_string()));
    m.insert("id".into(), Value::String(id.to_string()));
    Some(Item::node(
        JsonRef::Shared(Arc::new(Value::Object(m))),
        Some(t),
    ))
}

/// `$1x` means group 1 then `x` (Java/JS style); the regex crate would read group `1x`.
fn group_refs_braced(rep: &str) -> String {
    let mut out = String::with_capacity(rep.len() + 4);
    let b = rep.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            let start = i + 1;
            let mut j = start;
            while b.get(j).is_some_and(u8::is_ascii_digit) {
                j += 1;
            }
            out.push_str("${");
            out.push_str(&rep[start..j]);
            out.push('}');
            i = j;
        } else {
            let c = rep[i..].chars().next().unwrap_or('\u{fffd}');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// Calls `f` with `_name` without allocating for ordinary element names.
fn with_underscore<T>(name: &str, f: impl FnOnce(&str) -> T) -> T {
    let mut buf = [0u8; 64];
    if name.len() < buf.len() {
        buf[0] = b'_';
        buf[1..=name.len()].copy_from_slice(name.as_bytes());
        if let Ok(k) = std::str::from_utf8(&buf[..=name.len()]) {
            return f(k);
        }
    }
    f(&format!("_{name}"))
}

fn string_of<'x>(item: &'x Item<'_>) -> R<Cow<'x, str>> {
    if let Item::Node(n) = item {
        if let Some(Value::String(s)) = n.value.as_deref() {
            return Ok(Cow::Borrowed(s.as_str()));
        }
    }
    match item.prim() {
        Prim::Str(s) => Ok(Cow::Borrowed(s)),
        p => Err(exec(format!(
            "expected a String, got {}",
            prim_type_name(&p)
        ))),
    }
}

fn type_info_item(item: &Item<'_>) -> Item<'static> {
    let (ns, name) = match item {
        Item::Node(n) => ("FHIR", node_type_guess(n).unwrap_or("Element").to_string()),
        other => (
            "System",
            system_type_name(other).unwrap_or("Any").to_string(),
        ),
    };
    let mut m = serde_json::Map::new();
    m.insert("namespace".into(), Value::String(ns.into()));
    m.insert("name".into(), Value::String(name));
    Item::node(JsonRef::Shared(Arc::new(Value::Object(m))), None)
}

fn literal_item(l: &Literal) -> Item<'static> {
    match l {
        Literal::Boolean(b) => Item::Boolean(*b),
        Literal::String(s) => Item::String(s.clone()),
        Literal::Integer(i) => Item::Integer(*i),
        Literal::Decimal(d) => Item::Decimal(*d),
        Literal::Date(d) => Item::Date(*d),
        Literal::DateTime(d) => Item::DateTime(*d),
        Literal::Time(t) => Item::Time(*t),
        Literal::Quantity(q) => Item::Quantity(q.clone()),
    }
}

fn math1<'a>(name: &str, p: &Prim<'_>) -> R<Option<Item<'a>>> {
    let bad = || exec(format!("{name}() expects a number"));
    Ok(match (name, p) {
        ("abs", Prim::Int(i)) => Some(Item::Integer(
            i.checked_abs().ok_or_else(|| exec("integer overflow"))?,
        )),
        ("abs", Prim::Dec(d)) => Some(Item::Decimal(d.abs())),
        ("abs", Prim::Qty(q)) => Some(Item::Quantity(Quantity {
            value: q.value.abs(),
            unit: q.unit.clone(),
        })),
        ("ceiling" | "floor" | "truncate", Prim::Int(i)) => Some(Item::Integer(*i)),
        ("ceiling" | "floor" | "truncate", Prim::Dec(d)) => {
            let r = match name {
                "ceiling" => d.ceil(),
                "floor" => d.floor(),
                _ => d.trunc(),
            };
            Some(Item::Integer(
                r.to_i64().ok_or_else(|| exec("integer overflow"))?,
            ))
        }
        ("exp" | "ln" | "sqrt", Prim::Int(_) | Prim::Dec(_)) => {
            let x = to_f64(dec_of(p).ok_or_else(bad)?);
            let r = match name {
                "exp" => x.exp(),
                "ln" => x.ln(),
                _ => x.sqrt(),
            };
            from_f64(r).map(Item::Decimal)
        }
        _ => return Err(bad()),
    })
}

fn arith<'a>(op: BinOp, a: &Prim<'_>, b: &Prim<'_>) -> R<Option<Item<'a>>> {
    use Prim::*;
    let overflow = || exec("arithmetic overflow");
    let type_err = || {
        exec(format!(
            "operator cannot be applied to {} and {}",
            prim_type_name(a),
            prim_type_name(b)
        ))
    };
    Ok(match (a, b) {
        (Null, _) | (_, Null) => None,
        (Int(x), Int(y)) => match op {
            BinOp::Add => Some(Item::Integer(x.checked_add(*y).ok_or_else(overflow)?)),
            BinOp::Sub => Some(Item::Integer(x.checked_sub(*y).ok_or_else(overflow)?)),
            BinOp::Mul => Some(Item::Integer(x.checked_mul(*y).ok_or_else(overflow)?)),
            BinOp::Div => {
                if *y == 0 {
                    None
                } else {
                    Decimal::from(*x)
                        .checked_div(Decimal::from(*y))
                        .map(Item::Decimal)
                }
            }
            BinOp::IntDiv => {
                if *y == 0 {
                    None
                } else {
                    Some(Item::Integer(x.checked_div(*y).ok_or_else(overflow)?))
                }
            }
            BinOp::Mod => {
                if *y == 0 {
                    None
                } else {
                    Some(Item::Integer(x.checked_rem(*y).ok_or_else(overflow)?))
                }
            }
            _ => return Err(type_err()),
        },
        (Int(_) | Dec(_), Int(_) | Dec(_)) => {
            let (x, y) = (
                dec_of(a).ok_or_else(type_err)?,
                dec_of(b).ok_or_else(type_err)?,
            );
            match op {
                BinOp::Add => Some(Item::Decimal(x.checked_add(y).ok_or_else(overflow)?)),
                BinOp::Sub => Some(Item::Decimal(x.checked_sub(y).ok_or_else(overflow)?)),
                BinOp::Mul => Some(Item::Decimal(x.checked_mul(y).ok_or_else(overflow)?)),
                BinOp::Div => {
                    if y.is_zero() {
                        None
                    } else {
                        Some(Item::Decimal(x.checked_div(y).ok_or_else(overflow)?))
                    }
                }
                BinOp::IntDiv => {
                    if y.is_zero() {
                        None
                    } else {
                        let q = x.checked_div(y).ok_or_else(overflow)?.trunc();
                        Some(Item::Integer(q.to_i64().ok_or_else(overflow)?))
                    }
                }
                BinOp::Mod => {
                    if y.is_zero() {
                        None
                    } else {
                        Some(Item::Decimal(x.checked_rem(y).ok_or_else(overflow)?))
                    }
                }
                _ => return Err(type_err()),
            }
        }
        (Str(x), Str(y)) if op == BinOp::Add => Some(Item::String(format!("{x}{y}"))),
        (Date(_) | DateTime(_), Qty(q)) if matches!(op, BinOp::Add | BinOp::Sub) => {
            let d = dt_of(a).ok_or_else(type_err)?;
            let unit = calendar_name(&q.unit)
                .ok_or_else(|| exec(format!("'{}' is not a time-valued unit", q.unit)))?;
            let amount = to_f64(q.value) * if op == BinOp::Sub { -1.0 } else { 1.0 };
            let r = d
                .add(amount, unit)
                .ok_or_else(|| exec("date arithmetic out of range"))?;
            Some(if matches!(a, Date(_)) {
                Item::Date(r)
            } else {
                Item::DateTime(r)
            })
        }
        (Time(t), Qty(q)) if matches!(op, BinOp::Add | BinOp::Sub) => {
            let unit = calendar_name(&q.unit)
                .ok_or_else(|| exec(format!("'{}' is not a time-valued unit", q.unit)))?;
            let amount = to_f64(q.value) * if op == BinOp::Sub { -1.0 } else { 1.0 };
            t.add(amount, unit).map(Item::Time)
        }
        (Qty(x), Qty(y)) => match op {
            BinOp::Add | BinOp::Sub => {
                let yv = if x.unit == y.unit {
                    Some(y.value)
                } else {
                    units::convert(y.value, &y.unit, &x.unit)
                };
                match yv {
                    None => None,
                    Some(yv) => {
                        let v = if op == BinOp::Add {
                            x.value.checked_add(yv)
                        } else {
                            x.value.checked_sub(yv)
                        }
                        .ok_or_else(overflow)?;
                        Some(Item::Quantity(Quantity {
                            value: v,
                            unit: x.unit.clone(),
                        }))
                    }
                }
            }
            BinOp::Mul | BinOp::Div => {
                let value = if op == BinOp::Mul {
                    x.value.checked_mul(y.value)
                } else {
                    if y.value.is_zero() {
                        return Ok(None);
                    }
                    x.value.checked_div(y.value)
                }
                .ok_or_else(overflow)?;
                Some(Item::Quantity(Quantity {
                    value,
                    unit: combine_units(&x.unit, &y.unit, op == BinOp::Mul),
                }))
            }
            _ => return Err(type_err()),
        },
        (Qty(x), Int(_) | Dec(_)) if matches!(op, BinOp::Mul | BinOp::Div) => {
            let y = dec_of(b).ok_or_else(type_err)?;
            let value = if op == BinOp::Mul {
                x.value.checked_mul(y)
            } else {
                if y.is_zero() {
                    return Ok(None);
                }
                x.value.checked_div(y)
            }
            .ok_or_else(overflow)?;
            Some(Item::Quantity(Quantity {
                value,
                unit: x.unit.clone(),
            }))
        }
        (Int(_) | Dec(_), Qty(y)) if op == BinOp::Mul => {
            let x = dec_of(a).ok_or_else(type_err)?;
            Some(Item::Quantity(Quantity {
                value: x.checked_mul(y.value).ok_or_else(overflow)?,
                unit: y.unit.clone(),
            }))
        }
        _ => {
            if is_temporal(a) || is_temporal(b) {
                return Err(type_err());
            }
            return Err(type_err());
        }
    })
}

fn ucum_of(unit: &str) -> String {
    match units::calendar_unit(unit) {
        Some("week") => "wk".into(),
        Some("day") => "d".into(),
        Some("hour") => "h".into(),
        Some("minute") => "min".into(),
        Some("second") => "s".into(),
        Some("millisecond") => "ms".into(),
        Some("year") => "a".into(),
        Some("month") => "mo".into(),
        _ => unit.to_string(),
    }
}

fn combine_units(a: &str, b: &str, mul: bool) -> String {
    let (a, b) = (ucum_of(a), ucum_of(b));
    let wrap = |u: &str| {
        if u.contains('/') || u.contains('.') {
            format!("({u})")
        } else {
            u.to_string()
        }
    };
    if mul {
        match (a.as_str(), b.as_str()) {
            ("1", _) => b,
            (_, "1") => a,
            _ => format!("{}.{}", wrap(&a), wrap(&b)),
        }
    } else if b == "1" {
        a
    } else if a == b {
        "1".into()
    } else {
        format!("{}/{}", wrap(&a), wrap(&b))
    }
}

/// Used by `quantity_from_json` users outside this module.
#[allow(dead_code)]
pub(crate) fn node_quantity(v: &Value) -> Option<Quantity> {
    quantity_from_json(v)
}
