//! Partial-precision FHIRPath `Date`, `DateTime` and `Time` values.
//!
//! FHIRPath date/time values keep the precision they were written with (`@2015`, `@2015-02`,
//! `@2015-02-04T14`…). Comparing values with different precisions yields an empty result when
//! the common components are equal. Seconds and milliseconds count as one precision for
//! comparison (`@T10:30:00 = @T10:30:00.0` is true).

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use std::cmp::Ordering;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Precision {
    Year = 0,
    Month = 1,
    Day = 2,
    Hour = 3,
    Minute = 4,
    Second = 5,
    Millisecond = 6,
}

impl Precision {
    /// Precision level used for comparisons: seconds and milliseconds are the same level.
    fn cmp_level(self) -> usize {
        match self {
            Precision::Millisecond => 5,
            p => p as usize,
        }
    }
}

/// A FHIRPath `Date` or `DateTime` (which one is decided by the enclosing `Item` variant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DateTimeValue {
    pub year: i32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub millis: u16,
    pub precision: Precision,
    /// Timezone offset in minutes east of UTC, when given.
    pub tz_minutes: Option<i16>,
}

/// A FHIRPath `Time` (no timezone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimeValue {
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub millis: u16,
    /// One of Hour, Minute, Second, Millisecond.
    pub precision: Precision,
}

fn digits(s: &str, n: usize) -> Option<u32> {
    if s.len() < n || !s.as_bytes()[..n].iter().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s[..n].parse().ok()
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            if (year.rem_euclid(4) == 0 && year.rem_euclid(100) != 0) || year.rem_euclid(400) == 0 {
                29
            } else {
                28
            }
        }
    }
}

/// Parses `hh[:mm[:ss[.fff]]]`; returns the time and the unparsed rest.
fn parse_time_part(s: &str) -> Option<(TimeValue, &str)> {
    let hour = digits(s, 2)? as u8;
    if hour > 23 {
        return None;
    }
    let mut t = TimeValue {
        hour,
        minute: 0,
        second: 0,
        millis: 0,
        precision: Precision::Hour,
    };
    let mut rest = &s[2..];
    if let Some(r) = rest.strip_prefix(':') {
        let minute = digits(r, 2)? as u8;
        if minute > 59 {
            return None;
        }
        t.minute = minute;
        t.precision = Precision::Minute;
        rest = &r[2..];
        if let Some(r) = rest.strip_prefix(':') {
            let second = digits(r, 2)? as u8;
            if second > 59 {
                return None;
            }
            t.second = second;
            t.precision = Precision::Second;
            rest = &r[2..];
            if let Some(r) = rest.strip_prefix('.') {
                let n = r.bytes().take_while(|b| b.is_ascii_digit()).count();
                if n == 0 {
                    return None;
                }
                let frac = &r[..n];
                let mut ms = 0u32;
                for (i, c) in frac.bytes().take(3).enumerate() {
                    ms += (c - b'0') as u32 * [100, 10, 1][i];
                }
                t.millis = ms as u16;
                t.precision = Precision::Millisecond;
                rest = &r[n..];
            }
        }
    }
    Some((t, rest))
}

fn parse_tz(s: &str) -> Option<(Option<i16>, &str)> {
    if let Some(r) = s.strip_prefix('Z') {
        return Some((Some(0), r));
    }
    let sign = match s.as_bytes().first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Some((None, s)),
    };
    let r = &s[1..];
    let h = digits(r, 2)?;
    let r = r[2..].strip_prefix(':')?;
    let m = digits(r, 2)?;
    if h > 14 || m > 59 {
        return None;
    }
    Some((Some(sign * (h * 60 + m) as i16), &r[2..]))
}

impl DateTimeValue {
    fn date_only(year: i32, month: u8, day: u8, precision: Precision) -> Self {
        DateTimeValue {
            year,
            month,
            day,
            hour: 0,
            minute: 0,
            second: 0,
            millis: 0,
            precision,
            tz_minutes: None,
        }
    }

