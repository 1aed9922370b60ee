//! SNOMED CT Expression Constraint Language (ECL 2.x), the subset Kiln evaluates over a loaded
//! `ConceptTable`: the constraint operators `<` (descendants), `<<` (descendants or self),
//! `<!` (children), `>` (ancestors), `>>` (ancestors or self), `>!` (parents), `^` (members of
//! a reference set), the wildcard `*`, concept references with an optional `|term|`, the
//! binary operators `AND`, `OR`, `MINUS` (and `,` for AND), and parentheses. As the ECL
//! specification requires, different binary operators may not be mixed without parentheses.
//! Attribute refinements (`: attribute = value`), cardinality, dotted attributes and concrete
//! values are not supported: they are reported as a parse error naming the position.
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
            left = Ecl::Binary(op, Box::new(left), Box::new(right));
        }
        Ok(left)
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
                self.after_focus()?;
                Ok(Ecl::Concept(id))
            }
            Some(_) => Err(self.err(
                "expected a concept id, '*', '(' or a constraint operator (<, <<, <!, >, >>, >!, ^)",
            )),
            None => Err(self.err("unexpected end of expression")),
        }
    }

    /// Rejects the unsupported refinement/dotted syntax right after a focus with a clear error.
    fn after_focus(&mut self) -> Result<(), EclError> {
        self.skip_ws();
        match self.peek() {
            Some(':') => Err(self
                .err("attribute refinements (':') are not supported by this server's ECL subset")),
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
        let e = parse("<< 404684003 : 363698007 = << 39057004").unwrap_err();
        assert_eq!(e.position, 14);
        assert!(e.message.contains("refinements"), "{e}");
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
