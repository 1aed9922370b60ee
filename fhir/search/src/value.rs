//! Value parsing and normalisation shared by indexing, query parsing and matching:
//! dates with precision → µs ranges, decimal precision ranges, string folding, references,
//! and a small UCUM canonicalisation table.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// Smallest/largest representable instants (µs since epoch) used for open-ended ranges.
pub const MIN_TIME: i64 = i64::MIN / 2;
pub const MAX_TIME: i64 = i64::MAX / 2;

/// Lowercase + accent-folded form used for string search (`Müller` → `muller`).
pub fn normalize_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.nfd() {
        if is_combining_mark(c) {
            continue;
        }
        for l in c.to_lowercase() {
            out.push(l);
        }
    }
    // collapse whitespace
    let mut res = String::with_capacity(out.len());
    let mut prev_space = false;
    for c in out.trim().chars() {
        if c.is_whitespace() {
            if !prev_space {
                res.push(' ');
            }
            prev_space = true;
        } else {
            res.push(c);
            prev_space = false;
        }
    }
    res
}

/// A parsed reference string.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedReference {
    pub res_type: Option<String>,
    pub id: Option<String>,
    pub version: Option<String>,
    /// The whole reference when absolute (`http…`, `urn:`), else `None`.
    pub url: Option<String>,
}

fn is_resource_type_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric())
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// Parses `Type/id`, `Type/id/_history/v`, absolute `http://base/Type/id[/_history/v]`, or
/// `urn:uuid:…` / other absolute URIs (url only). Returns `None` for an empty string.
pub fn parse_reference(r: &str) -> Option<ParsedReference> {
    let r = r.trim();
    if r.is_empty() || r.starts_with('#') {
        return None;
    }
    let absolute = r.contains("://") || r.starts_with("urn:");
    let mut out = ParsedReference {
        url: absolute.then(|| r.to_string()),
        ..Default::default()
    };
    if r.starts_with("urn:") {
        return Some(out);
    }
    let path = r.split(['?', '#']).next().unwrap_or(r);
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let n = segs.len();
    let (t, i, v) = if n >= 4 && segs[n - 2] == "_history" {
        (segs[n - 4], segs[n - 3], Some(segs[n - 1]))
    } else if n >= 2 {
        (segs[n - 2], segs[n - 1], None)
    } else {
        return Some(out);
    };
    if is_resource_type_name(t) && is_id(i) {
        out.res_type = Some(t.to_string());
        out.id = Some(i.to_string());
        out.version = v.map(str::to_string);
    }
    Some(out)
}

/// A date search/index value as an inclusive µs range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DateRange {
    pub low: i64,
    pub high: i64,
}

fn micros(dt: DateTime<Utc>) -> i64 {
    dt.timestamp_micros()
}

fn date_to_utc(d: NaiveDate) -> Option<DateTime<Utc>> {
    Some(Utc.from_utc_datetime(&d.and_time(NaiveTime::MIN)))
}

/// Parses a FHIR date/dateTime/instant (any precision) into the range it covers.
/// Times without a zone are taken as UTC.
pub fn parse_date_range(s: &str) -> Option<DateRange> {
    let s = s.trim();
    let bytes = s.as_bytes();
    if s.len() < 4 || !bytes[..4].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let year: i32 = s[..4].parse().ok()?;
    if s.len() == 4 {
        let lo = date_to_utc(NaiveDate::from_ymd_opt(year, 1, 1)?)?;
        let hi = date_to_utc(NaiveDate::from_ymd_opt(year + 1, 1, 1)?)?;
        return Some(DateRange {
            low: micros(lo),
            high: micros(hi) - 1,
        });
    }
    if s.len() == 7 && bytes[4] == b'-' {
        let month: u32 = s[5..7].parse().ok()?;
        let lo = NaiveDate::from_ymd_opt(year, month, 1)?;
        let hi = if month == 12 {
            NaiveDate::from_ymd_opt(year + 1, 1, 1)?
        } else {
            NaiveDate::from_ymd_opt(year, month + 1, 1)?
        };
        return Some(DateRange {
            low: micros(date_to_utc(lo)?),
            high: micros(date_to_utc(hi)?) - 1,
        });
    }
    if s.len() == 10 {
        let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
        let lo = micros(date_to_utc(d)?);
        return Some(DateRange {
            low: lo,
            high: lo + 86_400_000_000 - 1,
        });
    }
    // dateTime with time part
    let (date_part, time_part) = s.split_once('T')?;
    let d = NaiveDate::parse_from_str(date_part, "%Y-%m-%d").ok()?;
    let (time, offset) = split_zone(time_part)?;
    let (t, precision_us) = parse_time(time)?;
    let naive = NaiveDateTime::new(d, t);
    let lo = match offset {
        Some(off) => micros(
            off.from_local_datetime(&naive)
                .single()?
                .with_timezone(&Utc),
        ),
        None => micros(Utc.from_utc_datetime(&naive)),
    };
    Some(DateRange {
        low: lo,
        high: lo + precision_us - 1,
    })
}