    /// Parses the date part `YYYY[-MM[-DD]]`, returning the rest.
    fn parse_date_part(s: &str) -> Option<(Self, &str)> {
        let year = digits(s, 4)? as i32;
        let mut v = Self::date_only(year, 1, 1, Precision::Year);
        let mut rest = &s[4..];
        if let Some(r) = rest.strip_prefix('-') {
            let month = digits(r, 2)? as u8;
            if !(1..=12).contains(&month) {
                return None;
            }
            v.month = month;
            v.precision = Precision::Month;
            rest = &r[2..];
            if let Some(r) = rest.strip_prefix('-') {
                let day = digits(r, 2)? as u8;
                if day == 0 || day > days_in_month(year, month) {
                    return None;
                }
                v.day = day;
                v.precision = Precision::Day;
                rest = &r[2..];
            }
        }
        Some((v, rest))
    }

    /// Parses a FHIRPath/FHIR date: `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
    pub fn parse_date(s: &str) -> Option<Self> {
        let (v, rest) = Self::parse_date_part(s)?;
        rest.is_empty().then_some(v)
    }

    /// Parses a FHIRPath/FHIR dateTime: a date optionally followed by `T` and a (partial) time and
    /// an optional timezone (`Z` or `+hh:mm`). `2015T` (a literal's trailing `T`) is accepted.
    pub fn parse_datetime(s: &str) -> Option<Self> {
        let (mut v, rest) = Self::parse_date_part(s)?;
        if rest.is_empty() {
            return Some(v);
        }
        let rest = rest.strip_prefix('T')?;
        if rest.is_empty() {
            return Some(v);
        }
        if v.precision != Precision::Day {
            return None;
        }
        let (t, rest) = parse_time_part(rest)?;
        v.hour = t.hour;
        v.minute = t.minute;
        v.second = t.second;
        v.millis = t.millis;
        v.precision = t.precision;
        let (tz, rest) = parse_tz(rest)?;
        v.tz_minutes = tz;
        rest.is_empty().then_some(v)
    }

    fn to_naive(self) -> Option<NaiveDateTime> {
        NaiveDate::from_ymd_opt(self.year, self.month as u32, self.day as u32)?.and_hms_milli_opt(
            self.hour as u32,
            self.minute as u32,
            self.second as u32,
            self.millis as u32,
        )
    }

    fn with_naive(self, n: NaiveDateTime) -> Self {
        DateTimeValue {
            year: n.year(),
            month: n.month() as u8,
            day: n.day() as u8,
            hour: n.hour() as u8,
            minute: n.minute() as u8,
            second: n.second() as u8,
            millis: (n.nanosecond() / 1_000_000).min(999) as u16,
            ..self
        }
    }

    /// Shifts a value with a timezone to UTC (precision ≥ hour); others are returned unchanged.
    fn normalized(self) -> Self {
        match (self.tz_minutes, self.precision >= Precision::Hour) {
            (Some(tz), true) if tz != 0 => match self.to_naive() {
                Some(n) => {
                    let mut v = self.with_naive(n - Duration::minutes(tz as i64));
                    v.tz_minutes = Some(0);
                    v
                }
                None => self,
            },
            _ => self,
        }
    }

    fn components(&self) -> [i64; 6] {
        [
            self.year as i64,
            self.month as i64,
            self.day as i64,
            self.hour as i64,
            self.minute as i64,
            self.second as i64 * 1000 + self.millis as i64,
        ]
    }

