//! A small UCUM subset for FHIRPath quantity equality, comparison and arithmetic.
//!
//! Units are parsed into a [`Canonical`] form: a decimal factor plus exponents of base
//! dimensions (m, g, s, rad, K, C, cd, mol, arbitrary units, calendar months). Two quantities are
//! comparable when their dimensions are equal. Supported: the metric prefixes on metric atoms,
//! products/quotients/exponents/parentheses/annotations (`mg/dL`, `kg.m2`, `{beats}/min`,
//! `10*3/uL`), time (`ms s min h d wk mo a`), mass (`g [lb_av] [oz_av] [gr] t`), length
//! (`m [in_i] [ft_i] [yd_i] [mi_i]`), volume (`L l`), `mol eq osm kat U [iU] [IU]`, pressure
//! (`Pa bar mm[Hg]`), energy/power (`J cal W`), `N Hz %`. FHIRPath calendar keywords (`year(s)`,
//! `month(s)`, `week(s)`, `day(s)` … `millisecond(s)`) are mapped: weeks and shorter equal their
//! UCUM counterparts; years and months only compare with each other (not with `a`/`mo`).
//!
//! Hook: the terminology crate's full UCUM can replace this table with [`set_ucum_canonicalizer`];
//! the hook returns `(factor, canonical unit string)` and is tried before the built-in table.
//! Calendar keywords are always handled here (they are not UCUM).

use once_cell::sync::OnceCell;
use rust_decimal::Decimal;
use std::str::FromStr;

/// Number of base dimensions tracked.
const DIMS: usize = 10;
const M: usize = 0;
const G: usize = 1;
const S: usize = 2;
const RAD: usize = 3;
const K: usize = 4;
const C: usize = 5;
const CD: usize = 6;
const MOL: usize = 7;
const ARB: usize = 8;
const CAL_MONTH: usize = 9;

/// A unit reduced to base dimensions.
#[derive(Clone, Debug, PartialEq)]
pub struct Canonical {
    pub factor: Decimal,
    pub dims: [i8; DIMS],
    /// Canonical key for units supplied by an external canonicalizer (then `dims` is unused).
    pub external_key: Option<String>,
}

impl Canonical {
    fn one() -> Self {
        Canonical {
            factor: Decimal::ONE,
            dims: [0; DIMS],
            external_key: None,
        }
    }
    pub fn comparable(&self, other: &Canonical) -> bool {
        self.dims == other.dims && self.external_key == other.external_key
    }
    fn mul(&self, o: &Canonical, sign: i8) -> Option<Canonical> {
        let factor = if sign > 0 {
            self.factor.checked_mul(o.factor)?
        } else {
            self.factor.checked_div(o.factor)?
        };
        let mut dims = self.dims;
        for (d, od) in dims.iter_mut().zip(o.dims.iter()) {
            *d = d.checked_add(od.checked_mul(sign)?)?;
        }
        Some(Canonical {
            factor,
            dims,
            external_key: None,
        })
    }
    fn pow(&self, e: i32) -> Option<Canonical> {
        if e.unsigned_abs() > 64 {
            return None;
        }
        let mut out = Canonical::one();
        for _ in 0..e.unsigned_abs() {
            out = out.mul(self, 1)?;
        }
        if e < 0 {
            out = Canonical::one().mul(&out, -1)?;
        }
        Some(out)
    }
}

type Canonicalizer = fn(&str) -> Option<(f64, String)>;
static EXTERNAL: OnceCell<Canonicalizer> = OnceCell::new();

/// Installs a full UCUM implementation (e.g. the terminology crate's
/// `ucum::canonicalize(1.0, unit)`). It receives a UCUM code and returns
/// `(factor to canonical units, canonical unit string)`. Can be set once per process; units it
/// does not know fall back to the built-in table.
pub fn set_ucum_canonicalizer(f: Canonicalizer) -> bool {
    EXTERNAL.set(f).is_ok()
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap_or(Decimal::ONE)
}

fn base(dim: usize, n: i8) -> [i8; DIMS] {
    let mut d = [0; DIMS];
    d[dim] = n;
    d
}

