//! UCUM (Unified Code for Units of Measure): grammar validation, canonical form, conversion.
//!
//! The unit table is the official `ucum-essence.xml` (vendored gzip'd). Expressions are parsed
//! by the UCUM grammar (`mainTerm`, `term`, `component`, `annotatable`, `simpleUnit`, prefixes,
//! exponents, `{annotations}`, integer factors, parentheses). Canonical form is
//! `value × product(base units ^ exponent)`; arbitrary units (`[IU]`, …) are kept as their own
//! dimension so they only compare with themselves. Special (non-ratio) units such as `Cel`,
//! `[degF]`, `[pH]`, `B[V]` convert through their defining functions when they stand alone.

pub mod essence;

use std::collections::{BTreeMap, HashMap};

use once_cell::sync::OnceCell;

pub use essence::{Essence, UnitDef};

/// System URL of UCUM.
pub const UCUM_URL: &str = "http://unitsofmeasure.org";

/// A UCUM error: the expression is not valid, or two units are not commensurable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct UcumError {
    pub message: String,
}

fn err<T>(message: impl Into<String>) -> Result<T, UcumError> {
    Err(UcumError {
        message: message.into(),
    })
}

/// A quantity in canonical (base) units: `factor × Π dims[k]^v`.
#[derive(Debug, Clone, PartialEq)]
pub struct Canonical {
    pub factor: f64,
    /// Base unit code (m, s, g, rad, K, C, cd, or an arbitrary unit atom) → exponent.
    pub dims: BTreeMap<String, i32>,
}

