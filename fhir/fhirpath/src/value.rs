//! Items of FHIRPath collections: System values and FHIR nodes borrowed from the input JSON.

use crate::datetime::{DateTimeValue, TimeValue};
use rust_decimal::Decimal;
use serde_json::Value;
use std::borrow::Cow;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;

/// A FHIRPath `System.Quantity`: a decimal value and a unit (a UCUM code such as `mg`, or a
/// FHIRPath calendar keyword such as `day`/`days`).
#[derive(Clone, Debug, PartialEq)]
pub struct Quantity {
    pub value: Decimal,
    pub unit: String,
}

impl Quantity {
    pub fn is_calendar(&self) -> bool {
        crate::units::calendar_unit(&self.unit).is_some()
    }
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_calendar() {
            write!(f, "{} {}", self.value, self.unit)
        } else {
            write!(f, "{} '{}'", self.value, self.unit)
        }
    }
}

/// JSON borrowed from the evaluated resource, or owned (results of `resolve()` through a
/// resolver, `%variables`, `type()`).
#[derive(Clone, Debug)]
pub enum JsonRef<'a> {
    Borrowed(&'a Value),
    Shared(Arc<Value>),
}

impl Deref for JsonRef<'_> {
    type Target = Value;
    fn deref(&self) -> &Value {
        match self {
            JsonRef::Borrowed(v) => v,
            JsonRef::Shared(a) => a,
        }
    }
}

impl<'a> JsonRef<'a> {
    /// A child value of this JSON with the same ownership (borrowed stays borrowed).
    pub(crate) fn child(&self, f: impl FnOnce(&Value) -> Option<&Value>) -> Option<JsonRef<'a>> {
        match self {
            JsonRef::Borrowed(v) => f(v).map(JsonRef::Borrowed),
            JsonRef::Shared(a) => f(a).map(|c| JsonRef::Shared(Arc::new(c.clone()))),
        }
    }

    /// Whether two references point at the same JSON value (identity, not equality).
    pub(crate) fn same(&self, other: &JsonRef<'_>) -> bool {
        std::ptr::eq(self.deref(), other.deref())
    }
}

/// A FHIR element in a collection: its JSON value (absent for a primitive that only has an
/// extension), the `_name` companion object of a primitive (id/extension) and its FHIR type name
/// when known (`HumanName`, `string`, `Patient`, `Patient.contact` for backbone elements).
#[derive(Clone, Debug)]
pub struct Node<'a> {
    pub value: Option<JsonRef<'a>>,
    pub ext: Option<JsonRef<'a>>,
    pub type_name: Option<&'static str>,
}

/// One item of a FHIRPath collection.
#[derive(Clone, Debug)]
pub enum Item<'a> {
    Boolean(bool),
    String(String),
    Integer(i64),
    Decimal(Decimal),
    Date(DateTimeValue),
    DateTime(DateTimeValue),
    Time(TimeValue),
    Quantity(Quantity),
    /// A FHIR element (JSON node + FHIR type name).
    Node(Node<'a>),
}

/// FHIR primitive type → FHIRPath System type name.
pub(crate) fn system_type_of_fhir_primitive(t: &str) -> Option<&'static str> {
    Some(match t {
        "boolean" => "Boolean",
        "string" | "code" | "id" | "uri" | "url" | "canonical" | "oid" | "uuid" | "markdown"
        | "base64Binary" | "xhtml" => "String",
        "integer" | "positiveInt" | "unsignedInt" | "integer64" => "Integer",
        "decimal" => "Decimal",
        "date" => "Date",
        "dateTime" | "instant" => "DateTime",
        "time" => "Time",
        _ => return None,
    })
}

pub(crate) fn is_quantity_type(t: &str) -> bool {
    matches!(
        t,
        "Quantity" | "Age" | "Duration" | "Distance" | "Count" | "SimpleQuantity" | "MoneyQuantity"
    )
}

/// Parses a JSON number (kept as text thanks to `arbitrary_precision`) as Integer or Decimal.
pub(crate) fn number_text(n: &serde_json::Number) -> Cow<'_, str> {
    Cow::Owned(n.to_string())
}

pub(crate) fn parse_decimal(text: &str) -> Option<Decimal> {
    Decimal::from_str(text)
        .ok()
        .or_else(|| Decimal::from_scientific(text).ok())
}