/// (code, factor, dims, metric = accepts prefixes)
fn atom(code: &str) -> Option<(Decimal, [i8; DIMS], bool)> {
    let mut d = [0i8; DIMS];
    let (f, metric): (&str, bool) = match code {
        "m" => {
            d[M] = 1;
            ("1", true)
        }
        "g" => {
            d[G] = 1;
            ("1", true)
        }
        "s" => {
            d[S] = 1;
            ("1", true)
        }
        "rad" => {
            d[RAD] = 1;
            ("1", true)
        }
        "K" => {
            d[K] = 1;
            ("1", true)
        }
        "C" => {
            d[C] = 1;
            ("1", true)
        }
        "cd" => {
            d[CD] = 1;
            ("1", true)
        }
        "mol" | "eq" | "osm" => {
            d[MOL] = 1;
            ("1", true)
        }
        "kat" => {
            d[MOL] = 1;
            d[S] = -1;
            ("1", true)
        }
        "U" => {
            d[MOL] = 1;
            d[S] = -1;
            ("0.0000000166666666666666666667", true)
        }
        "[iU]" | "[IU]" | "[arb'U]" => {
            d[ARB] = 1;
            ("1", true)
        }
        "L" | "l" => {
            d[M] = 3;
            ("0.001", true)
        }
        "min" => {
            d[S] = 1;
            ("60", false)
        }
        "h" => {
            d[S] = 1;
            ("3600", false)
        }
        "d" => {
            d[S] = 1;
            ("86400", false)
        }
        "wk" => {
            d[S] = 1;
            ("604800", false)
        }
        "mo" => {
            d[S] = 1;
            ("2629800", false)
        }
        "a" => {
            d[S] = 1;
            ("31557600", false)
        }
        "t" => {
            d[G] = 1;
            ("1000000", true)
        }
        "[lb_av]" => {
            d[G] = 1;
            ("453.59237", false)
        }
        "[oz_av]" => {
            d[G] = 1;
            ("28.349523125", false)
        }
        "[gr]" => {
            d[G] = 1;
            ("0.06479891", false)
        }
        "[in_i]" => {
            d[M] = 1;
            ("0.0254", false)
        }
        "[ft_i]" => {
            d[M] = 1;
            ("0.3048", false)
        }
        "[yd_i]" => {
            d[M] = 1;
            ("0.9144", false)
        }
        "[mi_i]" => {
            d[M] = 1;
            ("1609.344", false)
        }
        "N" => {
            d[G] = 1;
            d[M] = 1;
            d[S] = -2;
            ("1000", true)
        }
        "Pa" => {
            d[G] = 1;
            d[M] = -1;
            d[S] = -2;
            ("1000", true)
        }
        "bar" => {
            d[G] = 1;
            d[M] = -1;
            d[S] = -2;
            ("100000000", true)
        }
        "m[Hg]" => {
            d[G] = 1;
            d[M] = -1;
            d[S] = -2;
            ("133322000", true)
        }
        "J" => {
            d[G] = 1;
            d[M] = 2;
            d[S] = -2;
            ("1000", true)
        }
        "cal" => {
            d[G] = 1;
            d[M] = 2;
            d[S] = -2;
            ("4184", true)
        }
        "W" => {
            d[G] = 1;
            d[M] = 2;
            d[S] = -3;
            ("1000", true)
        }
        "Hz" => {
            d[S] = -1;
            ("1", true)
        }
        "%" => ("0.01", false),
        "1" => ("1", false),
        _ => return None,
    };
    Some((dec(f), d, metric))
}

fn prefix(p: &str) -> Option<i32> {
    Some(match p {
        "Y" => 24,
        "Z" => 21,
        "E" => 18,
        "P" => 15,
        "T" => 12,
        "G" => 9,
        "M" => 6,
        "k" => 3,
        "h" => 2,
        "da" => 1,
        "d" => -1,
        "c" => -2,
        "m" => -3,
        "u" => -6,
        "n" => -9,
        "p" => -12,
        "f" => -15,
        "a" => -18,
        _ => return None,
    })
}

fn pow10(e: i32) -> Option<Decimal> {
    if e > 28 {
        return None;
    }
    if e >= 0 {
        let mut d = Decimal::ONE;
        for _ in 0..e {
            d = d.checked_mul(Decimal::TEN)?;
        }
        Some(d)
    } else {
        if e < -28 {
            return None;
        }
        Some(Decimal::new(1, (-e) as u32))
    }
}