    /// FHIRPath ordering: `None` when the precisions differ and the common part is equal.
    pub fn compare(&self, other: &Self) -> Option<Ordering> {
        let both_timed = self.precision >= Precision::Hour && other.precision >= Precision::Hour;
        if both_timed && self.tz_minutes.is_some() != other.tz_minutes.is_some() {
            // One side has no timezone: only answer when the instants are more than a day apart
            // (whatever the missing offset is).
            let (x, y) = (self.to_naive()?, other.to_naive()?);
            let diff = (x - y).num_minutes() + other.tz_minutes.unwrap_or(0) as i64
                - self.tz_minutes.unwrap_or(0) as i64;
            return if diff.abs() > 26 * 60 {
                Some(diff.cmp(&0))
            } else {
                None
            };
        }
        // Offsets only matter when both sides have a time; a Date compares with the date part
        // of a DateTime as written.
        let (a, b) = if both_timed && (self.tz_minutes.is_some() || other.tz_minutes.is_some()) {
            (self.normalized(), other.normalized())
        } else {
            (*self, *other)
        };
        compare_components(
            &a.components(),
            a.precision.cmp_level(),
            &b.components(),
            b.precision.cmp_level(),
        )
    }

    /// Adds a calendar amount. `unit` is a normalised calendar unit (year, month, week, day,
    /// hour, minute, second, millisecond). Returns `None` on overflow / invalid dates.
    pub fn add(&self, amount: f64, unit: &str) -> Option<Self> {
        // Calendar arithmetic uses whole units: `+ 7.7 days` adds 7 days, `+ 0.1 's'` nothing.
        let amount = amount.trunc();
        let whole = amount as i64;
        let mut v = *self;
        match unit {
            "year" => {
                let y = (v.year as i64).checked_add(whole)?;
                v.year = i32::try_from(y).ok()?;
                if !(1..=9999).contains(&v.year) {
                    return None;
                }
                v.day = v.day.min(days_in_month(v.year, v.month));
                Some(v)
            }
            "month" => {
                let total = (v.year as i64 * 12 + (v.month as i64 - 1)).checked_add(whole)?;
                v.year = i32::try_from(total.div_euclid(12)).ok()?;
                v.month = (total.rem_euclid(12) + 1) as u8;
                if !(1..=9999).contains(&v.year) {
                    return None;
                }
                v.day = v.day.min(days_in_month(v.year, v.month));
                Some(v)
            }
            _ => {
                let ms_per = match unit {
                    "week" => 7.0 * 86_400_000.0,
                    "day" => 86_400_000.0,
                    "hour" => 3_600_000.0,
                    "minute" => 60_000.0,
                    "second" => 1000.0,
                    "millisecond" => 1.0,
                    _ => return None,
                };
                // Amounts below the value's precision are truncated to whole units of it.
                let ms = match v.precision {
                    Precision::Year | Precision::Month => {
                        // Convert to whole years/months is undefined here; use days.
                        let days = (amount * ms_per / 86_400_000.0).trunc();
                        if unit == "week" || unit == "day" {
                            days * 86_400_000.0
                        } else {
                            0.0
                        }
                    }
                    Precision::Day => (amount * ms_per / 86_400_000.0).trunc() * 86_400_000.0,
                    Precision::Hour => (amount * ms_per / 3_600_000.0).trunc() * 3_600_000.0,
                    Precision::Minute => (amount * ms_per / 60_000.0).trunc() * 60_000.0,
                    Precision::Second => (amount * ms_per / 1000.0).trunc() * 1000.0,
                    Precision::Millisecond => (amount * ms_per).round(),
                };
                if !ms.is_finite() || ms.abs() > 1e15 {
                    return None;
                }
                let n = v
                    .to_naive()?
                    .checked_add_signed(Duration::milliseconds(ms as i64))?;
                let out = v.with_naive(n);
                if !(1..=9999).contains(&out.year) {
                    return None;
                }
                Some(out)
            }
        }
    }

    /// Formats as a Date (only date components).
    pub fn fmt_date(&self) -> String {
        match self.precision {
            Precision::Year => format!("{:04}", self.year),
            Precision::Month => format!("{:04}-{:02}", self.year, self.month),
            _ => format!("{:04}-{:02}-{:02}", self.year, self.month, self.day),
        }
    }

