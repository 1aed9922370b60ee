//! SNOMED CT Expression Constraint Language (ECL 2.x), the subset Kiln evaluates over a loaded
//! `ConceptTable`: the constraint operators `<` (descendants), `<<` (descendants or self),
//! `<!` (children), `>` (ancestors), `>>` (ancestors or self), `>!` (parents), `^` (members of
//! a reference set), the wildcard `*`, concept references with an optional `|term|`, the
//! binary operators `AND`, `OR`, `MINUS` (and `,` for AND), and parentheses. As the ECL
//! specification requires, different binary operators may not be mixed without parentheses.
//! Attribute refinements `focus : attribute = value` (also `!=`, several attributes joined by
//! `,`/`AND` or by `OR`) match the concepts with an active inferred relationship of that type
//! (`attribute` may be `<<`/`<` a type, or `*`) to a value in the value expression; role groups
//! (`{ }`), cardinalities (`[1..*]`), reverse flags (`R`), dotted attributes and concrete values
//! are not supported and are reported as a parse error naming the position.
//!
//! `*` and the hierarchy operators range over active concepts (inactive concepts have no
//! active IS-A rows); `^` uses the members of the refsets loaded with the release.

use std::fmt;

use crate::provider::ConceptTable;

/// A parse or evaluation error, with the 1-based character position in the expression.
#[derive(Debug, Clone, PartialEq)]
pub struct EclError {
    pub position: usize,
    pub message: String,
}

impl fmt::Display for EclError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Invalid ECL expression at position {}: {}",
            self.position, self.message
        )
    }
}

impl std::error::Error for EclError {}

/// A hierarchy constraint operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Constraint {
    /// `<`
    DescendantOf,
    /// `<<`
    DescendantOrSelfOf,
    /// `<!`
    ChildOf,
    /// `>`
    AncestorOf,
    /// `>>`
    AncestorOrSelfOf,
    /// `>!`
    ParentOf,
}

/// A binary set operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    And,
    Or,
    Minus,
}

/// A parsed expression constraint.
#[derive(Debug, Clone, PartialEq)]
pub enum Ecl {
    /// `*`
    Any,
    /// `73211009 |Diabetes mellitus|`
    Concept(String),
    /// `< X`, `<< X`, …
    Hierarchy(Constraint, Box<Ecl>),
    /// `^ X`
    MemberOf(Box<Ecl>),
    /// `X AND Y`, `X OR Y`, `X MINUS Y`
    Binary(BinaryOp, Box<Ecl>, Box<Ecl>),
    /// `focus : attribute, attribute` (`And`) or `focus : attribute OR attribute` (`Or`)
    Refined(Box<Ecl>, BinaryOp, Vec<AttributeConstraint>),
}

/// `name = value` or `name != value` in a refinement.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeConstraint {
    pub name: Ecl,
    pub negated: bool,
    pub value: Ecl,
}

struct Parser<'a> {
    chars: Vec<(usize, char)>,
    pos: usize,
    text: &'a str,
}

impl<'a> Parser<'a> {
    fn err(&self, message: impl Into<String>) -> EclError {
        EclError {
            position: self
                .chars
                .get(self.pos)
                .map(|c| c.0 + 1)
                .unwrap_or(self.text.chars().count() + 1),
            message: message.into(),
        }
    }

    fn skip_ws(&mut self) {
        while let Some((_, c)) = self.chars.get(self.pos) {
            if c.is_whitespace() {
                self.pos += 1;
            } else if *c == '/' && self.chars.get(self.pos + 1).map(|x| x.1) == Some('*') {
                // ECL comment /* … */
                self.pos += 2;
                while self.pos < self.chars.len()
                    && !(self.chars[self.pos].1 == '*'
                        && self.chars.get(self.pos + 1).map(|x| x.1) == Some('/'))
                {
                    self.pos += 1;
                }
                self.pos = (self.pos + 2).min(self.chars.len());
            } else {
                break;
            }
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).map(|c| c.1)
    }

    fn peek2(&self) -> Option<char> {
        self.chars.get(self.pos + 1).map(|c| c.1)
    }