impl Canonical {
    fn one() -> Self {
        Canonical {
            factor: 1.0,
            dims: BTreeMap::new(),
        }
    }
    fn mul(&mut self, other: &Canonical, sign: i32) {
        if sign > 0 {
            self.factor *= other.factor;
        } else {
            self.factor /= other.factor;
        }
        for (k, v) in &other.dims {
            let e = self.dims.entry(k.clone()).or_insert(0);
            *e += v * sign;
        }
        self.dims.retain(|_, v| *v != 0);
    }
    fn pow(&self, exp: i32) -> Canonical {
        Canonical {
            factor: self.factor.powi(exp),
            dims: self
                .dims
                .iter()
                .map(|(k, v)| (k.clone(), v * exp))
                .filter(|(_, v)| *v != 0)
                .collect(),
        }
    }
    /// The canonical unit string, e.g. `g.m-3`; `1` when dimensionless.
    pub fn unit_string(&self) -> String {
        if self.dims.is_empty() {
            return "1".into();
        }
        self.dims
            .iter()
            .map(|(k, v)| {
                if *v == 1 {
                    k.clone()
                } else {
                    format!("{k}{v}")
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// A parsed UCUM expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Component {
    /// `prefix? atom exponent? {annotation}?`
    Unit {
        prefix: Option<String>,
        atom: String,
        exponent: i32,
        annotation: Option<String>,
    },
    /// A positive integer factor, e.g. the `10` in `10.L`.
    Factor(u64),
    /// An annotation standing alone: `{cells}` (equals 1).
    Annotation(String),
    /// `( term )`
    Group(Term),
}

/// `term`: components joined by `.` (multiply) or `/` (divide), evaluated left to right.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    /// (divide?, component). The first element's flag is the leading `/` of a `mainTerm`.
    pub parts: Vec<(bool, Component)>,
}

/// The loaded UCUM unit table with every unit resolved to canonical form.
pub struct Ucum {
    pub essence: Essence,
    prefix_values: HashMap<String, f64>,
    resolved: HashMap<String, Canonical>,
}

static UCUM: OnceCell<Result<Ucum, String>> = OnceCell::new();

/// The process-wide UCUM table: the essence file an operator loaded with
/// `kiln terminology load ucum` (see `install`), else the vendored one.
pub fn ucum() -> Result<&'static Ucum, UcumError> {
    UCUM.get_or_init(|| {
        let essence = essence::load_vendored()?;
        Ucum::new(essence)
    })
    .as_ref()
    .map_err(|e| UcumError { message: e.clone() })
}

/// Makes `essence` the process-wide UCUM table. Must run before the first use of `ucum()`
/// (server start); fails when the table is already in use or a unit does not resolve.
pub fn install(essence: essence::Essence) -> Result<(), String> {
    let u = Ucum::new(essence)?;
    UCUM.set(Ok(u))
        .map_err(|_| "the UCUM table is already in use; install it at start-up".to_string())
}

/// Validates a UCUM expression by the grammar and the unit table.
pub fn validate(unit: &str) -> Result<(), UcumError> {
    ucum()?.parse(unit).map(|_| ())
}

/// Converts `value unit` to canonical form: returns (value in base units, canonical unit string).
pub fn canonicalize(value: f64, unit: &str) -> Result<(f64, String), UcumError> {
    let u = ucum()?;
    let term = u.parse(unit)?;
    if let Some((code, pf)) = u.lone_special(&term) {
        let (v, c) = u.special_to_canonical(&code, pf, value)?;
        return Ok((v, c.unit_string()));
    }
    let c = u.evaluate(&term)?;
    Ok((value * c.factor, c.unit_string()))
}

/// Converts `value` from unit `from` to unit `to` (errors when not commensurable).
pub fn convert(value: f64, from: &str, to: &str) -> Result<f64, UcumError> {
    let u = ucum()?;
    let tf = u.parse(from)?;
    let tt = u.parse(to)?;
    let (canon_value, canon_from) = match u.lone_special(&tf) {
        Some((code, pf)) => u.special_to_canonical(&code, pf, value)?,
        None => {
            let c = u.evaluate(&tf)?;
            (value * c.factor, Canonical { factor: 1.0, ..c })
        }
    };
    match u.lone_special(&tt) {
        Some((code, pf)) => {
            let (v, c) = u.special_from_canonical(&code, pf, canon_value)?;
            if c.dims != canon_from.dims {
                return err(format!(
                    "Unable to convert between units {from} and {to}: not commensurable"
                ));
            }
            Ok(v)
        }
        None => {
            let c = u.evaluate(&tt)?;
            if c.dims != canon_from.dims {
                return err(format!(
                    "Unable to convert between units {from} and {to}: not commensurable ({} vs {})",
                    canon_from.unit_string(),
                    c.unit_string()
                ));
            }
            Ok(canon_value / c.factor)
        }
    }
}

/// A human-readable description of a UCUM expression, e.g. `(milligram) / (deciliter)`.
pub fn describe(unit: &str) -> Result<String, UcumError> {
    let u = ucum()?;
    let term = u.parse(unit)?;
    Ok(u.describe_term(&term))
}

fn is_annotation_char(c: char) -> bool {
    ('!'..='~').contains(&c) && c != '{' && c != '}'
}

struct Parser<'a> {
    ucum: &'a Ucum,
    s: &'a [u8],
    src: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn fail<T>(&self, msg: &str) -> Result<T, UcumError> {
        err(format!(
            "Error processing unit '{}': {msg} at character {}",
            self.src,
            self.pos + 1
        ))
    }

    fn term(&mut self, main: bool) -> Result<Term, UcumError> {
        let mut parts = Vec::new();
        let mut divide = false;
        if main && self.s.first() == Some(&b'/') {
            divide = true;
            self.pos += 1;
        }
        loop {
            let c = self.component()?;
            parts.push((divide, c));
            match self.s.get(self.pos) {
                Some(b'.') => {
                    divide = false;
                    self.pos += 1;
                }
                Some(b'/') => {
                    divide = true;
                    self.pos += 1;
                }
                _ => break,
            }
        }
        Ok(Term { parts })
    }

    fn annotation(&mut self) -> Result<String, UcumError> {
        // at '{'
        let start = self.pos + 1;
        let mut i = start;
        while i < self.s.len() && self.s[i] != b'}' {
            if !is_annotation_char(self.s[i] as char) {
                self.pos = i;
                return self.fail("invalid character in annotation");
            }
            i += 1;
        }
        if i >= self.s.len() {
            return self.fail("unterminated annotation");
        }
        self.pos = i + 1;
        Ok(self.src[start..i].to_string())
    }

    fn component(&mut self) -> Result<Component, UcumError> {
        match self.s.get(self.pos) {
            None => self.fail("unexpected end of expression"),
            Some(b'(') => {
                self.pos += 1;
                let t = self.term(false)?;
                if self.s.get(self.pos) != Some(&b')') {
                    return self.fail("missing ')'");
                }
                self.pos += 1;
                Ok(Component::Group(t))
            }
            Some(b'{') => Ok(Component::Annotation(self.annotation()?)),
            Some(_) => {
                let start = self.pos;
                let mut depth = 0i32;
                while self.pos < self.s.len() {
                    let c = self.s[self.pos];
                    if depth > 0 {
                        if c == b']' {
                            depth -= 1;
                        } else if c == b'[' {
                            depth += 1;
                        }
                    } else if c == b'[' {
                        depth += 1;
                    } else if matches!(c, b'.' | b'/' | b'(' | b')' | b'{' | b'}') {
                        break;
                    } else if c == b']' {
                        return self.fail("unexpected ']'");
                    }
                    if !(33..=126).contains(&c) {
                        return self.fail("invalid character");
                    }
                    self.pos += 1;
                }
                if depth != 0 {
                    return self.fail("unterminated '['");
                }
                let sym = &self.src[start..self.pos];
                if sym.is_empty() {
                    return self.fail("expected a unit");
                }
                if sym.bytes().all(|b| b.is_ascii_digit()) {
                    let n: u64 = match sym.parse() {
                        Ok(n) => n,
                        Err(_) => return self.fail("factor too large"),
                    };
                    return Ok(Component::Factor(n));
                }
                // split a trailing exponent
                let bytes = sym.as_bytes();
                let mut e = bytes.len();
                while e > 0 && bytes[e - 1].is_ascii_digit() {
                    e -= 1;
                }
                let mut atom_end = e;
                let mut exponent = 1i32;
                if e < bytes.len() {
                    if e > 0 && (bytes[e - 1] == b'-' || bytes[e - 1] == b'+') {
                        atom_end = e - 1;
                    }
                    let exp_str = &sym[atom_end..];
                    exponent = match exp_str.parse() {
                        Ok(x) => x,
                        Err(_) => return self.fail("invalid exponent"),
                    };
                } else if e > 0 && (bytes[e - 1] == b'-' || bytes[e - 1] == b'+') {
                    return self.fail("sign without exponent");
                }
                let atom_sym = &sym[..atom_end];
                if atom_sym.is_empty() {
                    return self.fail("expected a unit before the exponent");
                }
                let (prefix, atom) = match self.ucum.split_prefix(atom_sym) {
                    Some(x) => x,
                    None => {
                        return err(format!(
                            "Error processing unit '{}': The unit '{atom_sym}' is unknown at character {}",
                            self.src,
                            start + 1
                        ))
                    }
                };
                let annotation = if self.s.get(self.pos) == Some(&b'{') {
                    Some(self.annotation()?)
                } else {
                    None
                };
                Ok(Component::Unit {
                    prefix,
                    atom,
                    exponent,
                    annotation,
                })
            }
        }
    }
}

impl Ucum {
    pub fn new(essence: Essence) -> Result<Ucum, String> {
        let prefix_values = essence
            .prefixes
            .iter()
            .map(|p| (p.code.clone(), p.value))
            .collect();
        let mut u = Ucum {
            essence,
            prefix_values,
            resolved: HashMap::new(),
        };
        let mut codes: Vec<String> = u.essence.units.keys().cloned().collect();
        codes.sort();
        let mut failures = Vec::new();
        for code in codes {
            let mut stack = Vec::new();
            if let Err(e) = u.resolve(&code, &mut stack) {
                failures.push(format!("{code}: {}", e.message));
            }
        }
        if !failures.is_empty() {
            return Err(format!(
                "UCUM units failed to resolve: {}",
                failures.join("; ")
            ));
        }
        Ok(u)
    }