fn split_zone(t: &str) -> Option<(&str, Option<FixedOffset>)> {
    if let Some(x) = t.strip_suffix('Z') {
        return Some((x, FixedOffset::east_opt(0)));
    }
    if let Some(pos) = t.rfind(['+', '-']) {
        let (time, zone) = t.split_at(pos);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let z = &zone[1..];
        let (h, m) = z.split_once(':')?;
        let secs = sign * (h.parse::<i32>().ok()? * 3600 + m.parse::<i32>().ok()? * 60);
        return Some((time, Some(FixedOffset::east_opt(secs)?)));
    }
    Some((t, None))
}

/// Returns the time and the width of its precision in µs.
fn parse_time(t: &str) -> Option<(NaiveTime, i64)> {
    let parts: Vec<&str> = t.split(':').collect();
    let h: u32 = parts.first()?.parse().ok()?;
    let m: u32 = parts.get(1)?.parse().ok()?;
    match parts.get(2) {
        None => Some((NaiveTime::from_hms_opt(h, m, 0)?, 60_000_000)),
        Some(sec) => {
            let (whole, frac) = match sec.split_once('.') {
                Some((w, f)) => (w, Some(f)),
                None => (*sec, None),
            };
            let s: u32 = whole.parse().ok()?;
            match frac {
                None => Some((NaiveTime::from_hms_opt(h, m, s)?, 1_000_000)),
                Some(f) => {
                    if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    let digits = f.len().min(6);
                    let val: u32 = f[..digits].parse().ok()?;
                    let us = val * 10u32.pow((6 - digits) as u32);
                    let width = 10i64.pow((6 - digits) as u32);
                    Some((NaiveTime::from_hms_micro_opt(h, m, s, us)?, width))
                }
            }
        }
    }
}

/// Renders µs since epoch as an RFC 3339 instant (for `_explain` and debugging).
pub fn format_micros(us: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(us)
        .map(|d| d.to_rfc3339())
        .unwrap_or_else(|| us.to_string())
}

/// A decimal search value with its implicit precision range (`100` → [99.5, 100.5)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decimal {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

pub fn parse_decimal(s: &str) -> Option<Decimal> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let ok = s.bytes().enumerate().all(|(i, b)| {
        b.is_ascii_digit()
            || b == b'.'
            || b == b'e'
            || b == b'E'
            || ((b == b'-' || b == b'+') && (i == 0 || matches!(s.as_bytes()[i - 1], b'e' | b'E')))
    });
    if !ok {
        return None;
    }
    let value: f64 = s.parse().ok()?;
    if !value.is_finite() {
        return None;
    }
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(p) => (&s[..p], s[p + 1..].parse::<i32>().ok()?),
        None => (s, 0),
    };
    let decimals = mantissa
        .split_once('.')
        .map(|(_, f)| f.len() as i32)
        .unwrap_or(0);
    let (low, high) = precision_bounds(mantissa, exp, decimals).unwrap_or_else(|| {
        let half = 0.5 * 10f64.powi(exp - decimals);
        (value - half, value + half)
    });
    Some(Decimal { value, low, high })
}

/// The bounds of the precision range computed in decimal and rounded once: `5.4` →
/// (`5.35`, `5.45`) as the nearest doubles of those decimals, so that a stored `5.35` is inside
/// (`5.4 - 0.05` in binary floating point is 5.3500000000000005 and would leave it out).
fn precision_bounds(mantissa: &str, exp: i32, decimals: i32) -> Option<(f64, f64)> {
    let digits: String = mantissa
        .chars()
        .filter(|c| *c != '.' && *c != '+')
        .collect();
    if digits.trim_start_matches('-').len() > 30 {
        return None;
    }
    let n: i128 = digits.parse().ok()?;
    let scale = exp - decimals - 1;
    let bound = |x: i128| -> Option<f64> { format!("{x}e{scale}").parse().ok() };
    Some((bound(n * 10 - 5)?, bound(n * 10 + 5)?))
}

