//! `_filter` (http://hl7.org/fhir/R4/search_filter.html): `and` / `or` / `not(…)` / parentheses
//! over `param op value` with ops eq ne co sw ew gt lt ge le sa eb ap pr, and on tokens in ni ss sb.

use crate::query::{
    parse_value, resolve_param, unescape, Criterion, Modifier, ParamClause, Prefix, SearchValue,
};
use crate::registry::{ParamType, Registry};

/// A parsed `_filter` expression.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterNode {
    And(Vec<FilterNode>),
    Or(Vec<FilterNode>),
    Not(Box<FilterNode>),
    Leaf(Box<Criterion>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Quoted(String),
    Open,
    Close,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if c == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if c == '"' {
            let mut v = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("unterminated string".into()),
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        if let Some(n) = chars.get(i + 1) {
                            v.push(*n);
                        }
                        i += 2;
                    }
                    Some(ch) => {
                        v.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Quoted(v));
        } else {
            let start = i;
            while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '(' && chars[i] != ')'
            {
                i += 1;
            }
            out.push(Tok::Word(chars[start..i].iter().collect()));
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    registry: &'a Registry,
    types: &'a [String],
    depth: usize,
}

impl Parser<'_> {
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Word(x)) if x.eq_ignore_ascii_case(w))
    }

    fn or(&mut self) -> Result<FilterNode, String> {
        self.depth += 1;
        if self.depth > 32 {
            return Err("filter nested too deeply".into());
        }
        let mut items = vec![self.and()?];
        while self.peek_word("or") {
            self.pos += 1;
            items.push(self.and()?);
        }
        self.depth -= 1;
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            FilterNode::Or(items)
        })
    }

    fn and(&mut self) -> Result<FilterNode, String> {
        let mut items = vec![self.unary()?];
        while self.peek_word("and") {
            self.pos += 1;
            items.push(self.unary()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            FilterNode::And(items)
        })
    }

    fn unary(&mut self) -> Result<FilterNode, String> {
        if self.peek_word("not") && matches!(self.toks.get(self.pos + 1), Some(Tok::Open)) {
            self.pos += 2;
            let inner = self.or()?;
            self.close()?;
            return Ok(FilterNode::Not(Box::new(inner)));
        }
        if matches!(self.toks.get(self.pos), Some(Tok::Open)) {
            self.pos += 1;
            let inner = self.or()?;
            self.close()?;
            return Ok(inner);
        }
        let path = match self.toks.get(self.pos) {
            Some(Tok::Word(w)) => w.clone(),
            t => return Err(format!("expected a parameter name, found {t:?}")),
        };
        let op = match self.toks.get(self.pos + 1) {
            Some(Tok::Word(w)) => w.to_ascii_lowercase(),
            t => return Err(format!("expected an operator after '{path}', found {t:?}")),
        };
        let value = match self.toks.get(self.pos + 2) {
            Some(Tok::Word(w)) => w.clone(),
            Some(Tok::Quoted(q)) => q.clone(),
            t => return Err(format!("expected a value after '{path} {op}', found {t:?}")),
        };
        self.pos += 3;
        Ok(FilterNode::Leaf(Box::new(self.leaf(&path, &op, &value)?)))
    }

    fn close(&mut self) -> Result<(), String> {
        if matches!(self.toks.get(self.pos), Some(Tok::Close)) {
            self.pos += 1;
            Ok(())
        } else {
            Err("expected ')'".into())
        }
    }

    fn leaf(&self, path: &str, op: &str, value: &str) -> Result<Criterion, String> {
        if path.contains('.') || path.contains('[') {
            return Err(format!("chained filter paths ('{path}') are not supported"));
        }
        let p = resolve_param(self.registry, self.types, path)
            .ok_or_else(|| format!("unknown parameter '{path}'"))?;
        let t = p.param_type();
        // the value is literal: escape search-syntax characters before reuse of the value parser
        let escaped = value
            .replace('\\', "\\\\")
            .replace(',', "\\,")
            .replace('$', "\\$");
        let escaped = if t == ParamType::Token || t == ParamType::Quantity {
            escaped
        } else {
            escaped.replace('|', "\\|")
        };
        let mut modifier = Modifier::None;
        let v = match op {
            "pr" => {
                let present = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err("'pr' takes true or false".into()),
                };
                modifier = Modifier::Missing;
                SearchValue::Missing(!present)
            }
            "eq" | "ne" | "gt" | "lt" | "ge" | "le" | "sa" | "eb" | "ap"
                if matches!(t, ParamType::Date | ParamType::Number | ParamType::Quantity) =>
            {
                parse_value(p, t, &modifier, &format!("{op}{escaped}"))?
            }
            "eq" | "ne" | "co" | "sw" | "ew" if t == ParamType::String => {
                modifier = match op {
                    "eq" => Modifier::NormEq,
                    "co" => Modifier::Contains,
                    "ew" => Modifier::EndsWith,
                    _ => Modifier::None,
                };
                let v = SearchValue::String(unescape(&escaped));
                if op == "ne" {
                    return Ok(Criterion::Filter(FilterNode::Not(Box::new(
                        FilterNode::Leaf(Box::new(Criterion::Param(ParamClause {
                            code: p.code().to_string(),
                            param_type: t,
                            modifier: Modifier::NormEq,
                            values: vec![v],
                            components: vec![],
                        }))),
                    ))));
                }
                v
            }
            "eq" | "ne"
                if matches!(t, ParamType::Token | ParamType::Reference | ParamType::Uri) =>
            {
                if op == "ne" && t == ParamType::Token {
                    modifier = Modifier::Not;
                }
                let v = parse_value(p, t, &Modifier::None, &escaped)?;
                if op == "ne" && t != ParamType::Token {
                    let leaf = Criterion::Param(ParamClause {
                        code: p.code().to_string(),
                        param_type: t,
                        modifier: Modifier::None,
                        values: vec![v],
                        components: vec![],
                    });
                    return Ok(Criterion::Filter(FilterNode::Not(Box::new(
                        FilterNode::Leaf(Box::new(leaf)),
                    ))));
                }
                v
            }
            // terminology operators: resolved like the `:in`/`:not-in`/`:above`/`:below`
            // modifiers (crate::codes) before planning
            "in" | "ni" if t == ParamType::Token => {
                modifier = if op == "in" {
                    Modifier::In
                } else {
                    Modifier::NotIn
                };
                SearchValue::Uri(value.to_string())
            }
            "ss" | "sb" if t == ParamType::Token => {
                // ss: the resource's code subsumes the value (:above); sb: it is subsumed by it
                modifier = if op == "ss" {
                    Modifier::Above
                } else {
                    Modifier::Below
                };
                parse_value(p, t, &modifier, &escaped)?
            }
            "sw" | "co" | "ew" if t == ParamType::Uri => {
                modifier = match op {
                    "sw" => Modifier::Below,
                    _ => Modifier::Contains,
                };
                SearchValue::Uri(value.to_string())
            }
            _ => {
                return Err(format!(
                    "operator '{op}' is not supported for {} parameter '{path}'",
                    t.as_str()
                ))
            }
        };
        Ok(Criterion::Param(ParamClause {
            code: p.code().to_string(),
            param_type: t,
            modifier,
            values: vec![v],
            components: vec![],
        }))
    }
}