    /// The number of defined units (base + derived).
    pub fn unit_count(&self) -> usize {
        self.essence.units.len()
    }

    fn resolve(&mut self, code: &str, stack: &mut Vec<String>) -> Result<Canonical, UcumError> {
        if let Some(c) = self.resolved.get(code) {
            return Ok(c.clone());
        }
        if stack.iter().any(|s| s == code) {
            return err(format!("circular definition of {code}"));
        }
        let def = match self.essence.units.get(code) {
            Some(d) => d.clone(),
            None => return err(format!("unknown unit {code}")),
        };
        stack.push(code.to_string());
        let own_dimension = def.is_base
            || (def.is_arbitrary && (def.value_unit == "1" || def.value_unit.is_empty()));
        let c = if own_dimension {
            Canonical {
                factor: 1.0,
                dims: BTreeMap::from([(code.to_string(), 1)]),
            }
        } else {
            let (v, expr) = match &def.function {
                Some(f) => (f.value, f.unit.clone()),
                None => (def.value, def.value_unit.clone()),
            };
            let term = self.parse(&expr)?;
            let mut c = self.evaluate_with(&term, stack)?;
            c.factor *= v;
            c
        };
        stack.pop();
        self.resolved.insert(code.to_string(), c.clone());
        Ok(c)
    }