/// A borrowed, System-typed view of an item used by operators and functions.
#[derive(Clone, Debug)]
pub(crate) enum Prim<'x> {
    Bool(bool),
    Str(&'x str),
    Int(i64),
    Dec(Decimal),
    Date(DateTimeValue),
    DateTime(DateTimeValue),
    Time(TimeValue),
    Qty(Cow<'x, Quantity>),
    /// A complex FHIR element.
    Obj(&'x Value),
    /// A primitive FHIR element with no value (only an extension).
    Null,
}

pub(crate) const UCUM: &str = "http://unitsofmeasure.org";

/// FHIR Quantity JSON → System.Quantity (UCUM `code` preferred, else `unit`).
pub(crate) fn quantity_from_json(v: &Value) -> Option<Quantity> {
    let obj = v.as_object()?;
    let value = match obj.get("value")? {
        Value::Number(n) => parse_decimal(&number_text(n))?,
        _ => return None,
    };
    let system = obj.get("system").and_then(Value::as_str);
    let code = obj.get("code").and_then(Value::as_str);
    let unit = obj.get("unit").and_then(Value::as_str);
    let unit = match (system, code, unit) {
        (Some(UCUM), Some(c), _) => c.to_string(),
        (None, Some(c), _) => c.to_string(),
        (_, _, Some(u)) => u.to_string(),
        (_, Some(c), None) => c.to_string(),
        _ => "1".to_string(),
    };
    Some(Quantity { value, unit })
}

impl<'a> Item<'a> {
    pub(crate) fn node(value: JsonRef<'a>, type_name: Option<&'static str>) -> Self {
        Item::Node(Node {
            value: Some(value),
            ext: None,
            type_name,
        })
    }

    /// The System-typed view of this item.
    pub(crate) fn prim(&self) -> Prim<'_> {
        match self {
            Item::Boolean(b) => Prim::Bool(*b),
            Item::String(s) => Prim::Str(s),
            Item::Integer(i) => Prim::Int(*i),
            Item::Decimal(d) => Prim::Dec(*d),
            Item::Date(d) => Prim::Date(*d),
            Item::DateTime(d) => Prim::DateTime(*d),
            Item::Time(t) => Prim::Time(*t),
            Item::Quantity(q) => Prim::Qty(Cow::Borrowed(q)),
            Item::Node(n) => n.prim(),
        }
    }

    /// The FHIR type name of a node (`HumanName`, `dateTime`, …) or `System.X` for System values.
    pub fn type_name(&self) -> Option<&str> {
        match self {
            Item::Boolean(_) => Some("System.Boolean"),
            Item::String(_) => Some("System.String"),
            Item::Integer(_) => Some("System.Integer"),
            Item::Decimal(_) => Some("System.Decimal"),
            Item::Date(_) => Some("System.Date"),
            Item::DateTime(_) => Some("System.DateTime"),
            Item::Time(_) => Some("System.Time"),
            Item::Quantity(_) => Some("System.Quantity"),
            Item::Node(n) => n.type_name,
        }
    }

    /// The JSON of a FHIR node (`None` for System values and value-less primitives).
    pub fn as_json_node(&self) -> Option<&Value> {
        match self {
            Item::Node(n) => n.value.as_deref(),
            _ => None,
        }
    }

    /// JSON rendering: FHIR nodes as their JSON, System primitives as JSON values, quantities as
    /// `{value, unit}`, dates/times as strings.
    pub fn to_json(&self) -> Value {
        match self {
            Item::Boolean(b) => Value::Bool(*b),
            Item::String(s) => Value::String(s.clone()),
            Item::Integer(i) => Value::from(*i),
            Item::Decimal(d) => decimal_json(d),
            Item::Date(d) => Value::String(d.fmt_date()),
            Item::DateTime(d) => Value::String(d.fmt_datetime()),
            Item::Time(t) => Value::String(t.to_string()),
            Item::Quantity(q) => {
                let mut m = serde_json::Map::new();
                m.insert("value".into(), decimal_json(&q.value));
                m.insert("unit".into(), Value::String(q.unit.clone()));
                Value::Object(m)
            }
            Item::Node(n) => match &n.value {
                Some(v) => (**v).clone(),
                None => n.ext.as_deref().cloned().unwrap_or(Value::Null),
            },
        }
    }

    /// The System-typed value of this item: FHIR primitives become `Boolean`/`String`/`Integer`/
    /// `Decimal`/`Date`/`DateTime`/`Time` (per their FHIR type), FHIR Quantities (`Quantity`,
    /// `Age`, `Duration`, …) become `Quantity` (UCUM `code` preferred); System values are
    /// returned as is. `None` for other complex elements and value-less primitives.
    pub fn system_value(&self) -> Option<Item<'static>> {
        Some(match self.prim() {
            Prim::Bool(b) => Item::Boolean(b),
            Prim::Str(s) => Item::String(s.to_string()),
            Prim::Int(i) => Item::Integer(i),
            Prim::Dec(d) => Item::Decimal(d),
            Prim::Date(d) => Item::Date(d),
            Prim::DateTime(d) => Item::DateTime(d),
            Prim::Time(t) => Item::Time(t),
            Prim::Qty(q) => Item::Quantity(q.into_owned()),
            Prim::Obj(_) | Prim::Null => return None,
        })
    }

    /// The Boolean value (System or FHIR `boolean`), if this item is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self.prim() {
            Prim::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The string value of a System String or any FHIR string-like primitive (`code`, `uri`,
    /// `id`, …; also the raw text of date/time primitives).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Item::String(s) => Some(s),
            Item::Node(n) => n.value.as_deref().and_then(Value::as_str),
            _ => None,
        }
    }

    /// Text used by `toString()` / string conversion; `None` when not convertible.
    pub(crate) fn to_fhirpath_string(&self) -> Option<String> {
        Some(match self.prim() {
            Prim::Bool(b) => b.to_string(),
            Prim::Str(s) => s.to_string(),
            Prim::Int(i) => i.to_string(),
            Prim::Dec(d) => d.to_string(),
            Prim::Date(d) => d.fmt_date(),
            Prim::DateTime(d) => d.fmt_datetime(),
            Prim::Time(t) => t.to_string(),
            Prim::Qty(q) => q.to_string(),
            Prim::Obj(_) | Prim::Null => return None,
        })
    }
}

