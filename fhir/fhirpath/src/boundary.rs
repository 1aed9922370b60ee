//! `lowBoundary()`, `highBoundary()` and `precision()` (FHIRPath 2.0 additions used by FHIR R5
//! tooling and present in the R4 test suite).

use crate::datetime::{DateTimeValue, Precision, TimeValue};
use crate::value::{Item, Prim, Quantity};
use rust_decimal::{Decimal, RoundingStrategy};

fn half_unit(scale: u32) -> Option<Decimal> {
    // 0.5 * 10^-scale (not representable beyond 28 fractional digits)
    Decimal::try_new(5, scale + 1).ok()
}

fn dec_boundary(v: Decimal, high: bool, precision: Option<i64>) -> Option<Decimal> {
    let p = precision.unwrap_or(8);
    if !(0..=28).contains(&p) {
        return None;
    }
    let p = p as u32;
    let neg = v.is_sign_negative();
    let a = v.abs();
    // For negative values the low boundary mirrors the high boundary of |v| and vice versa.
    let want_high = high != neg;
    let hu = half_unit(a.scale())?;
    let mut r = if want_high {
        a.checked_add(hu)?
            .round_dp_with_strategy(p, RoundingStrategy::MidpointAwayFromZero)
    } else {
        let b = a.checked_sub(hu)?;
        if b.is_sign_negative() {
            b.round_dp_with_strategy(p, RoundingStrategy::ToNegativeInfinity)
        } else {
            b.round_dp_with_strategy(p, RoundingStrategy::ToZero)
        }
    };
    r.rescale(p);
    Some(if neg { -r } else { r })
}

fn date_precision(digits: i64, allow_time: bool) -> Option<Precision> {
    Some(match digits {
        4 => Precision::Year,
        6 => Precision::Month,
        8 => Precision::Day,
        10 if allow_time => Precision::Hour,
        12 if allow_time => Precision::Minute,
        14 if allow_time => Precision::Second,
        17 if allow_time => Precision::Millisecond,
        _ => return None,
    })
}

fn dt_boundary(d: &DateTimeValue, high: bool, target: Precision, is_date: bool) -> DateTimeValue {
    let mut v = *d;
    // A bare hour (`T08`) is read as `08:00`.
    if v.precision == Precision::Hour {
        v.precision = Precision::Minute;
        v.minute = 0;
    }
    let mut out = v.boundary(high, target, is_date);
    if target >= Precision::Hour && d.tz_minutes.is_none() {
        out.tz_minutes = Some(if high { -12 * 60 } else { 14 * 60 });
    }
    if target <= Precision::Day {
        out.tz_minutes = None;
    }
    out
}

pub(crate) fn boundary<'a>(p: &Prim<'_>, high: bool, precision: Option<i64>) -> Option<Item<'a>> {
    match p {
        Prim::Int(i) => dec_boundary(Decimal::from(*i), high, precision).map(Item::Decimal),
        Prim::Dec(d) => dec_boundary(*d, high, precision).map(Item::Decimal),
        Prim::Qty(q) => dec_boundary(q.value, high, precision).map(|value| {
            Item::Quantity(Quantity {
                value,
                unit: q.unit.clone(),
            })
        }),
        Prim::Date(d) => {
            let t = date_precision(precision.unwrap_or(8), false)?;
            Some(Item::Date(dt_boundary(d, high, t, true)))
        }
        Prim::DateTime(d) => {
            let t = date_precision(precision.unwrap_or(17), true)?;
            let r = dt_boundary(d, high, t, false);
            Some(if t <= Precision::Day {
                Item::Date(r)
            } else {
                Item::DateTime(r)
            })
        }
        Prim::Time(t) => {
            let target = match precision.unwrap_or(9) {
                2 => Precision::Hour,
                4 => Precision::Minute,
                6 => Precision::Second,
                9 => Precision::Millisecond,
                _ => return None,
            };
            let mut v = *t;
            if v.precision < Precision::Second {
                v.second = if high { 59 } else { 0 };
            }
            if v.precision < Precision::Millisecond {
                v.millis = if high { 999 } else { 0 };
            }
            v.precision = target;
            Some(Item::Time(TimeValue { ..v }))
        }
        _ => None,
    }
}

pub(crate) fn precision<'a>(item: &Item<'_>) -> Option<Item<'a>> {
    let digits = |p: Precision| match p {
        Precision::Year => 4,
        Precision::Month => 6,
        Precision::Day => 8,
        Precision::Hour => 10,
        Precision::Minute => 12,
        Precision::Second => 14,
        Precision::Millisecond => 17,
    };
    Some(Item::Integer(match item.prim() {
        Prim::Dec(d) => d.scale() as i64,
        Prim::Int(_) => 0,
        Prim::Date(d) | Prim::DateTime(d) => digits(d.precision),
        Prim::Time(t) => match t.precision {
            Precision::Hour => 2,
            Precision::Minute => 4,
            Precision::Second => 6,
            _ => 9,
        },
        _ => return None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn b(v: &str, high: bool, p: Option<i64>) -> String {
        dec_boundary(Decimal::from_str(v).unwrap(), high, p)
            .map(|d| d.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn decimal_boundaries() {
        assert_eq!(b("1.587", false, None), "1.58650000");
        assert_eq!(b("1.587", false, Some(2)), "1.58");
        assert_eq!(b("1.587", false, Some(0)), "1");
        assert_eq!(b("-1.587", false, Some(2)), "-1.59");
        assert_eq!(b("-1.587", false, Some(0)), "-2");
        assert_eq!(b("1.587", true, Some(2)), "1.59");
        assert_eq!(b("-1.587", true, Some(2)), "-1.58");
        assert_eq!(b("1", true, Some(0)), "2");
        assert_eq!(b("1", false, Some(0)), "0");
        assert_eq!(b("120", false, Some(2)), "119.50");
        assert_eq!(b("12.500", true, Some(4)), "12.5005");
        assert_eq!(b("1.587", false, Some(32)), "");
    }
}