    /// A keyword (`AND`, `OR`, `MINUS`, case-insensitive) followed by a non-word character.
    fn keyword(&mut self) -> Option<BinaryOp> {
        self.skip_ws();
        for (kw, op) in [
            ("AND", BinaryOp::And),
            ("OR", BinaryOp::Or),
            ("MINUS", BinaryOp::Minus),
        ] {
            let n = kw.len();
            if self.pos + n > self.chars.len() {
                continue;
            }
            let word: String = self.chars[self.pos..self.pos + n]
                .iter()
                .map(|c| c.1)
                .collect();
            let next = self.chars.get(self.pos + n).map(|c| c.1);
            if word.eq_ignore_ascii_case(kw)
                && next
                    .map(|c| !c.is_ascii_alphanumeric() && c != '_')
                    .unwrap_or(true)
            {
                self.pos += n;
                return Some(op);
            }
        }
        if self.peek() == Some(',') {
            self.pos += 1;
            return Some(BinaryOp::And);
        }
        None
    }

    /// expressionConstraint := subExpression (binaryOp subExpression)*, one operator kind only.
    fn expression(&mut self) -> Result<Ecl, EclError> {
        let mut left = self.sub_expression()?;
        self.skip_ws();
        if self.peek() == Some(':') {
            self.pos += 1;
            let (op, attrs) = self.refinement()?;
            return Ok(Ecl::Refined(Box::new(left), op, attrs));
        }
        let mut kind: Option<BinaryOp> = None;
        loop {
            let save = self.pos;
            let Some(op) = self.keyword() else {
                self.pos = save;
                break;
            };
            if let Some(k) = kind {
                if k != op {
                    self.pos = save;
                    self.skip_ws();
                    return Err(self.err(
                        "different binary operators (AND, OR, MINUS) must be separated by parentheses",
                    ));
                }
            }
            kind = Some(op);
            let right = self.sub_expression()?;
            self.skip_ws();
            if self.peek() == Some(':') {
                return Err(
                    self.err("a refined expression inside AND/OR/MINUS must be in parentheses")
                );
            }
            left = Ecl::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    /// eclRefinement := attribute ((`,` | AND) attribute)* | attribute (OR attribute)*
    fn refinement(&mut self) -> Result<(BinaryOp, Vec<AttributeConstraint>), EclError> {
        let mut attrs = vec![self.attribute()?];
        let mut kind: Option<BinaryOp> = None;
        loop {
            let save = self.pos;
            let Some(op) = self.keyword() else {
                self.pos = save;
                break;
            };
            if op == BinaryOp::Minus {
                self.pos = save;
                self.skip_ws();
                return Err(self.err("MINUS cannot join attributes of a refinement"));
            }
            if kind.is_some_and(|k| k != op) {
                self.pos = save;
                self.skip_ws();
                return Err(
                    self.err("AND and OR between attributes must be separated by parentheses")
                );
            }
            kind = Some(op);
            attrs.push(self.attribute()?);
        }
        Ok((kind.unwrap_or(BinaryOp::And), attrs))
    }

    /// attribute := [`<<` | `<`] attributeName (`=` | `!=`) subExpression
    fn attribute(&mut self) -> Result<AttributeConstraint, EclError> {
        self.skip_ws();
        match self.peek() {
            Some('{') => {
                return Err(self
                    .err("attribute groups ('{') are not supported by this server's ECL subset"))
            }
            Some('[') => {
                return Err(
                    self.err("cardinalities ('[') are not supported by this server's ECL subset")
                )
            }
            Some('R') | Some('r')
                if self
                    .peek2()
                    .is_some_and(|c| c.is_whitespace() || c.is_ascii_digit()) =>
            {
                return Err(self
                    .err("reverse attributes ('R') are not supported by this server's ECL subset"))
            }
            _ => {}
        }
        let name = match (self.peek(), self.peek2()) {
            (Some('<'), Some('<')) => {
                self.pos += 2;
                Ecl::Hierarchy(
                    Constraint::DescendantOrSelfOf,
                    Box::new(self.attribute_name()?),
                )
            }
            (Some('<'), _) => {
                self.pos += 1;
                Ecl::Hierarchy(Constraint::DescendantOf, Box::new(self.attribute_name()?))
            }
            _ => self.attribute_name()?,
        };
        self.skip_ws();
        let negated = match (self.peek(), self.peek2()) {
            (Some('='), _) => {
                self.pos += 1;
                false
            }
            (Some('!'), Some('=')) => {
                self.pos += 2;
                true
            }
            (Some('#'), _) => {
                return Err(
                    self.err("concrete values ('#') are not supported by this server's ECL subset")
                )
            }
            _ => return Err(self.err("expected '=' or '!=' after the attribute name")),
        };
        let value = self.sub_expression()?;
        Ok(AttributeConstraint {
            name,
            negated,
            value,
        })
    }

    fn attribute_name(&mut self) -> Result<Ecl, EclError> {
        self.skip_ws();
        match self.peek() {
            Some('*') => {
                self.pos += 1;
                Ok(Ecl::Any)
            }
            Some(c) if c.is_ascii_digit() => self.concept_reference(),
            _ => Err(self.err("expected an attribute name (a concept id or '*')")),
        }
    }

    /// subExpression := [constraintOperator] [memberOf] (conceptReference | * | ( expression ))
    fn sub_expression(&mut self) -> Result<Ecl, EclError> {
        self.skip_ws();
        let op = match (self.peek(), self.peek2()) {
            (Some('<'), Some('<')) => Some((Constraint::DescendantOrSelfOf, 2)),
            (Some('<'), Some('!')) => Some((Constraint::ChildOf, 2)),
            (Some('<'), _) => Some((Constraint::DescendantOf, 1)),
            (Some('>'), Some('>')) => Some((Constraint::AncestorOrSelfOf, 2)),
            (Some('>'), Some('!')) => Some((Constraint::ParentOf, 2)),
            (Some('>'), _) => Some((Constraint::AncestorOf, 1)),
            _ => None,
        };
        if let Some((c, n)) = op {
            self.pos += n;
            let inner = self.sub_expression_no_constraint()?;
            return Ok(Ecl::Hierarchy(c, Box::new(inner)));
        }
        self.sub_expression_no_constraint()
    }

    fn sub_expression_no_constraint(&mut self) -> Result<Ecl, EclError> {
        self.skip_ws();
        if self.peek() == Some('^') {
            self.pos += 1;
            let inner = self.focus()?;
            return Ok(Ecl::MemberOf(Box::new(inner)));
        }
        if matches!(self.peek(), Some('<') | Some('>')) {
            return Err(self.err("a constraint operator may appear only once before a focus concept; use parentheses"));
        }
        self.focus()
    }

    fn focus(&mut self) -> Result<Ecl, EclError> {
        self.skip_ws();
        match self.peek() {
            Some('*') => {
                self.pos += 1;
                self.after_focus()?;
                Ok(Ecl::Any)
            }
            Some('(') => {
                self.pos += 1;
                let e = self.expression()?;
                self.skip_ws();
                if self.peek() != Some(')') {
                    return Err(self.err("expected ')'"));
                }
                self.pos += 1;
                self.after_focus()?;
                Ok(e)
            }
            Some(c) if c.is_ascii_digit() => {
                let e = self.concept_reference()?;
                self.after_focus()?;
                Ok(e)
            }
            Some(_) => Err(self.err(
                "expected a concept id, '*', '(' or a constraint operator (<, <<, <!, >, >>, >!, ^)",
            )),
            None => Err(self.err("unexpected end of expression")),
        }
    }

    /// conceptReference := SCTID [ `|` term `|` ]
    fn concept_reference(&mut self) -> Result<Ecl, EclError> {
        match self.peek() {
            Some(c) if c.is_ascii_digit() => {
                let start = self.pos;
                while self.peek().map(|c| c.is_ascii_digit()).unwrap_or(false) {
                    self.pos += 1;
                }
                let id: String = self.chars[start..self.pos].iter().map(|c| c.1).collect();
                if !(6..=18).contains(&id.len()) {
                    let p = self.pos;
                    self.pos = start;
                    let e = self.err(format!("'{id}' is not a valid SCTID (6 to 18 digits)"));
                    self.pos = p;
                    return Err(e);
                }
                self.skip_ws();
                if self.peek() == Some('|') {
                    self.pos += 1;
                    while self.peek().map(|c| c != '|').unwrap_or(false) {
                        self.pos += 1;
                    }
                    if self.peek() != Some('|') {
                        return Err(self.err("unterminated |term|"));
                    }
                    self.pos += 1;
                }
                Ok(Ecl::Concept(id))
            }
            _ => Err(self.err("expected a concept id")),
        }
    }

    /// Rejects the unsupported refinement/dotted syntax right after a focus with a clear error.
    fn after_focus(&mut self) -> Result<(), EclError> {
        self.skip_ws();
        match self.peek() {
            Some('.') => {
                Err(self
                    .err("dotted attributes ('.') are not supported by this server's ECL subset"))
            }
            Some('{') => Err(self
                .err("member field selection ('{') is not supported by this server's ECL subset")),
            _ => Ok(()),
        }
    }
}

/// Parses an ECL expression.
pub fn parse(text: &str) -> Result<Ecl, EclError> {
    let mut p = Parser {
        chars: text.char_indices().collect(),
        pos: 0,
        text,
    };
    // char_indices gives byte offsets: report character positions
    for (i, c) in p.chars.iter_mut().enumerate() {
        c.0 = i;
    }
    p.skip_ws();
    if p.peek().is_none() {
        return Err(p.err("empty expression"));
    }
    let e = p.expression()?;
    p.skip_ws();
    if p.peek().is_some() {
        return Err(p.err("unexpected text after the expression"));
    }
    Ok(e)
}

/// A set of concept indexes as a bitmap over the table.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: u32) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        !was
    }
    fn get(&self, i: u32) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(w, word)| {
            let word = *word;
            (0..64u32)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w as u32 * 64 + b)
        })
    }
}

