//! Hand-written lexer and precedence-climbing parser for FHIRPath (N1 grammar).

use crate::datetime::{DateTimeValue, TimeValue};
use crate::error::Error;
use crate::value::Quantity;
use rust_decimal::Decimal;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// Backtick-delimited identifier (never a keyword).
    Delim(String),
    Str(String),
    Num(String),
    /// `@…` literal text without the `@`.
    DateLit(String),
    /// `%name`
    Var(String),
    /// `$this`, `$index`, `$total`
    Dollar(String),
    Sym(&'static str),
    Eof,
}

struct Lexer<'s> {
    src: &'s str,
    b: &'s [u8],
    pos: usize,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}
fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

impl<'s> Lexer<'s> {
    fn err(&self, msg: impl Into<String>, pos: usize) -> Error {
        Error::syntax(msg, pos)
    }

    fn skip_ws(&mut self) -> Result<(), Error> {
        loop {
            match self.b.get(self.pos) {
                Some(c) if c.is_ascii_whitespace() => self.pos += 1,
                Some(b'/') if self.b.get(self.pos + 1) == Some(&b'/') => {
                    while let Some(&c) = self.b.get(self.pos) {
                        if c == b'\n' {
                            break;
                        }
                        self.pos += 1;
                    }
                }
                Some(b'/') if self.b.get(self.pos + 1) == Some(&b'*') => {
                    let start = self.pos;
                    match self.src[self.pos + 2..].find("*/") {
                        Some(i) => self.pos += i + 4,
                        None => return Err(self.err("unterminated comment", start)),
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn quoted(&mut self, q: u8) -> Result<String, Error> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let c = match self.src[self.pos..].chars().next() {
                Some(c) => c,
                None => return Err(self.err("unterminated string", start)),
            };
            self.pos += c.len_utf8();
            if c as u32 == q as u32 {
                return Ok(out);
            }
            if c == '\\' {
                let e = match self.src[self.pos..].chars().next() {
                    Some(e) => e,
                    None => return Err(self.err("unterminated string", start)),
                };
                self.pos += e.len_utf8();
                match e {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'f' => out.push('\u{c}'),
                    'u' => {
                        let hex = self
                            .src
                            .get(self.pos..self.pos + 4)
                            .ok_or_else(|| self.err("bad \\u escape", self.pos))?;
                        let cp = u32::from_str_radix(hex, 16)
                            .map_err(|_| self.err("bad \\u escape", self.pos))?;
                        self.pos += 4;
                        out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                    }
                    other => out.push(other),
                }
            } else {
                out.push(c);
            }
        }
    }

    fn date_literal(&mut self) -> Result<Tok, Error> {
        let start = self.pos;
        self.pos += 1; // '@'
        let s = self.pos;
        let b = self.b;
        let take_digits = |p: &mut usize, n: usize| -> bool {
            if b.len() >= *p + n && b[*p..*p + n].iter().all(|c| c.is_ascii_digit()) {
                *p += n;
                true
            } else {
                false
            }
        };
        let mut p = self.pos;
        let time_part = |p: &mut usize| -> bool {
            if !take_digits(p, 2) {
                return false;
            }
            if b.get(*p) == Some(&b':') && {
                let mut q = *p + 1;
                take_digits(&mut q, 2)
            } {
                *p += 3;
                if b.get(*p) == Some(&b':') && {
                    let mut q = *p + 1;
                    take_digits(&mut q, 2)
                } {
                    *p += 3;
                    if b.get(*p) == Some(&b'.') && b.get(*p + 1).is_some_and(|c| c.is_ascii_digit())
                    {
                        *p += 1;
                        while b.get(*p).is_some_and(|c| c.is_ascii_digit()) {
                            *p += 1;
                        }
                    }
                }
            }
            true
        };
        let tz = |p: &mut usize| {
            match b.get(*p) {
                Some(b'Z') => *p += 1,
                Some(b'+') | Some(b'-') => {
                    let mut q = *p + 1;
                    if take_digits(&mut q, 2) && b.get(q) == Some(&b':') {
                        q += 1;
                        if take_digits(&mut q, 2) {
                            *p = q;
                        }
                    }
                }
                _ => {}
            };
        };
        if b.get(p) == Some(&b'T') {
            p += 1;
            if !time_part(&mut p) {
                return Err(self.err("invalid time literal", start));
            }
            let before_tz = p;
            tz(&mut p);
            self.pos = p;
            let text = &self.src[s..p];
            if p != before_tz {
                return Err(self.err("a time literal cannot have a timezone", start));
            }
            if TimeValue::parse(&text[1..]).is_none() {
                return Err(self.err("invalid time literal", start));
            }
            return Ok(Tok::DateLit(text.to_string()));
        }
        if !take_digits(&mut p, 4) {
            return Err(self.err("invalid date literal", start));
        }
        let mut is_datetime = false;
        if b.get(p) == Some(&b'-') && {
            let mut q = p + 1;
            take_digits(&mut q, 2)
        } {
            p += 3;
            if b.get(p) == Some(&b'-') && {
                let mut q = p + 1;
                take_digits(&mut q, 2)
            } {
                p += 3;
            }
        }
        if b.get(p) == Some(&b'T') {
            is_datetime = true;
            p += 1;
            let mut q = p;
            if time_part(&mut q) {
                p = q;
                tz(&mut p);
            }
        }
        self.pos = p;
        let text = &self.src[s..p];
        let ok = if is_datetime {
            DateTimeValue::parse_datetime(text).is_some()
        } else {
            DateTimeValue::parse_date(text).is_some()
        };
        if !ok {
            return Err(self.err(format!("invalid date/time literal @{text}"), start));
        }
        Ok(Tok::DateLit(text.to_string()))
    }

    fn next(&mut self) -> Result<(Tok, usize), Error> {
        self.skip_ws()?;
        let start = self.pos;
        let c = match self.b.get(self.pos) {
            None => return Ok((Tok::Eof, start)),
            Some(&c) => c,
        };
        let tok = match c {
            b'\'' => Tok::Str(self.quoted(b'\'')?),
            b'`' => Tok::Delim(self.quoted(b'`')?),
            b'@' => self.date_literal()?,
            b'%' => {
                self.pos += 1;
                match self.b.get(self.pos) {
                    Some(b'`') => Tok::Var(self.quoted(b'`')?),
                    Some(b'\'') => Tok::Var(self.quoted(b'\'')?),
                    Some(&c) if is_ident_start(c) => {
                        let s = self.pos;
                        while self
                            .b
                            .get(self.pos)
                            .is_some_and(|&c| is_ident_char(c) || c == b'-')
                        {
                            self.pos += 1;
                        }
                        Tok::Var(self.src[s..self.pos].to_string())
                    }
                    _ => return Err(self.err("invalid variable name", start)),
                }
            }
            b'$' => {
                self.pos += 1;
                let s = self.pos;
                while self.b.get(self.pos).is_some_and(|&c| is_ident_char(c)) {
                    self.pos += 1;
                }
                let name = &self.src[s..self.pos];
                match name {
                    "this" | "index" | "total" => Tok::Dollar(name.to_string()),
                    _ => return Err(self.err(format!("unknown ${name}"), start)),
                }
            }
            c if c.is_ascii_digit() => {
                while self.b.get(self.pos).is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                if self.b.get(self.pos) == Some(&b'.')
                    && self.b.get(self.pos + 1).is_some_and(|c| c.is_ascii_digit())
                {
                    self.pos += 1;
                    while self.b.get(self.pos).is_some_and(|c| c.is_ascii_digit()) {
                        self.pos += 1;
                    }
                }
                Tok::Num(self.src[start..self.pos].to_string())
            }
            c if is_ident_start(c) => {
                while self.b.get(self.pos).is_some_and(|&c| is_ident_char(c)) {
                    self.pos += 1;
                }
                Tok::Ident(self.src[start..self.pos].to_string())
            }
            _ => {
                let two = self.src.get(self.pos..self.pos + 2).unwrap_or("");
                let sym: &'static str = match two {
                    "<=" => "<=",
                    ">=" => ">=",
                    "!=" => "!=",
                    "!~" => "!~",
                    _ => match c {
                        b'.' => ".",
                        b',' => ",",
                        b'(' => "(",
                        b')' => ")",
                        b'[' => "[",
                        b']' => "]",
                        b'{' => "{",
                        b'}' => "}",
                        b'+' => "+",
                        b'-' => "-",
                        b'*' => "*",
                        b'/' => "/",
                        b'&' => "&",
                        b'|' => "|",
                        b'=' => "=",
                        b'~' => "~",
                        b'<' => "<",
                        b'>' => ">",
                        _ => {
                            let ch = self.src[self.pos..].chars().next().unwrap_or('?');
                            return Err(self.err(format!("unexpected character '{ch}'"), start));
                        }
                    },
                };
                self.pos += sym.len();
                Tok::Sym(sym)
            }
        };
        Ok((tok, start))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Mul,
    Div,
    IntDiv,
    Mod,
    Add,
    Sub,
    Concat,
    Union,
    Lt,
    Gt,
    Le,
    Ge,
    Eq,
    Equiv,
    Ne,
    NotEquiv,
    In,
    Contains,
    And,
    Or,
    Xor,
    Implies,
}

/// A (possibly qualified) type name: `Quantity`, `FHIR.Quantity`, `System.Integer`.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeSpec {
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Boolean(bool),
    String(String),
    Integer(i64),
    Decimal(Decimal),
    Date(DateTimeValue),
    DateTime(DateTimeValue),
    Time(TimeValue),
    Quantity(Quantity),
}

#[derive(Clone, Debug)]
pub enum Ast {
    Empty,
    Literal(Literal),
    This,
    Index,
    Total,
    Variable(String),
    /// An identifier evaluated against the focus (first step of a path).
    Identifier(String),
    Member(Box<Ast>, String),
    Call {
        target: Option<Box<Ast>>,
        name: String,
        args: Vec<Ast>,
        pos: usize,
    },
    Indexer(Box<Ast>, Box<Ast>),
    Negate(Box<Ast>, usize),
    Binary(BinOp, Box<Ast>, Box<Ast>, usize),
    Is(Box<Ast>, TypeSpec),
    As(Box<Ast>, TypeSpec),
}

struct Parser<'s> {
    lex: Lexer<'s>,
    tok: Tok,
    pos: usize,
    depth: usize,
    nodes: usize,
}

const MAX_DEPTH: usize = 64;
/// Upper bound on composite AST nodes (keeps trees small enough to drop/evaluate safely).
const MAX_NODES: usize = 10_000;
/// Maximum AST depth accepted for evaluation.
pub(crate) const MAX_AST_DEPTH: usize = 256;

fn binop(tok: &Tok) -> Option<(BinOp, u8)> {
    let op = match tok {
        Tok::Sym(s) => match *s {
            "*" => BinOp::Mul,
            "/" => BinOp::Div,
            "+" => BinOp::Add,
            "-" => BinOp::Sub,
            "&" => BinOp::Concat,
            "|" => BinOp::Union,
            "<" => BinOp::Lt,
            ">" => BinOp::Gt,
            "<=" => BinOp::Le,
            ">=" => BinOp::Ge,
            "=" => BinOp::Eq,
            "~" => BinOp::Equiv,
            "!=" => BinOp::Ne,
            "!~" => BinOp::NotEquiv,
            _ => return None,
        },
        Tok::Ident(s) => match s.as_str() {
            "div" => BinOp::IntDiv,
            "mod" => BinOp::Mod,
            "in" => BinOp::In,
            "contains" => BinOp::Contains,
            "and" => BinOp::And,
            "or" => BinOp::Or,
            "xor" => BinOp::Xor,
            "implies" => BinOp::Implies,
            _ => return None,
        },
        _ => return None,
    };
    let prec = match op {
        BinOp::Mul | BinOp::Div | BinOp::IntDiv | BinOp::Mod => 10,
        BinOp::Add | BinOp::Sub | BinOp::Concat => 9,
        BinOp::Union => 7,
        BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => 6,
        BinOp::Eq | BinOp::Equiv | BinOp::Ne | BinOp::NotEquiv => 5,
        BinOp::In | BinOp::Contains => 4,
        BinOp::And => 3,
        BinOp::Or | BinOp::Xor => 2,
        BinOp::Implies => 1,
    };
    Some((op, prec))
}

const TYPE_OP_PREC: u8 = 8;

impl<'s> Parser<'s> {
    fn bump(&mut self) -> Result<(), Error> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(Error::syntax("expression too large", self.pos));
        }
        Ok(())
    }

    fn advance(&mut self) -> Result<(), Error> {
        let (t, p) = self.lex.next()?;
        self.tok = t;
        self.pos = p;
        Ok(())
    }

    fn expect(&mut self, sym: &'static str) -> Result<(), Error> {
        if self.tok == Tok::Sym(sym) {
            self.advance()
        } else {
            Err(Error::syntax(
                format!("expected '{sym}', found {}", describe(&self.tok)),
                self.pos,
            ))
        }
    }

    fn expression(&mut self, min_prec: u8) -> Result<Ast, Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Error::syntax("expression nested too deeply", self.pos));
        }
        let mut lhs = self.unary()?;
        loop {
            if let Tok::Ident(w) = &self.tok {
                if (w == "is" || w == "as") && TYPE_OP_PREC >= min_prec {
                    let is = w == "is";
                    self.advance()?;
                    let ts = self.type_spec()?;
                    self.bump()?;
                    lhs = if is {
                        Ast::Is(Box::new(lhs), ts)
                    } else {
                        Ast::As(Box::new(lhs), ts)
                    };
                    continue;
                }
            }
            let Some((op, prec)) = binop(&self.tok) else {
                break;
            };
            if prec < min_prec {
                break;
            }
            let pos = self.pos;
            self.advance()?;
            let rhs = self.expression(prec + 1)?;
            self.bump()?;
            lhs = Ast::Binary(op, Box::new(lhs), Box::new(rhs), pos);
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn type_spec(&mut self) -> Result<TypeSpec, Error> {
        let mut parts = vec![self.identifier()?];
        while self.tok == Tok::Sym(".") {
            self.advance()?;
            parts.push(self.identifier()?);
        }
        Ok(make_type_spec(parts))
    }

    fn identifier(&mut self) -> Result<String, Error> {
        match std::mem::replace(&mut self.tok, Tok::Eof) {
            Tok::Ident(s) | Tok::Delim(s) => {
                self.advance()?;
                Ok(s)
            }
            other => {
                let msg = format!("expected identifier, found {}", describe(&other));
                self.tok = other;
                Err(Error::syntax(msg, self.pos))
            }
        }
    }

    fn unary(&mut self) -> Result<Ast, Error> {
        match self.tok {
            Tok::Sym("-") => {
                let pos = self.pos;
                self.advance()?;
                self.bump()?;
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(Error::syntax("expression nested too deeply", pos));
                }
                let inner = self.unary()?;
                self.depth -= 1;
                Ok(Ast::Negate(Box::new(inner), pos))
            }
            Tok::Sym("+") => {
                self.advance()?;
                self.bump()?;
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(Error::syntax("expression nested too deeply", self.pos));
                }
                let r = self.unary();
                self.depth -= 1;
                r
            }
            _ => self.postfix(),
        }
    }

    fn postfix(&mut self) -> Result<Ast, Error> {
        let mut e = self.primary()?;
        loop {
            match self.tok {
                Tok::Sym(".") => {
                    self.advance()?;
                    self.bump()?;
                    let pos = self.pos;
                    let name = self.identifier()?;
                    if self.tok == Tok::Sym("(") {
                        let args = self.args()?;
                        e = Ast::Call {
                            target: Some(Box::new(e)),
                            name,
                            args,
                            pos,
                        };
                    } else {
                        e = Ast::Member(Box::new(e), name);
                    }
                }
                Tok::Sym("[") => {
                    self.advance()?;
                    self.bump()?;
                    let idx = self.expression(0)?;
                    self.expect("]")?;
                    e = Ast::Indexer(Box::new(e), Box::new(idx));
                }
                _ => return Ok(e),
            }
        }
    }

    fn args(&mut self) -> Result<Vec<Ast>, Error> {
        self.expect("(")?;
        let mut args = Vec::new();
        if self.tok == Tok::Sym(")") {
            self.advance()?;
            return Ok(args);
        }
        loop {
            args.push(self.expression(0)?);
            match self.tok {
                Tok::Sym(",") => self.advance()?,
                Tok::Sym(")") => {
                    self.advance()?;
                    return Ok(args);
                }
                _ => {
                    return Err(Error::syntax(
                        format!("expected ',' or ')', found {}", describe(&self.tok)),
                        self.pos,
                    ))
                }
            }
        }
    }

    fn primary(&mut self) -> Result<Ast, Error> {
        let pos = self.pos;
        let tok = std::mem::replace(&mut self.tok, Tok::Eof);
        match tok {
            Tok::Num(text) => {
                self.advance()?;
                let lit = if text.contains('.') {
                    Literal::Decimal(
                        Decimal::from_str(&text)
                            .map_err(|_| Error::syntax("decimal literal out of range", pos))?,
                    )
                } else {
                    Literal::Integer(
                        text.parse::<i64>()
                            .map_err(|_| Error::syntax("integer literal out of range", pos))?,
                    )
                };
                // Quantity literal: number followed by a unit string or calendar keyword.
                let unit = match &self.tok {
                    Tok::Str(u) => Some(u.clone()),
                    Tok::Ident(w) if crate::units::calendar_unit(w).is_some() => Some(w.clone()),
                    _ => None,
                };
                if let Some(unit) = unit {
                    self.advance()?;
                    let value = match lit {
                        Literal::Integer(i) => Decimal::from(i),
                        Literal::Decimal(d) => d,
                        _ => Decimal::ZERO,
                    };
                    return Ok(Ast::Literal(Literal::Quantity(Quantity { value, unit })));
                }
                Ok(Ast::Literal(lit))
            }
            Tok::Str(s) => {
                self.advance()?;
                Ok(Ast::Literal(Literal::String(s)))
            }
            Tok::DateLit(text) => {
                self.advance()?;
                let lit = if let Some(t) = text.strip_prefix('T') {
                    Literal::Time(
                        TimeValue::parse(t).ok_or_else(|| Error::syntax("invalid time", pos))?,
                    )
                } else if text.contains('T') {
                    Literal::DateTime(
                        DateTimeValue::parse_datetime(&text)
                            .ok_or_else(|| Error::syntax("invalid dateTime", pos))?,
                    )
                } else {
                    Literal::Date(
                        DateTimeValue::parse_date(&text)
                            .ok_or_else(|| Error::syntax("invalid date", pos))?,
                    )
                };
                Ok(Ast::Literal(lit))
            }
            Tok::Var(name) => {
                self.advance()?;
                Ok(Ast::Variable(name))
            }
            Tok::Dollar(name) => {
                self.advance()?;
                Ok(match name.as_str() {
                    "this" => Ast::This,
                    "index" => Ast::Index,
                    _ => Ast::Total,
                })
            }
            Tok::Sym("(") => {
                self.advance()?;
                let e = self.expression(0)?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Sym("{") => {
                self.advance()?;
                self.expect("}")?;
                Ok(Ast::Empty)
            }
            Tok::Ident(name) => {
                self.advance()?;
                if self.tok == Tok::Sym("(") {
                    let args = self.args()?;
                    return Ok(Ast::Call {
                        target: None,
                        name,
                        args,
                        pos,
                    });
                }
                match name.as_str() {
                    "true" => Ok(Ast::Literal(Literal::Boolean(true))),
                    "false" => Ok(Ast::Literal(Literal::Boolean(false))),
                    _ => Ok(Ast::Identifier(name)),
                }
            }
            Tok::Delim(name) => {
                self.advance()?;
                Ok(Ast::Identifier(name))
            }
            other => {
                let msg = format!("unexpected {}", describe(&other));
                self.tok = other;
                Err(Error::syntax(msg, pos))
            }
        }
    }
}