pub(crate) fn decimal_json(d: &Decimal) -> Value {
    serde_json::from_str(&d.to_string()).unwrap_or(Value::Null)
}

impl<'a> Node<'a> {
    pub(crate) fn prim(&self) -> Prim<'_> {
        let Some(v) = self.value.as_deref() else {
            return Prim::Null;
        };
        let t = self.type_name.unwrap_or("");
        match v {
            Value::Bool(b) => Prim::Bool(*b),
            Value::Number(n) => {
                let text = number_text(n);
                let integral = !text.contains(['.', 'e', 'E']);
                if t == "decimal" || !integral {
                    parse_decimal(&text).map_or(Prim::Null, Prim::Dec)
                } else {
                    text.parse::<i64>()
                        .map(Prim::Int)
                        .or_else(|_| parse_decimal(&text).map(Prim::Dec).ok_or(()))
                        .unwrap_or(Prim::Null)
                }
            }
            Value::String(s) => match t {
                "date" => DateTimeValue::parse_date(s).map_or(Prim::Str(s), Prim::Date),
                "dateTime" | "instant" => {
                    DateTimeValue::parse_datetime(s).map_or(Prim::Str(s), Prim::DateTime)
                }
                "time" => TimeValue::parse(s).map_or(Prim::Str(s), Prim::Time),
                "integer64" => s.parse::<i64>().map_or(Prim::Str(s), Prim::Int),
                _ => Prim::Str(s),
            },
            Value::Object(_) => {
                if is_quantity_type(t) || (t.is_empty() && looks_like_quantity(v)) {
                    match quantity_from_json(v) {
                        Some(q) => Prim::Qty(Cow::Owned(q)),
                        None => Prim::Obj(v),
                    }
                } else {
                    Prim::Obj(v)
                }
            }
            Value::Null => Prim::Null,
            Value::Array(_) => Prim::Obj(v),
        }
    }
}

fn looks_like_quantity(v: &Value) -> bool {
    v.as_object().is_some_and(|o| {
        o.get("value").is_some_and(Value::is_number)
            && (o.contains_key("unit") || o.contains_key("code"))
            && o.keys().all(|k| {
                matches!(
                    k.as_str(),
                    "value" | "unit" | "code" | "system" | "comparator" | "id" | "extension"
                )
            })
    })
}