    /// Formats as a DateTime.
    pub fn fmt_datetime(&self) -> String {
        if self.precision <= Precision::Day {
            return self.fmt_date();
        }
        let mut s = format!(
            "{}T{}",
            self.fmt_date(),
            TimeValue {
                hour: self.hour,
                minute: self.minute,
                second: self.second,
                millis: self.millis,
                precision: self.precision
            }
        );
        if let Some(tz) = self.tz_minutes {
            if tz == 0 {
                s.push('Z');
            } else {
                let sign = if tz < 0 { '-' } else { '+' };
                let a = tz.unsigned_abs();
                s.push_str(&format!("{}{:02}:{:02}", sign, a / 60, a % 60));
            }
        }
        s
    }

    /// Current instant (UTC offset of the machine) at millisecond precision.
    pub fn now() -> Self {
        let now = chrono::Local::now();
        let offset = now.offset().local_minus_utc() / 60;
        let mut v = Self::date_only(1, 1, 1, Precision::Millisecond).with_naive(now.naive_local());
        v.precision = Precision::Millisecond;
        v.tz_minutes = Some(offset as i16);
        v
    }

    pub fn today() -> Self {
        let mut v = Self::now();
        v.precision = Precision::Day;
        v.hour = 0;
        v.minute = 0;
        v.second = 0;
        v.millis = 0;
        v.tz_minutes = None;
        v
    }

    /// Latest possible value with the same known components (for `highBoundary`).
    pub fn boundary(&self, high: bool, precision: Precision, is_date: bool) -> Self {
        let mut v = *self;
        if v.precision < Precision::Month {
            v.month = if high { 12 } else { 1 };
        }
        if v.precision < Precision::Day {
            v.day = if high {
                days_in_month(v.year, v.month)
            } else {
                1
            };
        }
        if v.precision < Precision::Hour {
            v.hour = if high { 23 } else { 0 };
        }
        if v.precision < Precision::Minute {
            v.minute = if high { 59 } else { 0 };
        }
        if v.precision < Precision::Second {
            v.second = if high { 59 } else { 0 };
        }
        if v.precision < Precision::Millisecond {
            v.millis = if high { 999 } else { 0 };
        }
        if !is_date && v.tz_minutes.is_none() && self.precision <= Precision::Day {
            // Unknown timezone: the widest range is +14:00 (low) … -12:00 (high).
            v.tz_minutes = Some(if high { -12 * 60 } else { 14 * 60 });
        }
        v.precision = precision;
        v
    }
}

fn compare_components(a: &[i64], pa: usize, b: &[i64], pb: usize) -> Option<Ordering> {
    let common = pa.min(pb);
    for i in 0..=common.min(a.len() - 1) {
        match a[i].cmp(&b[i]) {
            Ordering::Equal => {}
            o => return Some(o),
        }
    }
    if pa == pb {
        Some(Ordering::Equal)
    } else {
        None
    }
}

impl TimeValue {
    /// Parses `hh[:mm[:ss[.fff]]]` (no timezone).
    pub fn parse(s: &str) -> Option<Self> {
        let (t, rest) = parse_time_part(s)?;
        rest.is_empty().then_some(t)
    }

    pub fn compare(&self, other: &Self) -> Option<Ordering> {
        let a = [
            self.hour as i64,
            self.minute as i64,
            self.second as i64 * 1000 + self.millis as i64,
        ];
        let b = [
            other.hour as i64,
            other.minute as i64,
            other.second as i64 * 1000 + other.millis as i64,
        ];
        compare_components(
            &a,
            self.precision.cmp_level() - 3,
            &b,
            other.precision.cmp_level() - 3,
        )
    }

    pub fn add(&self, amount: f64, unit: &str) -> Option<Self> {
        let ms_per = match unit {
            "hour" => 3_600_000.0,
            "minute" => 60_000.0,
            "second" => 1000.0,
            "millisecond" => 1.0,
            _ => return None,
        };
        let ms = (amount.trunc() * ms_per).round();
        if !ms.is_finite() || ms.abs() > 1e15 {
            return None;
        }
        let t = NaiveTime::from_hms_milli_opt(
            self.hour as u32,
            self.minute as u32,
            self.second as u32,
            self.millis as u32,
        )?;
        let day_ms = 86_400_000i64;
        let ms = (ms as i64).rem_euclid(day_ms);
        let (n, _) = t.overflowing_add_signed(Duration::milliseconds(ms));
        Some(TimeValue {
            hour: n.hour() as u8,
            minute: n.minute() as u8,
            second: n.second() as u8,
            millis: (n.nanosecond() / 1_000_000).min(999) as u16,
            precision: self.precision,
        })
    }