pub(crate) fn make_type_spec(mut parts: Vec<String>) -> TypeSpec {
    if parts.len() >= 2 {
        let name = parts.split_off(1).join(".");
        TypeSpec {
            namespace: parts.pop(),
            name,
        }
    } else {
        TypeSpec {
            namespace: None,
            name: parts.pop().unwrap_or_default(),
        }
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) | Tok::Delim(s) => format!("identifier '{s}'"),
        Tok::Str(s) => format!("string '{s}'"),
        Tok::Num(s) => format!("number {s}"),
        Tok::DateLit(s) => format!("@{s}"),
        Tok::Var(s) => format!("%{s}"),
        Tok::Dollar(s) => format!("${s}"),
        Tok::Sym(s) => format!("'{s}'"),
        Tok::Eof => "end of expression".into(),
    }
}

/// Parses FHIRPath source into an AST.
pub fn parse(src: &str) -> Result<Ast, Error> {
    let mut p = Parser {
        lex: Lexer {
            src,
            b: src.as_bytes(),
            pos: 0,
        },
        tok: Tok::Eof,
        pos: 0,
        depth: 0,
        nodes: 0,
    };
    p.advance()?;
    if p.tok == Tok::Eof {
        return Err(Error::syntax("empty expression", 0));
    }
    let e = p.expression(0)?;
    if p.tok != Tok::Eof {
        return Err(Error::syntax(
            format!("unexpected {} after expression", describe(&p.tok)),
            p.pos,
        ));
    }
    if ast_depth(&e) > MAX_AST_DEPTH {
        return Err(Error::syntax("expression nested too deeply", 0));
    }
    Ok(e)
}

