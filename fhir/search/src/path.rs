//! A compiled evaluator for the FHIRPath subset used by SearchParameter `expression`s.
//!
//! The 1,378 official R4 SearchParameters only use: member paths, `|` unions, parentheses,
//! `as T` / `.as(T)` / `.ofType(T)` on choice elements, `.where(resolve() is T)`,
//! `.where(field='literal')`, `[n]` indexing, `.first()`, `%resource`, and the single
//! `X.exists() and X != false` (Patient-deceased). Evaluating this subset directly on
//! `serde_json::Value` is an order of magnitude faster than a general FHIRPath engine, which
//! matters for the ingest target (tens of thousands of resources per second). Expressions
//! outside the subset fail to compile ([`PathExpr::compile`] returns `Err`) and the registry
//! records that parameter as not indexable.

use serde_json::Value;

/// One evaluation result: a JSON node plus the FHIR type known from a choice suffix
/// (`valueQuantity` → `Quantity`) or an `as` cast.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    pub value: &'a Value,
    pub type_hint: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Base {
    /// A resource type name (`Patient`, `Resource`, `DomainResource`).
    Type(String),
    /// Relative to the context node (composite components).
    This,
    /// `%resource`.
    Resource,
    Group(Box<PathExpr>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    Field(String),
    As(String),
    WhereResolveIs(String),
    WhereFieldEq(String, String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq)]
/// One union term of a compiled expression.
pub struct Term {
    base: Base,
    steps: Vec<Step>,
}

/// A compiled search expression.
#[derive(Debug, Clone, PartialEq)]
pub enum PathExpr {
    Union(Vec<Term>),
    /// `X.exists() and X != false`: yields a boolean `true` node when X exists and is not `false`.
    ExistsNotFalse(Box<PathExpr>),
}

static TRUE: Value = Value::Bool(true);
static FALSE: Value = Value::Bool(false);

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(usize),
    Sym(&'static str),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == '%' {
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let n: String = chars[start..i].iter().collect();
            out.push(Tok::Num(n.parse().map_err(|_| "bad number".to_string())?));
        } else if c == '\'' {
            let mut v = String::new();
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                v.push(chars[i]);
                i += 1;
            }
            if i >= chars.len() {
                return Err("unterminated string".into());
            }
            i += 1;
            out.push(Tok::Str(v));
        } else if c == '!' && chars.get(i + 1) == Some(&'=') {
            out.push(Tok::Sym("!="));
            i += 2;
        } else {
            let sym = match c {
                '.' => ".",
                '(' => "(",
                ')' => ")",
                '|' => "|",
                '[' => "[",
                ']' => "]",
                '=' => "=",
                _ => return Err(format!("unsupported character '{c}'")),
            };
            out.push(Tok::Sym(sym));
            i += 1;
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    relative: bool,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn eat_sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(x)) if *x == s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect_sym(&mut self, s: &str) -> Result<(), String> {
        if self.eat_sym(s) {
            Ok(())
        } else {
            Err(format!("expected '{s}'"))
        }
    }
    fn ident(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Ident(s)) => Ok(s),
            t => Err(format!("expected identifier, found {t:?}")),
        }
    }

    fn union(&mut self) -> Result<Vec<Term>, String> {
        let mut terms = vec![self.term()?];
        while self.eat_sym("|") {
            terms.push(self.term()?);
        }
        Ok(terms)
    }

    fn term(&mut self) -> Result<Term, String> {
        let mut steps = Vec::new();
        let base = if self.eat_sym("(") {
            let inner = self.union()?;
            self.expect_sym(")")?;
            Base::Group(Box::new(PathExpr::Union(inner)))
        } else {
            let id = self.ident()?;
            if id == "%resource" {
                Base::Resource
            } else if self.relative || id.starts_with(|c: char| c.is_ascii_lowercase()) {
                steps.push(Step::Field(id));
                Base::This
            } else {
                Base::Type(id)
            }
        };
        loop {
            if self.eat_sym(".") {
                let name = self.ident()?;
                if self.eat_sym("(") {
                    match name.as_str() {
                        "as" | "ofType" => {
                            let t = self.ident()?;
                            steps.push(Step::As(t));
                        }
                        "first" => steps.push(Step::Index(0)),
                        "where" => {
                            let first = self.ident()?;
                            if first == "resolve" {
                                self.expect_sym("(")?;
                                self.expect_sym(")")?;
                                if self.ident()? != "is" {
                                    return Err("expected 'is'".into());
                                }
                                let t = self.ident()?;
                                steps.push(Step::WhereResolveIs(t));
                            } else {
                                self.expect_sym("=")?;
                                match self.next() {
                                    Some(Tok::Str(v)) => steps.push(Step::WhereFieldEq(first, v)),
                                    t => return Err(format!("unsupported where() literal {t:?}")),
                                }
                            }
                        }
                        other => return Err(format!("unsupported function {other}()")),
                    }
                    self.expect_sym(")")?;
                } else {
                    steps.push(Step::Field(name));
                }
            } else if self.eat_sym("[") {
                match self.next() {
                    Some(Tok::Num(n)) => steps.push(Step::Index(n)),
                    t => return Err(format!("expected index, found {t:?}")),
                }
                self.expect_sym("]")?;
            } else if matches!(self.peek(), Some(Tok::Ident(s)) if s == "as") {
                self.pos += 1;
                let t = self.ident()?;
                steps.push(Step::As(t));
            } else {
                break;
            }
        }
        Ok(Term { base, steps })
    }
}