    /// Splits `sym` into (prefix, atom): the whole symbol as an atom first, then prefix + metric atom.
    fn split_prefix(&self, sym: &str) -> Option<(Option<String>, String)> {
        if self.essence.units.contains_key(sym) {
            return Some((None, sym.to_string()));
        }
        for p in &self.essence.prefixes {
            if let Some(rest) = sym.strip_prefix(p.code.as_str()) {
                if let Some(u) = self.essence.units.get(rest) {
                    if u.is_metric {
                        return Some((Some(p.code.clone()), rest.to_string()));
                    }
                }
            }
        }
        None
    }

    /// Parses a UCUM expression (grammar + unit table check).
    pub fn parse(&self, unit: &str) -> Result<Term, UcumError> {
        if unit.is_empty() {
            return err("Error processing unit '': the unit is empty");
        }
        let mut p = Parser {
            ucum: self,
            s: unit.as_bytes(),
            src: unit,
            pos: 0,
        };
        let t = p.term(true)?;
        if p.pos != unit.len() {
            return p.fail("unexpected character");
        }
        Ok(t)
    }

    fn evaluate(&self, term: &Term) -> Result<Canonical, UcumError> {
        let mut out = Canonical::one();
        for (div, c) in &term.parts {
            let v = self.evaluate_component(c)?;
            out.mul(&v, if *div { -1 } else { 1 });
        }
        Ok(out)
    }

    fn evaluate_component(&self, c: &Component) -> Result<Canonical, UcumError> {
        match c {
            Component::Factor(n) => Ok(Canonical {
                factor: *n as f64,
                dims: BTreeMap::new(),
            }),
            Component::Annotation(_) => Ok(Canonical::one()),
            Component::Group(t) => self.evaluate(t),
            Component::Unit {
                prefix,
                atom,
                exponent,
                ..
            } => {
                let def = self.essence.units.get(atom);
                if def.map(|d| d.is_special).unwrap_or(false) {
                    return err(format!(
                        "The special unit '{atom}' cannot be combined with other units for conversion"
                    ));
                }
                let base = match self.resolved.get(atom) {
                    Some(c) => c.clone(),
                    None => return err(format!("unknown unit {atom}")),
                };
                let pf = prefix
                    .as_ref()
                    .and_then(|p| self.prefix_values.get(p))
                    .copied()
                    .unwrap_or(1.0);
                let mut b = base;
                b.factor *= pf;
                Ok(b.pow(*exponent))
            }
        }
    }

    fn evaluate_with(
        &mut self,
        term: &Term,
        stack: &mut Vec<String>,
    ) -> Result<Canonical, UcumError> {
        // resolves referenced atoms first (during table construction), then evaluates.
        fn atoms(t: &Term, out: &mut Vec<String>) {
            for (_, c) in &t.parts {
                match c {
                    Component::Unit { atom, .. } => out.push(atom.clone()),
                    Component::Group(g) => atoms(g, out),
                    _ => {}
                }
            }
        }
        let mut names = Vec::new();
        atoms(term, &mut names);
        for n in names {
            self.resolve(&n, stack)?;
        }
        self.evaluate(term)
    }

    /// If the expression is a single special unit (optionally prefixed, exponent 1), its code and prefix factor.
    fn lone_special(&self, term: &Term) -> Option<(String, f64)> {
        if term.parts.len() != 1 || term.parts[0].0 {
            return None;
        }
        match &term.parts[0].1 {
            Component::Unit {
                prefix,
                atom,
                exponent: 1,
                ..
            } if self.essence.units.get(atom).map(|d| d.is_special) == Some(true) => {
                let pf = prefix
                    .as_ref()
                    .and_then(|p| self.prefix_values.get(p))
                    .copied()
                    .unwrap_or(1.0);
                Some((atom.clone(), pf))
            }
            Component::Group(g) => self.lone_special(g),
            _ => None,
        }
    }