fn closure(t: &ConceptTable, seeds: &Bits, down: bool, include_self: bool, one_step: bool) -> Bits {
    let mut out = Bits::new(t.concepts.len());
    let mut todo: Vec<u32> = Vec::new();
    for s in seeds.iter() {
        let c = &t.concepts[s as usize];
        let next = if down { &c.children } else { &c.parents };
        todo.extend(next.iter().copied());
        if include_self {
            out.set(s);
        }
    }
    if one_step {
        for i in todo {
            out.set(i);
        }
        return out;
    }
    let mut seen = Bits::new(t.concepts.len());
    while let Some(i) = todo.pop() {
        if !seen.set(i) {
            continue;
        }
        out.set(i);
        let c = &t.concepts[i as usize];
        todo.extend(if down { &c.children } else { &c.parents }.iter().copied());
    }
    out
}

fn eval(t: &ConceptTable, e: &Ecl) -> Bits {
    let n = t.concepts.len();
    match e {
        Ecl::Any => {
            let mut b = Bits::new(n);
            for (i, c) in t.concepts.iter().enumerate() {
                if !c.inactive {
                    b.set(i as u32);
                }
            }
            b
        }
        Ecl::Concept(id) => {
            let mut b = Bits::new(n);
            if let Some(i) = t.index_of(id) {
                b.set(i);
            }
            b
        }
        Ecl::Hierarchy(op, inner) => {
            if **inner == Ecl::Any {
                // `< *` = every concept with a parent, `> *` = every concept with a child, …
                let mut b = Bits::new(n);
                for (i, c) in t.concepts.iter().enumerate() {
                    let keep = !c.inactive
                        && match op {
                            Constraint::DescendantOrSelfOf | Constraint::AncestorOrSelfOf => true,
                            Constraint::DescendantOf | Constraint::ChildOf => !c.parents.is_empty(),
                            Constraint::AncestorOf | Constraint::ParentOf => !c.children.is_empty(),
                        };
                    if keep {
                        b.set(i as u32);
                    }
                }
                return b;
            }
            let seeds = eval(t, inner);
            match op {
                Constraint::DescendantOf => closure(t, &seeds, true, false, false),
                Constraint::DescendantOrSelfOf => closure(t, &seeds, true, true, false),
                Constraint::ChildOf => closure(t, &seeds, true, false, true),
                Constraint::AncestorOf => closure(t, &seeds, false, false, false),
                Constraint::AncestorOrSelfOf => closure(t, &seeds, false, true, false),
                Constraint::ParentOf => closure(t, &seeds, false, false, true),
            }
        }
        Ecl::MemberOf(inner) => {
            let mut b = Bits::new(n);
            let refsets: Vec<&String> = if **inner == Ecl::Any {
                t.sets.keys().collect()
            } else {
                let r = eval(t, inner);
                r.iter()
                    .map(|i| &t.concepts[i as usize].code)
                    .filter(|c| t.sets.contains_key(*c))
                    .collect()
            };
            for id in refsets {
                for m in &t.sets[id] {
                    b.set(*m);
                }
            }
            b
        }
        Ecl::Refined(focus, op, attrs) => {
            let mut out = eval(t, focus);
            let mut acc: Option<Bits> = None;
            for a in attrs {
                let types = attribute_types(t, &a.name);
                let values = eval(t, &a.value);
                let mut hit = Bits::new(n);
                for rel in &t.attributes {
                    let type_ok = types.as_ref().map(|ts| ts.contains(&rel.1)).unwrap_or(true);
                    if type_ok && values.get(rel.2) != a.negated {
                        hit.set(rel.0);
                    }
                }
                acc = Some(match acc {
                    None => hit,
                    Some(mut prev) => {
                        for (x, y) in prev.0.iter_mut().zip(hit.0.iter()) {
                            *x = if *op == BinaryOp::Or {
                                *x | *y
                            } else {
                                *x & *y
                            };
                        }
                        prev
                    }
                });
            }
            if let Some(acc) = acc {
                for (x, y) in out.0.iter_mut().zip(acc.0.iter()) {
                    *x &= *y;
                }
            }
            out
        }
        Ecl::Binary(op, l, r) => {
            let (mut a, b) = (eval(t, l), eval(t, r));
            for (x, y) in a.0.iter_mut().zip(b.0.iter()) {
                *x = match op {
                    BinaryOp::And => *x & *y,
                    BinaryOp::Or => *x | *y,
                    BinaryOp::Minus => *x & !*y,
                };
            }
            a
        }
    }
}