impl PathExpr {
    /// Compiles an absolute expression (rooted at resource type names).
    pub fn compile(expr: &str) -> Result<PathExpr, String> {
        Self::compile_inner(expr, false)
    }

    /// Compiles a composite component expression (relative to the composite's node).
    pub fn compile_relative(expr: &str) -> Result<PathExpr, String> {
        Self::compile_inner(expr, true)
    }

    fn compile_inner(expr: &str, relative: bool) -> Result<PathExpr, String> {
        let expr = expr.trim();
        if let Some((a, b)) = expr.split_once(" and ") {
            if let (Some(x), Some(y)) = (
                a.trim().strip_suffix(".exists()"),
                b.trim().strip_suffix("!= false"),
            ) {
                if x.trim() == y.trim() {
                    return Ok(PathExpr::ExistsNotFalse(Box::new(Self::compile_inner(
                        x, relative,
                    )?)));
                }
            }
            return Err(format!("unsupported expression: {expr}"));
        }
        let toks = tokenize(expr)?;
        let mut p = Parser {
            toks,
            pos: 0,
            relative,
        };
        let terms = p.union()?;
        if p.pos != p.toks.len() {
            return Err(format!("unexpected trailing tokens in {expr}"));
        }
        Ok(PathExpr::Union(terms))
    }

    /// Keeps only the union terms that apply to `resource_type` (terms rooted at another type are
    /// dropped). Returns `None` when nothing is left.
    pub fn for_type(&self, resource_type: &str) -> Option<PathExpr> {
        match self {
            PathExpr::Union(terms) => {
                let kept: Vec<Term> = terms
                    .iter()
                    .filter_map(|t| t.for_type(resource_type))
                    .collect();
                (!kept.is_empty()).then_some(PathExpr::Union(kept))
            }
            PathExpr::ExistsNotFalse(inner) => inner
                .for_type(resource_type)
                .map(|e| PathExpr::ExistsNotFalse(Box::new(e))),
        }
    }