/// UCUM canonicalisation: (canonical code, factor). A small table of common clinical units;
/// a unit not in the table is kept as-is (factor 1).
pub fn ucum_canonical(code: &str) -> Option<(&'static str, f64)> {
    Some(match code {
        "g" => ("g", 1.0),
        "kg" => ("g", 1000.0),
        "mg" => ("g", 1e-3),
        "ug" => ("g", 1e-6),
        "ng" => ("g", 1e-9),
        "[lb_av]" => ("g", 453.592_37),
        "[oz_av]" => ("g", 28.349_523_125),
        "m" => ("m", 1.0),
        "cm" => ("m", 0.01),
        "mm" => ("m", 0.001),
        "km" => ("m", 1000.0),
        "[in_i]" => ("m", 0.0254),
        "[ft_i]" => ("m", 0.3048),
        "L" | "l" => ("m3", 1e-3),
        "dL" => ("m3", 1e-4),
        "mL" => ("m3", 1e-6),
        "uL" => ("m3", 1e-9),
        "s" => ("s", 1.0),
        "ms" => ("s", 1e-3),
        "min" => ("s", 60.0),
        "h" => ("s", 3600.0),
        "d" => ("s", 86_400.0),
        "wk" => ("s", 604_800.0),
        "mo" => ("s", 2_629_800.0),
        "a" => ("s", 31_557_600.0),
        "mm[Hg]" => ("g.m-1.s-2", 133_322.387_415),
        "Pa" => ("g.m-1.s-2", 1000.0),
        "kPa" => ("g.m-1.s-2", 1e6),
        "g/L" => ("g/m3", 1000.0),
        "g/dL" => ("g/m3", 10_000.0),
        "mg/dL" => ("g/m3", 10.0),
        "mg/L" => ("g/m3", 1.0),
        "kg/m2" => ("g/m2", 1000.0),
        "%" => ("1", 0.01),
        "1" => ("1", 1.0),
        _ => return None,
    })
}