    fn special_parts(&self, code: &str) -> Result<(String, Canonical), UcumError> {
        let def = match self.essence.units.get(code) {
            Some(d) => d,
            None => return err(format!("unknown unit {code}")),
        };
        let f = match &def.function {
            Some(f) => f,
            None => return err(format!("{code} has no conversion function")),
        };
        let c = match self.resolved.get(code) {
            Some(c) => c.clone(),
            None => return err(format!("unknown unit {code}")),
        };
        Ok((f.name.clone(), c))
    }

    /// value in special unit → (value in canonical units, canonical dims)
    fn special_to_canonical(
        &self,
        code: &str,
        prefix: f64,
        x: f64,
    ) -> Result<(f64, Canonical), UcumError> {
        let (fname, c) = self.special_parts(code)?;
        let x = x * prefix;
        let y = match fname.as_str() {
            "Cel" => x + 273.15,
            "degF" => x + 459.67,
            "degRe" => x + 218.52,
            "pH" => 10f64.powf(-x),
            "ln" => x.exp(),
            "lg" => 10f64.powf(x),
            "lgTimes2" => 10f64.powf(x / 2.0),
            "ld" => 2f64.powf(x),
            "tanTimes100" | "100tan" => (x / 100.0).atan(),
            "hpX" => 10f64.powf(-x),
            "hpC" => 100f64.powf(-x),
            "hpM" => 1000f64.powf(-x),
            "hpQ" => 50000f64.powf(-x),
            "sqrt" => x * x,
            other => return err(format!("unsupported special function {other}")),
        };
        let y = if matches!(fname.as_str(), "tanTimes100" | "100tan") {
            // result is an angle in radians
            y
        } else {
            y * c.factor
        };
        let dims = Canonical {
            factor: 1.0,
            dims: if matches!(fname.as_str(), "tanTimes100" | "100tan") {
                BTreeMap::from([("rad".to_string(), 1)])
            } else {
                c.dims
            },
        };
        Ok((y, dims))
    }

    fn special_from_canonical(
        &self,
        code: &str,
        prefix: f64,
        y: f64,
    ) -> Result<(f64, Canonical), UcumError> {
        let (fname, c) = self.special_parts(code)?;
        let angle = matches!(fname.as_str(), "tanTimes100" | "100tan");
        let y = if angle { y } else { y / c.factor };
        let x = match fname.as_str() {
            "Cel" => y - 273.15,
            "degF" => y - 459.67,
            "degRe" => y - 218.52,
            "pH" | "hpX" => -y.log10(),
            "ln" => y.ln(),
            "lg" => y.log10(),
            "lgTimes2" => 2.0 * y.log10(),
            "ld" => y.log2(),
            "tanTimes100" | "100tan" => y.tan() * 100.0,
            "hpC" => -y.ln() / 100f64.ln(),
            "hpM" => -y.ln() / 1000f64.ln(),
            "hpQ" => -y.ln() / 50000f64.ln(),
            "sqrt" => y.sqrt(),
            other => return err(format!("unsupported special function {other}")),
        };
        let dims = Canonical {
            factor: 1.0,
            dims: if angle {
                BTreeMap::from([("rad".to_string(), 1)])
            } else {
                c.dims
            },
        };
        Ok((x / prefix, dims))
    }