/// Depth of an AST, computed without recursion.
fn ast_depth(root: &Ast) -> usize {
    let mut max = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((node, d)) = stack.pop() {
        max = max.max(d);
        match node {
            Ast::Member(t, _) | Ast::Negate(t, _) | Ast::Is(t, _) | Ast::As(t, _) => {
                stack.push((t, d + 1))
            }
            Ast::Binary(BinOp::Union, _, _, _) => {
                // Union chains are evaluated iteratively: count them as one level.
                let mut cur = node;
                while let Ast::Binary(BinOp::Union, l, r, _) = cur {
                    stack.push((r, d + 1));
                    cur = l;
                }
                stack.push((cur, d + 1));
            }
            Ast::Indexer(a, b) | Ast::Binary(_, a, b, _) => {
                stack.push((a, d + 1));
                stack.push((b, d + 1));
            }
            Ast::Call { target, args, .. } => {
                if let Some(t) = target {
                    stack.push((t, d + 1));
                }
                for a in args {
                    stack.push((a, d + 1));
                }
            }
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Ast {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_paths_and_calls() {
        assert!(matches!(ok("Patient.name.given"), Ast::Member(_, ref n) if n == "given"));
        assert!(
            matches!(ok("name.where(use = 'official')"), Ast::Call { ref name, .. } if name == "where")
        );
        assert!(matches!(ok("name[0]"), Ast::Indexer(..)));
        assert!(matches!(ok("`given`"), Ast::Identifier(ref n) if n == "given"));
    }

    #[test]
    fn precedence() {
        // `*` binds tighter than `+`, `=` looser than `+`, `and` looser than `=`.
        match ok("1 + 2 * 3 = 7 and true") {
            Ast::Binary(BinOp::And, l, _, _) => match *l {
                Ast::Binary(BinOp::Eq, l2, _, _) => {
                    assert!(matches!(*l2, Ast::Binary(BinOp::Add, _, _, _)))
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        // unary minus applies to the whole path
        assert!(matches!(ok("-Patient.name.count()"), Ast::Negate(..)));
        // is/as bind tighter than |
        assert!(matches!(
            ok("value as Quantity | value as Range"),
            Ast::Binary(BinOp::Union, _, _, _)
        ));
    }

    #[test]
    fn literals() {
        assert!(matches!(ok("4 'mg'"), Ast::Literal(Literal::Quantity(_))));
        assert!(matches!(ok("4 days"), Ast::Literal(Literal::Quantity(_))));
        assert!(matches!(ok("@2019-01-01"), Ast::Literal(Literal::Date(_))));
        assert!(matches!(
            ok("@2019-01-01T10:00Z"),
            Ast::Literal(Literal::DateTime(_))
        ));
        assert!(matches!(ok("@T12:00"), Ast::Literal(Literal::Time(_))));
        assert!(matches!(ok("{}"), Ast::Empty));
        assert!(matches!(ok("'a\\'b'"), Ast::Literal(Literal::String(ref s)) if s == "a'b"));
        assert!(matches!(ok("%`vs-x`"), Ast::Variable(_)));
        assert!(matches!(ok("2 + 2 // c"), Ast::Binary(..)));
    }

    #[test]
    fn pathological_inputs_are_rejected_without_overflow() {
        let long_chain = vec!["1"; 5000].join(" + ");
        assert!(parse(&long_chain).is_err());
        let minus = format!("{}1", "-".repeat(100_000));
        assert!(parse(&minus).is_err());
        let parens = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(parse(&parens).is_err());
        let path = format!("a{}", ".b".repeat(100_000));
        assert!(parse(&path).is_err());
        // A realistic long union is fine.
        let union = vec!["Patient.name.given"; 60].join(" | ");
        assert!(parse(&union).is_ok());
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "2 + 2 /",
            "2 + 2 /* x",
            "name.",
            "(1",
            "'abc",
            "@T12:00Z",
            "1 +* 2",
            "",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.is_syntax(), "{bad}");
        }
    }
}