/// `(canonical value, canonical code)` for a quantity in the UCUM system, if convertible.
pub fn canonical_quantity(
    value: f64,
    system: Option<&str>,
    code: Option<&str>,
) -> Option<(f64, String)> {
    if system.is_some_and(|s| s != "http://unitsofmeasure.org") {
        return None;
    }
    let (c, f) = ucum_canonical(code?)?;
    Some((value * f, c.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_precision_ranges() {
        let y = parse_date_range("2020").unwrap();
        assert_eq!(format_micros(y.low), "2020-01-01T00:00:00+00:00");
        assert_eq!(format_micros(y.high + 1), "2021-01-01T00:00:00+00:00");
        let m = parse_date_range("2020-02").unwrap();
        assert_eq!(m.high - m.low + 1, 29 * 86_400_000_000);
        let d = parse_date_range("2020-02-29").unwrap();
        assert_eq!(d.high - d.low + 1, 86_400_000_000);
        let t = parse_date_range("2020-02-29T10:00:00+02:00").unwrap();
        assert_eq!(format_micros(t.low), "2020-02-29T08:00:00+00:00");
        assert_eq!(t.high - t.low + 1, 1_000_000);
        let f = parse_date_range("2020-02-29T10:00:00.123Z").unwrap();
        assert_eq!(f.high - f.low + 1, 1000);
        assert!(parse_date_range("19x0").is_none());
        assert!(parse_date_range("2020-13").is_none());
        assert!(parse_date_range("2020-02-30").is_none());
        assert!(parse_date_range("2020-02-01T25:00").is_none());
    }

    #[test]
    fn decimals_and_strings() {
        let d = parse_decimal("100").unwrap();
        assert_eq!((d.low, d.high), (99.5, 100.5));
        let d = parse_decimal("1.50").unwrap();
        assert!((d.low - 1.495).abs() < 1e-12 && (d.high - 1.505).abs() < 1e-12);
        let d = parse_decimal("1e2").unwrap();
        assert_eq!((d.low, d.high), (50.0, 150.0));
        // bounds are the exact decimals, so values written with them are inside the range
        let d = parse_decimal("5.4").unwrap();
        assert_eq!((d.low, d.high), (5.35, 5.45));
        let d = parse_decimal("-5.4").unwrap();
        assert_eq!((d.low, d.high), (-5.45, -5.35));
        let d = parse_decimal("0.8").unwrap();
        assert_eq!((d.low, d.high), (0.75, 0.85));
        let d = parse_decimal("2.5e-3").unwrap();
        assert_eq!((d.low, d.high), (0.00245, 0.00255));
        assert!(parse_decimal("abc").is_none());
        assert!(parse_decimal("1-2").is_none());
        assert_eq!(normalize_string("  Müller   José "), "muller jose");
    }

    #[test]
    fn references() {
        let r = parse_reference("Patient/123").unwrap();
        assert_eq!(
            (r.res_type.as_deref(), r.id.as_deref(), r.url),
            (Some("Patient"), Some("123"), None)
        );
        let r = parse_reference("http://x.org/fhir/Observation/a-1/_history/3").unwrap();
        assert_eq!(r.res_type.as_deref(), Some("Observation"));
        assert_eq!(r.version.as_deref(), Some("3"));
        assert!(r.url.is_some());
        let r = parse_reference("urn:uuid:abc").unwrap();
        assert!(r.res_type.is_none() && r.url.is_some());
        assert!(parse_reference("").is_none());
    }

    #[test]
    fn ucum() {
        let (v, c) =
            canonical_quantity(5.0, Some("http://unitsofmeasure.org"), Some("mg")).unwrap();
        assert_eq!(c, "g");
        assert!((v - 0.005).abs() < 1e-12);
        assert!(canonical_quantity(5.0, Some("http://other"), Some("mg")).is_none());
    }
}

/// Kilometres per degree of latitude (mean Earth radius 6371.0088 km).
pub const KM_PER_DEGREE: f64 = 6371.0088 * std::f64::consts::PI / 180.0;

/// The `near` test: an equirectangular distance (degrees scaled to km, longitude by the cosine of
/// the searched latitude), which SQL evaluates with arithmetic only, plus the bounding box that
/// lets the index narrow first. Within 0.5 % of the great-circle distance for distances up to a
/// few hundred km away from the poles; longitudes do not wrap at ±180°.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NearBox {
    pub latitude: f64,
    pub longitude: f64,
    pub km: f64,
    pub km_per_degree_longitude: f64,
    pub lat_min: f64,
    pub lat_max: f64,
    pub lon_min: f64,
    pub lon_max: f64,
}

impl NearBox {
    pub fn new(latitude: f64, longitude: f64, km: f64) -> NearBox {
        let kx = (KM_PER_DEGREE * latitude.to_radians().cos()).max(1e-6);
        let dlat = km / KM_PER_DEGREE;
        let dlon = (km / kx).min(360.0);
        NearBox {
            latitude,
            longitude,
            km,
            km_per_degree_longitude: kx,
            lat_min: latitude - dlat,
            lat_max: latitude + dlat,
            lon_min: longitude - dlon,
            lon_max: longitude + dlon,
        }
    }

    /// Whether a position is within the distance (the same arithmetic as the SQL).
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        if lat < self.lat_min || lat > self.lat_max || lon < self.lon_min || lon > self.lon_max {
            return false;
        }
        let dy = (lat - self.latitude) * KM_PER_DEGREE;
        let dx = (lon - self.longitude) * self.km_per_degree_longitude;
        dy * dy + dx * dx <= self.km * self.km
    }
}

#[cfg(test)]
mod near_tests {
    use super::*;

    #[test]
    fn near_distances() {
        // Brandenburg Gate → Alexanderplatz: 2.48 km great-circle
        let b = NearBox::new(52.5163, 13.3777, 3.0);
        assert!(b.contains(52.5219, 13.4132));
        assert!(!NearBox::new(52.5163, 13.3777, 2.4).contains(52.5219, 13.4132));
        // Berlin → Potsdam: 25.4 km great-circle
        assert!(!b.contains(52.3906, 13.0645));
        assert!(NearBox::new(52.5163, 13.3777, 25.6).contains(52.3906, 13.0645));
        assert!(!NearBox::new(52.5163, 13.3777, 25.2).contains(52.3906, 13.0645));
    }
}