fn simple_unit(sym: &str) -> Option<Canonical> {
    if let Some((f, dims, _)) = atom(sym) {
        return Some(Canonical {
            factor: f,
            dims,
            external_key: None,
        });
    }
    for plen in [2usize, 1] {
        if sym.len() > plen && sym.is_char_boundary(plen) {
            let (p, rest) = sym.split_at(plen);
            if let (Some(e), Some((f, dims, true))) = (prefix(p), atom(rest)) {
                return Some(Canonical {
                    factor: f.checked_mul(pow10(e)?)?,
                    dims,
                    external_key: None,
                });
            }
        }
    }
    None
}

struct UnitParser<'s> {
    s: &'s [u8],
    pos: usize,
}

impl UnitParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn term(&mut self) -> Option<Canonical> {
        let mut acc = if self.peek() == Some(b'/') {
            Canonical::one()
        } else {
            self.component()?
        };
        while let Some(op) = self.peek() {
            match op {
                b'.' => {
                    self.pos += 1;
                    acc = acc.mul(&self.component()?, 1)?;
                }
                b'/' => {
                    self.pos += 1;
                    acc = acc.mul(&self.component()?, -1)?;
                }
                _ => break,
            }
        }
        Some(acc)
    }

    fn exponent(&mut self) -> Option<i32> {
        let start = self.pos;
        if matches!(self.peek(), Some(b'+') | Some(b'-')) {
            self.pos += 1;
        }
        while matches!(self.peek(), Some(c) if c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Some(1);
        }
        std::str::from_utf8(&self.s[start..self.pos])
            .ok()?
            .parse()
            .ok()
    }

    fn component(&mut self) -> Option<Canonical> {
        match self.peek()? {
            b'(' => {
                self.pos += 1;
                let t = self.term()?;
                if self.peek() != Some(b')') {
                    return None;
                }
                self.pos += 1;
                let e = self.exponent()?;
                t.pow(e)
            }
            b'{' => {
                while self.peek()? != b'}' {
                    self.pos += 1;
                }
                self.pos += 1;
                Some(Canonical::one())
            }
            c if c.is_ascii_digit() => {
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c.is_ascii_digit()) {
                    self.pos += 1;
                }
                let num = std::str::from_utf8(&self.s[start..self.pos]).ok()?;
                if matches!(self.peek(), Some(b'*') | Some(b'^')) && num == "10" {
                    self.pos += 1;
                    let e = self.exponent()?;
                    let c = Canonical {
                        factor: pow10(e)?,
                        ..Canonical::one()
                    };
                    self.skip_annotation();
                    return Some(c);
                }
                let f = Decimal::from_str(num).ok()?;
                self.skip_annotation();
                Some(Canonical {
                    factor: f,
                    ..Canonical::one()
                })
            }
            _ => {
                let start = self.pos;
                loop {
                    match self.peek() {
                        Some(b'[') => {
                            while self.peek()? != b']' {
                                self.pos += 1;
                            }
                            self.pos += 1;
                        }
                        Some(c)
                            if c.is_ascii_alphabetic() || c == b'%' || c == b'_' || c == b'\'' =>
                        {
                            self.pos += 1
                        }
                        _ => break,
                    }
                }
                if self.pos == start {
                    return None;
                }
                let sym = std::str::from_utf8(&self.s[start..self.pos]).ok()?;
                let unit = simple_unit(sym)?;
                let e = self.exponent()?;
                self.skip_annotation();
                unit.pow(e)
            }
        }
    }

    fn skip_annotation(&mut self) {
        if self.peek() == Some(b'{') {
            while let Some(c) = self.peek() {
                self.pos += 1;
                if c == b'}' {
                    break;
                }
            }
        }
    }
}

/// Maps FHIRPath calendar keywords to their duration unit; `None` for other units.
pub fn calendar_unit(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "year" | "years" => "year",
        "month" | "months" => "month",
        "week" | "weeks" => "week",
        "day" | "days" => "day",
        "hour" | "hours" => "hour",
        "minute" | "minutes" => "minute",
        "second" | "seconds" => "second",
        "millisecond" | "milliseconds" => "millisecond",
        _ => return None,
    })
}