    pub fn now() -> Self {
        let n = DateTimeValue::now();
        TimeValue {
            hour: n.hour,
            minute: n.minute,
            second: n.second,
            millis: n.millis,
            precision: Precision::Millisecond,
        }
    }
}

impl fmt::Display for TimeValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}", self.hour)?;
        if self.precision >= Precision::Minute {
            write!(f, ":{:02}", self.minute)?;
        }
        if self.precision >= Precision::Second {
            write!(f, ":{:02}", self.second)?;
        }
        if self.precision >= Precision::Millisecond {
            write!(f, ".{:03}", self.millis)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partial_dates() {
        assert_eq!(
            DateTimeValue::parse_date("2015").unwrap().precision,
            Precision::Year
        );
        assert_eq!(
            DateTimeValue::parse_date("2015-02").unwrap().precision,
            Precision::Month
        );
        assert!(DateTimeValue::parse_date("2015-02-30").is_none());
        assert!(DateTimeValue::parse_date("2015-13").is_none());
        let dt = DateTimeValue::parse_datetime("2015-02-04T14:34:28.123+10:00").unwrap();
        assert_eq!(dt.precision, Precision::Millisecond);
        assert_eq!(dt.tz_minutes, Some(600));
        assert_eq!(dt.fmt_datetime(), "2015-02-04T14:34:28.123+10:00");
        assert!(DateTimeValue::parse_datetime("2015T").is_some());
        assert!(DateTimeValue::parse_datetime("2015-02-04T25").is_none());
    }

    #[test]
    fn compares_with_precision_and_timezones() {
        let a = DateTimeValue::parse_datetime("2017-11-05T01:30:00.0-04:00").unwrap();
        let b = DateTimeValue::parse_datetime("2017-11-05T00:30:00.0-05:00").unwrap();
        assert_eq!(a.compare(&b), Some(Ordering::Equal));
        let c = DateTimeValue::parse_datetime("2018-03-01T10:30").unwrap();
        let d = DateTimeValue::parse_datetime("2018-03-01T10:30:00").unwrap();
        assert_eq!(c.compare(&d), None);
        let e = DateTimeValue::parse_datetime("2018-03-01T10:30:00.0").unwrap();
        assert_eq!(d.compare(&e), Some(Ordering::Equal));
        let day = DateTimeValue::parse_date("2012-04-15").unwrap();
        let late = DateTimeValue::parse_datetime("2012-04-15T01:00:00+10:00").unwrap();
        assert_eq!(day.compare(&late), None);
        let naive = DateTimeValue::parse_datetime("2012-04-15T10:00:00").unwrap();
        let utc = DateTimeValue::parse_datetime("2012-04-15T15:00:00Z").unwrap();
        assert_eq!(utc.compare(&naive), None);
        let far = DateTimeValue::parse_datetime("2012-04-18T10:00:00").unwrap();
        assert_eq!(utc.compare(&far), Some(Ordering::Less));
        let t1 = TimeValue::parse("10:30").unwrap();
        let t2 = TimeValue::parse("11").unwrap();
        assert_eq!(t1.compare(&t2), Some(Ordering::Less));
    }

    #[test]
    fn calendar_arithmetic() {
        let d = DateTimeValue::parse_date("2012-01-31").unwrap();
        assert_eq!(d.add(1.0, "month").unwrap().fmt_date(), "2012-02-29");
        assert_eq!(d.add(-1.0, "year").unwrap().fmt_date(), "2011-01-31");
        let t = TimeValue::parse("23:00").unwrap();
        assert_eq!(t.add(2.0, "hour").unwrap().to_string(), "01:00");
    }
}