    /// The plain member paths of the expression: for each union term rooted at a type and made
    /// of field steps only (`[n]`, `first()` and `where(f='x')` filters allowed), the root type
    /// and the field names (`Patient.contact.gender` → `("Patient", ["contact", "gender"])`).
    /// Terms with casts or `resolve()` are left out.
    pub fn member_paths(&self) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        if let PathExpr::Union(terms) = self {
            for t in terms {
                let Base::Type(root) = &t.base else { continue };
                let mut fields = Vec::new();
                let mut plain = true;
                for st in &t.steps {
                    match st {
                        Step::Field(f) => fields.push(f.clone()),
                        Step::Index(_) | Step::WhereFieldEq(..) => {}
                        Step::As(_) | Step::WhereResolveIs(_) => plain = false,
                    }
                }
                if plain && !fields.is_empty() {
                    out.push((root.clone(), fields));
                }
            }
        }
        out
    }

    /// The resource types this expression is rooted at.
    pub fn root_types(&self, out: &mut Vec<String>) {
        match self {
            PathExpr::Union(terms) => {
                for t in terms {
                    match &t.base {
                        Base::Type(ty) => out.push(ty.clone()),
                        Base::Group(inner) => inner.root_types(out),
                        _ => {}
                    }
                }
            }
            PathExpr::ExistsNotFalse(inner) => inner.root_types(out),
        }
    }

    /// Evaluates on a resource.
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<Node<'a>> {
        let root = Node {
            value: resource,
            type_hint: None,
        };
        self.eval(resource, root)
    }

    /// Evaluates relative to `context` (composite components), with `%resource` = `resource`.
    pub fn evaluate_at<'a>(&self, resource: &'a Value, context: Node<'a>) -> Vec<Node<'a>> {
        self.eval(resource, context)
    }

    fn eval<'a>(&self, resource: &'a Value, this: Node<'a>) -> Vec<Node<'a>> {
        match self {
            PathExpr::Union(terms) => {
                let mut out = Vec::new();
                for t in terms {
                    out.extend(t.eval(resource, this));
                }
                out
            }
            PathExpr::ExistsNotFalse(inner) => {
                let items = inner.eval(resource, this);
                let truthy = !items.is_empty() && !items.iter().any(|n| n.value == &FALSE);
                vec![Node {
                    value: if truthy { &TRUE } else { &FALSE },
                    type_hint: Some("boolean"),
                }]
            }
        }
    }
}

impl Term {
    fn for_type(&self, resource_type: &str) -> Option<Term> {
        match &self.base {
            Base::Type(t) => (t == resource_type || t == "Resource" || t == "DomainResource")
                .then(|| self.clone()),
            Base::Group(inner) => inner.for_type(resource_type).map(|e| Term {
                base: Base::Group(Box::new(e)),
                steps: self.steps.clone(),
            }),
            _ => Some(self.clone()),
        }
    }

    fn eval<'a>(&self, resource: &'a Value, this: Node<'a>) -> Vec<Node<'a>> {
        let mut cur: Vec<Node<'a>> = match &self.base {
            Base::Type(t) => {
                let rt = resource
                    .get("resourceType")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if t == rt || t == "Resource" || t == "DomainResource" {
                    vec![Node {
                        value: resource,
                        type_hint: None,
                    }]
                } else {
                    Vec::new()
                }
            }
            Base::This => vec![this],
            Base::Resource => vec![Node {
                value: resource,
                type_hint: None,
            }],
            Base::Group(inner) => inner.eval(resource, this),
        };
        for step in &self.steps {
            if cur.is_empty() {
                break;
            }
            cur = apply_step(step, cur);
        }
        cur
    }
}

fn push_flat<'a>(out: &mut Vec<Node<'a>>, v: &'a Value, hint: Option<&'a str>) {
    match v {
        Value::Array(items) => {
            for i in items {
                if !i.is_null() {
                    out.push(Node {
                        value: i,
                        type_hint: hint,
                    });
                }
            }
        }
        Value::Null => {}
        _ => out.push(Node {
            value: v,
            type_hint: hint,
        }),
    }
}