/// Maps a quantity unit to a calendar duration unit usable for date arithmetic (calendar keywords
/// and the UCUM time codes).
pub fn duration_unit(unit: &str) -> Option<&'static str> {
    // UCUM `a` and `mo` are not definite calendar durations: not usable for date arithmetic.
    calendar_unit(unit).or(match unit {
        "wk" => Some("week"),
        "d" => Some("day"),
        "h" => Some("hour"),
        "min" => Some("minute"),
        "s" => Some("second"),
        "ms" => Some("millisecond"),
        _ => None,
    })
}

/// Reduces a unit (UCUM code or FHIRPath calendar keyword) to canonical form.
pub fn canonicalize(unit: &str) -> Option<Canonical> {
    if let Some(cal) = calendar_unit(unit) {
        return match cal {
            "year" => Some(Canonical {
                factor: Decimal::from(12),
                dims: base(CAL_MONTH, 1),
                external_key: None,
            }),
            "month" => Some(Canonical {
                factor: Decimal::ONE,
                dims: base(CAL_MONTH, 1),
                external_key: None,
            }),
            "week" => canonicalize("wk"),
            "day" => canonicalize("d"),
            "hour" => canonicalize("h"),
            "minute" => canonicalize("min"),
            "second" => canonicalize("s"),
            _ => canonicalize("ms"),
        };
    }
    if unit.is_empty() {
        return Some(Canonical::one());
    }
    if let Some(f) = EXTERNAL.get() {
        if let Some((factor, key)) = f(unit) {
            return Some(Canonical {
                factor: Decimal::try_from(factor).ok()?.normalize(),
                dims: [0; DIMS],
                external_key: Some(key),
            });
        }
    }
    let mut p = UnitParser {
        s: unit.as_bytes(),
        pos: 0,
    };
    let c = p.term()?;
    (p.pos == unit.len()).then_some(c)
}

/// Whether `unit` is a UCUM unit this module understands (or a calendar keyword).
pub fn is_known(unit: &str) -> bool {
    canonicalize(unit).is_some()
}

/// Converts `value` expressed in `from` into unit `to`; `None` if not comparable.
pub fn convert(value: Decimal, from: &str, to: &str) -> Option<Decimal> {
    if from == to {
        return Some(value);
    }
    let a = canonicalize(from)?;
    let b = canonicalize(to)?;
    if !a.comparable(&b) {
        return None;
    }
    value.checked_mul(a.factor)?.checked_div(b.factor)
}

/// Value in canonical units with the dimension vector (for comparisons of differing units).
pub fn to_canonical(value: Decimal, unit: &str) -> Option<(Decimal, Canonical)> {
    let c = canonicalize(unit)?;
    Some((value.checked_mul(c.factor)?, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn converts_mass_volume_length_time() {
        assert_eq!(convert(d("4"), "g", "mg"), Some(d("4000")));
        assert_eq!(convert(d("1"), "L", "mL"), Some(d("1000")));
        assert_eq!(convert(d("1"), "m", "mm"), Some(d("1000")));
        assert_eq!(convert(d("1"), "wk", "d"), Some(d("7")));
        assert_eq!(convert(d("7"), "days", "wk"), Some(d("1")));
        assert_eq!(convert(d("1"), "[lb_av]", "g"), Some(d("453.59237")));
        assert_eq!(convert(d("1"), "g", "m"), None);
        assert_eq!(convert(d("1"), "year", "a"), None);
        assert_eq!(convert(d("1"), "year", "months"), Some(d("12")));
    }

    #[test]
    fn parses_compound_units() {
        let a = canonicalize("mg/dL").unwrap();
        let b = canonicalize("g/L").unwrap();
        assert!(a.comparable(&b));
        assert_eq!(convert(d("100"), "mg/dL", "g/L"), Some(d("1")));
        assert!(canonicalize("{beats}/min").is_some());
        assert!(canonicalize("10*3/uL").is_some());
        assert!(canonicalize("kg.m2").is_some());
        assert!(canonicalize("mm[Hg]").is_some());
        assert!(canonicalize("cm.m")
            .unwrap()
            .comparable(&canonicalize("m2").unwrap()));
        assert!(canonicalize("wibble").is_none());
    }
}