/// The attribute type SCTIDs an attribute name stands for (`None` = any type, `*`). Attribute
/// types need not be concepts of the table (a release without the metadata hierarchy).
fn attribute_types(t: &ConceptTable, name: &Ecl) -> Option<std::collections::HashSet<u64>> {
    let id = |c: &str| c.parse::<u64>().ok();
    match name {
        Ecl::Any => None,
        Ecl::Concept(c) => Some(id(c).into_iter().collect()),
        Ecl::Hierarchy(op, inner) => {
            let mut set: std::collections::HashSet<u64> = eval(t, name)
                .iter()
                .filter_map(|i| id(&t.concepts[i as usize].code))
                .collect();
            if let (Constraint::DescendantOrSelfOf, Ecl::Concept(c)) = (op, inner.as_ref()) {
                set.extend(id(c));
            }
            Some(set)
        }
        other => Some(
            eval(t, other)
                .iter()
                .filter_map(|i| id(&t.concepts[i as usize].code))
                .collect(),
        ),
    }
}

/// Evaluates an ECL expression over `table`: the matching concept indexes in definition order.
pub fn evaluate(table: &ConceptTable, expression: &str) -> Result<Vec<u32>, EclError> {
    let e = parse(expression)?;
    Ok(eval(table, &e).iter().collect())
}