    fn describe_term(&self, t: &Term) -> String {
        let mut out = String::new();
        for (i, (div, c)) in t.parts.iter().enumerate() {
            if i > 0 || *div {
                out.push_str(if *div { " / " } else { " * " });
            }
            let s = match c {
                Component::Factor(n) => n.to_string(),
                Component::Annotation(a) => format!("{{{a}}}"),
                Component::Group(g) => format!("({})", self.describe_term(g)),
                Component::Unit {
                    prefix,
                    atom,
                    exponent,
                    annotation,
                } => {
                    let pname = prefix
                        .as_ref()
                        .and_then(|p| self.essence.prefixes.iter().find(|x| &x.code == p))
                        .map(|p| p.name.clone())
                        .unwrap_or_default();
                    let uname = self
                        .essence
                        .units
                        .get(atom)
                        .map(|u| u.name.clone())
                        .unwrap_or_else(|| atom.clone());
                    let mut s = format!("({pname}{uname})");
                    if *exponent != 1 {
                        s.push_str(&format!(" ^ {exponent}"));
                    }
                    if let Some(a) = annotation {
                        s.push_str(&format!(" {{{a}}}"));
                    }
                    s
                }
            };
            out.push_str(&s);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        ((a - b) / b.abs().max(1e-300)).abs() < 1e-9
    }

    #[test]
    fn table_loads_and_resolves_every_unit() {
        let u = ucum().expect("ucum table");
        assert!(u.unit_count() >= 300, "units: {}", u.unit_count());
        assert_eq!(u.essence.version, "2.2");
        assert_eq!(u.essence.prefixes.len(), 24);
    }

    #[test]
    fn grammar_accepts_valid_expressions() {
        for ok in [
            "mg/dL",
            "g/L",
            "[lb_av]",
            "kg",
            "Cel",
            "[degF]",
            "mm[Hg]",
            "10*3/uL",
            "10^3/uL",
            "/min",
            "{cells}/uL",
            "mL/min/{1.73_m2}",
            "kg.m/s2",
            "m2",
            "s-1",
            "(kg.m)/s2",
            "%",
            "[iU]/L",
            "B[10.nV]",
            "[m/s2/Hz^(1/2)]",
            "1",
            "10.L",
            "dag",
            "cm[H2O]",
            "umol/(24.h)",
            "[pH]",
            "mL{total}",
            "{rbc}",
            "%{HemoglobinSaturation}",
        ] {
            assert!(validate(ok).is_ok(), "{ok}: {:?}", validate(ok));
        }
    }

    #[test]
    fn grammar_rejects_invalid_expressions() {
        for bad in [
            "", "mg/", "/", "mg//dL", "foo", "m^2", "mg dL", "(mg", "mg)", "{abc", "kg.", "[lb_av",
            "g{a{b}}", "m-", "Kg", "mg/dl)", "10*", "°C",
        ] {
            // "10*" alone is a valid unit (the number ten); keep the assertion list honest:
            if bad == "10*" {
                assert!(validate(bad).is_ok());
                continue;
            }
            assert!(validate(bad).is_err(), "{bad:?} should be invalid");
        }
        let e = validate("mg/foo").unwrap_err();
        assert!(e.message.contains("foo"), "{}", e.message);
    }

    #[test]
    fn mg_per_dl_vs_g_per_l() {
        // 100 mg/dL = 1 g/L
        let v = convert(100.0, "mg/dL", "g/L").unwrap();
        assert!(close(v, 1.0), "{v}");
        let (a, ua) = canonicalize(100.0, "mg/dL").unwrap();
        let (b, ub) = canonicalize(1.0, "g/L").unwrap();
        assert_eq!(ua, ub);
        assert_eq!(ua, "g.m-3");
        assert!(close(a, b));
        assert!(close(a, 1000.0), "{a}");
    }

    #[test]
    fn pounds_and_kilograms() {
        let v = convert(1.0, "[lb_av]", "kg").unwrap();
        assert!(close(v, 0.45359237), "{v}");
        let v = convert(70.0, "kg", "[lb_av]").unwrap();
        assert!((v - 154.3236).abs() < 1e-3, "{v}");
        let (c, u) = canonicalize(2.0, "[lb_av]").unwrap();
        assert_eq!(u, "g");
        assert!(close(c, 907.18474));
    }

    #[test]
    fn temperatures() {
        assert!(close(convert(37.0, "Cel", "K").unwrap(), 310.15));
        assert!(close(convert(310.15, "K", "Cel").unwrap(), 37.0));
        let f = convert(37.0, "Cel", "[degF]").unwrap();
        assert!((f - 98.6).abs() < 1e-9, "{f}");
        let c = convert(212.0, "[degF]", "Cel").unwrap();
        assert!((c - 100.0).abs() < 1e-9, "{c}");
        let (v, u) = canonicalize(0.0, "Cel").unwrap();
        assert_eq!(u, "K");
        assert!(close(v, 273.15));
        assert!(convert(1.0, "Cel", "kg").is_err());
    }

    #[test]
    fn mm_hg_and_pressure() {
        let v = convert(760.0, "mm[Hg]", "kPa").unwrap();
        assert!((v - 101.325).abs() < 0.01, "{v}");
        let (_, u) = canonicalize(1.0, "mm[Hg]").unwrap();
        assert_eq!(u, "g.m-1.s-2");
    }

    #[test]
    fn counts_per_volume() {
        let v = convert(5.0, "10*3/uL", "10*9/L").unwrap();
        assert!(close(v, 5.0), "{v}");
        let (c, u) = canonicalize(1.0, "10*3/uL").unwrap();
        assert_eq!(u, "m-3");
        assert!(close(c, 1e12), "{c}");
        // annotations do not change the value
        let v = convert(4.5, "10*6/uL{rbc}", "10*12/L").unwrap();
        assert!(close(v, 4.5));
    }

    #[test]
    fn arbitrary_units_only_match_themselves() {
        assert!(close(convert(1.0, "[IU]/L", "m[IU]/mL").unwrap(), 1.0));
        assert!(convert(1.0, "[IU]", "g").is_err());
    }

    #[test]
    fn incommensurable_units_error() {
        let e = convert(1.0, "mg", "mL").unwrap_err();
        assert!(e.message.contains("not commensurable"), "{}", e.message);
    }

    #[test]
    fn ph_and_logs() {
        let (v, u) = canonicalize(7.0, "[pH]").unwrap();
        assert_eq!(u, "m-3");
        // 1e-7 mol/l = 1e-4 mol/m3 ; mol is 6.02214076e23 (dimensionless)
        assert!(close(v, 1e-7 * 1000.0 * 6.02214076e23), "{v}");
        // 1e-7 mol/L = 1e-4 mol/m3
        let back = convert(1e-4, "mol/m3", "[pH]").unwrap();
        assert!((back - 7.0).abs() < 1e-9, "{back}");
    }

    #[test]
    fn describe_units() {
        assert_eq!(describe("mg/dL").unwrap(), "(milligram) / (deciliter)");
    }
}

/// UCUM as a (grammar-based, not enumerable) code system.
#[derive(Debug, Clone, Copy, Default)]
pub struct UcumProvider;

impl crate::provider::CodeSystemProvider for UcumProvider {
    fn url(&self) -> &str {
        UCUM_URL
    }
    fn version(&self) -> Option<&str> {
        ucum().ok().map(|u| u.essence.version.as_str())
    }
    fn name(&self) -> Option<&str> {
        Some("UCUM")
    }
    fn lookup(&self, code: &str) -> Option<crate::provider::Concept> {
        validate(code).ok()?;
        let mut c = crate::provider::Concept::new(code, Some(code.to_string()));
        if let Ok(d) = describe(code) {
            c.designations.push(crate::provider::Designation {
                language: Some("en".into()),
                value: d,
                ..Default::default()
            });
        }
        if let Ok((_, canonical)) = canonicalize(1.0, code) {
            c.properties.push((
                "canonical".into(),
                crate::provider::PropertyValue::String(canonical),
            ));
        }
        Some(c)
    }
    fn parents(&self, _code: &str) -> Vec<String> {
        Vec::new()
    }
    fn children(&self, _code: &str) -> Vec<String> {
        Vec::new()
    }
    fn codes(&self) -> Option<Vec<String>> {
        None
    }
    fn filter(
        &self,
        property: &str,
        op: &str,
        _value: &str,
    ) -> Result<Vec<String>, crate::provider::ProviderError> {
        Err(crate::provider::ProviderError(format!(
            "UCUM is grammar-based: the filter {property} {op} cannot be enumerated"
        )))
    }
    fn filter_matches(
        &self,
        code: &str,
        property: &str,
        op: &str,
        value: &str,
    ) -> Result<bool, crate::provider::ProviderError> {
        match (property, op) {
            ("canonical", "=") => {
                let a = canonicalize(1.0, code).map(|x| x.1);
                let b = canonicalize(1.0, value).map(|x| x.1);
                Ok(matches!((a, b), (Ok(a), Ok(b)) if a == b))
            }
            _ => self.filter(property, op, value).map(|_| false),
        }
    }
    fn search(&self, _text: &str, _limit: usize) -> Vec<String> {
        Vec::new()
    }
}