/// Parses a `_filter` value for a search over `types`.
pub fn parse_filter(registry: &Registry, types: &[String], s: &str) -> Result<FilterNode, String> {
    let toks = tokenize(s)?;
    if toks.is_empty() {
        return Err("empty filter".into());
    }
    let mut p = Parser {
        toks,
        pos: 0,
        registry,
        types,
        depth: 0,
    };
    let node = p.or()?;
    if p.pos != p.toks.len() {
        return Err(format!("unexpected input after position {}", p.pos));
    }
    Ok(node)
}

// keep Prefix in the public vocabulary of this module's docs
#[allow(dead_code)]
const _PREFIX: Option<Prefix> = None;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::tests::R4;

    #[test]
    fn grammar() {
        let types = vec!["Patient".to_string()];
        let n = parse_filter(
            &R4,
            &types,
            "name co \"pet\" and (birthdate ge 1970 or gender eq male) and not(active eq false)",
        )
        .unwrap();
        match n {
            FilterNode::And(items) => {
                assert_eq!(items.len(), 3);
                assert!(matches!(items[1], FilterNode::Or(_)));
                assert!(matches!(items[2], FilterNode::Not(_)));
            }
            n => panic!("{n:?}"),
        }
        assert!(matches!(
            parse_filter(&R4, &types, "family pr true").unwrap(),
            FilterNode::Leaf(_)
        ));
        assert!(parse_filter(&R4, &types, "name xx 1").is_err());
        assert!(parse_filter(&R4, &types, "name eq").is_err());
        assert!(parse_filter(&R4, &types, "(name eq a").is_err());
        assert!(parse_filter(&R4, &types, "birthdate ge 19x0").is_err());
        assert!(parse_filter(&R4, &types, "nope eq 1").is_err());
    }
}