/// Whether the concept at `index` matches a parsed expression (used for `$validate-code`).
pub fn matches(table: &ConceptTable, e: &Ecl, index: u32) -> bool {
    eval(table, e).get(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Concept;

    /// 1 root, 2 and 3 under 1, 4 under 2 and 3, 5 under 4, 6 inactive; refset 9 = {4, 5}.
    fn table() -> ConceptTable {
        let mut t = ConceptTable::new("http://snomed.info/sct", None);
        let ids = [
            "100001", "100002", "100003", "100004", "100005", "100006", "100009",
        ];
        let ix: Vec<u32> = ids
            .iter()
            .map(|id| t.add(Concept::new(*id, None)))
            .collect();
        t.link(ix[0], ix[1]);
        t.link(ix[0], ix[2]);
        t.link(ix[1], ix[3]);
        t.link(ix[2], ix[3]);
        t.link(ix[3], ix[4]);
        t.link(ix[0], ix[6]);
        t.concepts[5].inactive = true;
        t.sets.insert("100009".into(), vec![ix[3], ix[4]]);
        t
    }

    fn codes(t: &ConceptTable, e: &str) -> Vec<String> {
        evaluate(t, e)
            .unwrap_or_else(|err| panic!("{e}: {err}"))
            .into_iter()
            .map(|i| t.concepts[i as usize].code.clone())
            .collect()
    }

    #[test]
    fn hierarchy_operators() {
        let t = table();
        assert_eq!(codes(&t, "100004"), vec!["100004"]);
        assert_eq!(codes(&t, "< 100002"), vec!["100004", "100005"]);
        assert_eq!(codes(&t, "<<100002"), vec!["100002", "100004", "100005"]);
        assert_eq!(codes(&t, "<! 100001"), vec!["100002", "100003", "100009"]);
        assert_eq!(codes(&t, "> 100004"), vec!["100001", "100002", "100003"]);
        assert_eq!(
            codes(&t, ">> 100004 |Some term|"),
            vec!["100001", "100002", "100003", "100004"]
        );
        assert_eq!(codes(&t, ">! 100005"), vec!["100004"]);
        assert_eq!(codes(&t, "*").len(), 6, "inactive 100006 is not in *");
        assert_eq!(codes(&t, "< 999999"), Vec::<String>::new());
    }

    #[test]
    fn member_of_and_binary_operators() {
        let t = table();
        assert_eq!(codes(&t, "^ 100009"), vec!["100004", "100005"]);
        assert_eq!(codes(&t, "^*"), vec!["100004", "100005"]);
        assert_eq!(
            codes(&t, "<< 100002 AND ^ 100009"),
            vec!["100004", "100005"]
        );
        assert_eq!(codes(&t, "100002 or 100003"), vec!["100002", "100003"]);
        assert_eq!(
            codes(&t, "<< 100002 MINUS 100005"),
            vec!["100002", "100004"]
        );
        assert_eq!(
            codes(&t, "(<< 100002 MINUS 100005) OR 100003"),
            vec!["100002", "100003", "100004"]
        );
        assert_eq!(codes(&t, "< (100002 OR 100003)"), vec!["100004", "100005"]);
        assert_eq!(codes(&t, "<< 100002, ^100009"), vec!["100004", "100005"]);
        assert_eq!(
            codes(&t, "/* comment */ 100002 OR 100003 OR 100009"),
            vec!["100002", "100003", "100009"]
        );
        // ANDROID is not AND
        assert!(parse("100002 ANDROID").is_err());
    }

    #[test]
    fn attribute_refinements() {
        use crate::provider::Attribute;
        let mut t = table();
        // 100004 has finding site (363698007) 100003; 100005 has finding site 100002 and
        // causative agent (246075003) 100009
        t.attributes = vec![
            Attribute(3, 363698007, 2, 0),
            Attribute(4, 363698007, 1, 1),
            Attribute(4, 246075003, 6, 1),
        ];
        assert_eq!(codes(&t, "< 100001 : 363698007 = 100003"), vec!["100004"]);
        assert_eq!(
            codes(&t, "< 100001 : 363698007 = << 100001"),
            vec!["100004", "100005"]
        );
        assert_eq!(
            codes(&t, "* : 363698007 = 100002, 246075003 = *"),
            vec!["100005"]
        );
        assert_eq!(
            codes(&t, "* : 363698007 = 100003 OR 246075003 = 100009"),
            vec!["100004", "100005"]
        );
        assert_eq!(codes(&t, "* : * = 100009"), vec!["100005"]);
        assert_eq!(codes(&t, "* : << 363698007 != 100003"), vec!["100005"]);
        assert_eq!(
            codes(&t, "(< 100001 : 363698007 = 100003) OR 100002"),
            vec!["100002", "100004"]
        );
        assert_eq!(codes(&t, "<< 100004 : 246075003 = *"), vec!["100005"]);
    }

    #[test]
    fn parse_errors_name_the_position() {
        let e = parse("<< 100002 AND 100003 OR 100004").unwrap_err();
        assert_eq!(e.position, 22);
        assert!(e.message.contains("parentheses"), "{e}");
        let e = parse("<< (100002 OR 100003").unwrap_err();
        assert!(e.message.contains("')'"), "{e}");
        assert_eq!(e.position, 21);
        let e = parse("").unwrap_err();
        assert!(e.message.contains("empty"));
        let e = parse("<< 12").unwrap_err();
        assert_eq!(e.position, 4);
        let e = parse("<< 404684003 : { 363698007 = << 39057004 }").unwrap_err();
        assert_eq!(e.position, 16);
        assert!(e.message.contains("groups"), "{e}");
        let e = parse("<< 404684003 : [1..*] 363698007 = << 39057004").unwrap_err();
        assert!(e.message.contains("cardinalities"), "{e}");
        let e = parse("100002 OR 100003 : 363698007 = 100004").unwrap_err();
        assert!(e.message.contains("parentheses"), "{e}");
        let e = parse("<< 100002 : 363698007 100004").unwrap_err();
        assert!(e.message.contains("'=' or '!='"), "{e}");
        let e = parse("<< 100002 : 363698007 = 100004, 363698008 = 100005 OR 363698009 = 100005")
            .unwrap_err();
        assert!(e.message.contains("AND and OR"), "{e}");
        let e = parse("<< 100002 |open").unwrap_err();
        assert!(e.message.contains("unterminated"));
        let e = parse("100002 100003").unwrap_err();
        assert_eq!(e.position, 8);
        assert!(e
            .to_string()
            .starts_with("Invalid ECL expression at position 8"));
        let e = parse("<< abc").unwrap_err();
        assert_eq!(e.position, 4);
    }
}