fn apply_step<'a>(step: &Step, cur: Vec<Node<'a>>) -> Vec<Node<'a>> {
    let mut out = Vec::new();
    match step {
        Step::Field(name) => {
            for n in cur {
                let Some(obj) = n.value.as_object() else {
                    continue;
                };
                if let Some(v) = obj.get(name.as_str()) {
                    push_flat(&mut out, v, None);
                } else {
                    // choice element: `value` → `valueQuantity`
                    for (k, v) in obj {
                        if let Some(suffix) = k.strip_prefix(name.as_str()) {
                            if suffix.starts_with(|c: char| c.is_ascii_uppercase()) {
                                push_flat(&mut out, v, Some(suffix));
                            }
                        }
                    }
                }
            }
        }
        Step::As(t) => {
            for n in cur {
                match n.type_hint {
                    Some(h) if h.eq_ignore_ascii_case(t) => out.push(n),
                    Some(_) => {}
                    None => out.push(n),
                }
            }
        }
        Step::WhereResolveIs(t) => {
            for n in cur {
                if reference_type(n.value).as_deref() == Some(t.as_str()) {
                    out.push(n);
                }
            }
        }
        Step::WhereFieldEq(f, lit) => {
            for n in cur {
                if n.value.get(f.as_str()).and_then(Value::as_str) == Some(lit.as_str()) {
                    out.push(n);
                }
            }
        }
        Step::Index(i) => {
            if let Some(n) = cur.into_iter().nth(*i) {
                out.push(n);
            }
        }
    }
    out
}

/// The target resource type of a Reference object: from `reference` (`Patient/1`,
/// `http://x/fhir/Patient/1/_history/2`) or else from `type`.
pub fn reference_type(v: &Value) -> Option<String> {
    if let Some(r) = v.get("reference").and_then(Value::as_str) {
        if let Some(parsed) = crate::value::parse_reference(r) {
            if let Some(t) = parsed.res_type {
                return Some(t);
            }
        }
    }
    v.get("type").and_then(Value::as_str).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_unions_and_choice_types() {
        let obs = json!({"resourceType":"Observation","valueQuantity":{"value":5},
            "subject":{"reference":"Patient/1"},"code":{"coding":[{"code":"a"},{"code":"b"}]}});
        let e = PathExpr::compile(
            "(Observation.value as Quantity) | (Observation.value as SampledData)",
        )
        .unwrap();
        let r = e.evaluate(&obs);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].type_hint, Some("Quantity"));
        let e = PathExpr::compile("Observation.code.coding").unwrap();
        assert_eq!(e.evaluate(&obs).len(), 2);
        let e = PathExpr::compile("Observation.value.as(String)").unwrap();
        assert!(e.evaluate(&obs).is_empty());
        let e = PathExpr::compile("Observation.subject.where(resolve() is Patient)").unwrap();
        assert_eq!(e.evaluate(&obs).len(), 1);
        let e = PathExpr::compile("Observation.subject.where(resolve() is Group)").unwrap();
        assert!(e.evaluate(&obs).is_empty());
        let e = PathExpr::compile("Patient.name | Observation.code.coding[1]").unwrap();
        assert_eq!(e.evaluate(&obs)[0].value["code"], "b");
        assert!(e.for_type("Encounter").is_none());
    }

    #[test]
    fn where_literal_and_deceased() {
        let p = json!({"resourceType":"Patient","telecom":[{"system":"phone","value":"1"},{"system":"email","value":"a@b"}],
            "deceasedDateTime":"2020-01-01"});
        let e =
            PathExpr::compile("Patient.telecom.where(system='email') | Person.telecom").unwrap();
        let r = e.evaluate(&p);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].value["value"], "a@b");
        let e =
            PathExpr::compile("Patient.deceased.exists() and Patient.deceased != false").unwrap();
        assert_eq!(e.evaluate(&p)[0].value, &json!(true));
        let p2 = json!({"resourceType":"Patient","deceasedBoolean":false});
        assert_eq!(e.evaluate(&p2)[0].value, &json!(false));
    }

    #[test]
    fn relative_and_unsupported() {
        let e = PathExpr::compile_relative("value.as(Quantity) | value.as(Range)").unwrap();
        let ctx = json!({"code":{"text":"x"},"valueRange":{"low":{"value":1}}});
        let r = e.evaluate_at(
            &ctx,
            Node {
                value: &ctx,
                type_hint: None,
            },
        );
        assert_eq!(r[0].type_hint, Some("Range"));
        assert!(PathExpr::compile("Patient.name.select(given)").is_err());
        assert!(PathExpr::compile("Patient.name ~ 3").is_err());
    }
}
