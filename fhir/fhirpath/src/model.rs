//! FHIR type information used while navigating JSON: the FHIR type of each child element,
//! choice-type (`value[x]`) resolution and the type hierarchy for `is`/`as`/`ofType`.

/// Type name of a choice element's JSON suffix (`Quantity` in `valueQuantity`).
pub(crate) fn choice_suffix_type(suffix: &str) -> Option<&'static str> {
    Some(match suffix {
        "Base64Binary" => "base64Binary",
        "Boolean" => "boolean",
        "Canonical" => "canonical",
        "Code" => "code",
        "Date" => "date",
        "DateTime" => "dateTime",
        "Decimal" => "decimal",
        "Id" => "id",
        "Instant" => "instant",
        "Integer" => "integer",
        "Markdown" => "markdown",
        "Oid" => "oid",
        "PositiveInt" => "positiveInt",
        "String" => "string",
        "Time" => "time",
        "UnsignedInt" => "unsignedInt",
        "Uri" => "uri",
        "Url" => "url",
        "Uuid" => "uuid",
        "Address" => "Address",
        "Age" => "Age",
        "Annotation" => "Annotation",
        "Attachment" => "Attachment",
        "CodeableConcept" => "CodeableConcept",
        "Coding" => "Coding",
        "ContactPoint" => "ContactPoint",
        "Count" => "Count",
        "Distance" => "Distance",
        "Duration" => "Duration",
        "HumanName" => "HumanName",
        "Identifier" => "Identifier",
        "Money" => "Money",
        "Period" => "Period",
        "Quantity" => "Quantity",
        "Range" => "Range",
        "Ratio" => "Ratio",
        "Reference" => "Reference",
        "SampledData" => "SampledData",
        "Signature" => "Signature",
        "Timing" => "Timing",
        "ContactDetail" => "ContactDetail",
        "Contributor" => "Contributor",
        "DataRequirement" => "DataRequirement",
        "Expression" => "Expression",
        "ParameterDefinition" => "ParameterDefinition",
        "RelatedArtifact" => "RelatedArtifact",
        "TriggerDefinition" => "TriggerDefinition",
        "UsageContext" => "UsageContext",
        "Dosage" => "Dosage",
        "Meta" => "Meta",
        _ => return None,
    })
}

/// How a FHIRPath name maps onto a JSON property of a typed parent.
#[derive(Clone, Copy)]
pub(crate) enum ChildLookup {
    /// The property name and the child's FHIR type when known.
    Direct(Option<&'static str>),
    /// A type-specific choice name (`valueQuantity`): navigable, but not valid FHIRPath in
    /// strict mode (FHIRPath uses `value`).
    ChoiceSpecific,
    /// A choice element (`value[x]`): its allowed types.
    Choice(&'static kiln_fhir::model::ElementInfo),
    /// The model knows the parent type and it has no such element.
    Unknown,
    /// No model information for the parent.
    NoModel,
}

/// FNV-1a: a fast hasher for the small per-thread lookup cache (keys are short names).
#[derive(Default)]
pub(crate) struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvMap<V> = std::collections::HashMap<String, V, std::hash::BuildHasherDefault<Fnv>>;

thread_local! {
    /// parent type → element name → lookup result.
    static LOOKUPS: std::cell::RefCell<FnvMap<FnvMap<ChildLookup>>> = Default::default();
}

/// Looks up `name` on a parent of FHIR type `parent` (`None` = unknown); memoized per thread
/// (the model's own maps use SipHash, which dominated evaluation profiles).
pub(crate) fn lookup_child(parent: Option<&str>, name: &str) -> ChildLookup {
    let Some(parent) = parent else {
        return ChildLookup::NoModel;
    };
    let cached = LOOKUPS.with(|c| c.borrow().get(parent).and_then(|m| m.get(name)).copied());
    if let Some(found) = cached {
        return found;
    }
    let found = lookup_child_uncached(parent, name);
    LOOKUPS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() > 10_000 {
            c.clear();
        }
        let inner = c.entry(parent.to_string()).or_default();
        if inner.len() < 1_000 {
            inner.insert(name.to_string(), found);
        }
    });
    found
}

fn lookup_child_uncached(parent: &str, name: &str) -> ChildLookup {
    let model = kiln_fhir::model::r4();
    let Some(ti) = model.type_info(parent) else {
        return ChildLookup::NoModel;
    };
    if let Some(m) = ti.resolve_json_name(name) {
        if !m.info.is_choice {
            return ChildLookup::Direct(Some(normalize_type(m.type_name())));
        }
        if m.info.name != name {
            return ChildLookup::ChoiceSpecific;
        }
    }
    match ti.element_by_name(name) {
        Some(e) if e.is_choice => ChildLookup::Choice(e),
        Some(e) => ChildLookup::Direct(e.child_type_name().map(normalize_type)),
        None => ChildLookup::Unknown,
    }
}

/// For a JSON key of a choice element (`valueQuantity` for `value`), the selected type.
pub(crate) fn choice_key_type(
    info: &'static kiln_fhir::model::ElementInfo,
    name: &str,
    key: &str,
) -> Option<&'static str> {
    let suffix = key.strip_prefix(name)?;
    let first = suffix.as_bytes().first()?;
    if !first.is_ascii_uppercase() {
        return None;
    }
    info.types.iter().find_map(|t| {
        let code = t.code.as_bytes();
        let same = code.len() == suffix.len()
            && code.first().map(u8::to_ascii_uppercase) == Some(*first)
            && code[1..] == suffix.as_bytes()[1..];
        same.then(|| normalize_type(t.code.as_str()))
    })
}

/// The type of a JSON property found directly (used for keys like `valueQuantity`).
pub(crate) fn json_child_type(parent: Option<&str>, json_name: &str) -> Option<&'static str> {
    let parent = parent?;
    kiln_fhir::model::r4()
        .resolve_json_name(parent, json_name)
        .map(|m| normalize_type(m.type_name()))
}

fn normalize_type(t: &'static str) -> &'static str {
    match t.strip_prefix("http://hl7.org/fhirpath/System.") {
        Some("String") => "string",
        Some("Boolean") => "boolean",
        Some("Integer") => "integer",
        Some("Decimal") => "decimal",
        Some("Date") => "date",
        Some("DateTime") => "dateTime",
        Some("Time") => "time",
        Some(_) => "string",
        None => t,
    }
}

/// The model's static name for a resource type (`None` if not an R4 resource type).
pub(crate) fn resource_type(name: &str) -> Option<&'static str> {
    let t = kiln_fhir::model::r4().type_info(name)?;
    (t.kind == kiln_fhir::model::TypeKind::Resource && !t.is_abstract).then_some(t.name.as_str())
}

/// `type_name` is `ancestor` or derives from it.
pub(crate) fn is_subtype(type_name: &str, ancestor: &str) -> bool {
    if type_name == ancestor {
        return true;
    }
    if kiln_fhir::model::r4().is_subtype(type_name, ancestor) {
        return true;
    }
    // Backbone elements are BackboneElements; everything is an Element or Base.
    (type_name.contains('.') && (ancestor == "BackboneElement" || ancestor == "Element"))
        || ancestor == "Base"
}

/// Whether `name` names a FHIR type (resource, datatype or primitive).
pub(crate) fn is_fhir_type(name: &str) -> bool {
    kiln_fhir::model::r4().type_info(name).is_some()
}

/// Whether the FHIR type `type_name` has an element called `name` (for strict-mode checks).
pub(crate) fn has_element(type_name: &str, name: &str) -> Option<bool> {
    let ti = kiln_fhir::model::r4().type_info(type_name)?;
    Some(ti.element_by_name(name).is_some() || ti.resolve_json_name(name).is_some())
}

/// Whether `name` is a FHIR primitive type name (`string`, `code`, …).
pub(crate) fn is_fhir_primitive(name: &str) -> bool {
    crate::value::system_type_of_fhir_primitive(name).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_children_and_choices() {
        match lookup_child(Some("Patient"), "name") {
            ChildLookup::Direct(t) => assert_eq!(t, Some("HumanName")),
            _ => panic!("Patient.name"),
        }
        match lookup_child(Some("Observation"), "value") {
            ChildLookup::Choice(c) => {
                assert_eq!(
                    choice_key_type(c, "value", "valueQuantity"),
                    Some("Quantity")
                );
                assert_eq!(
                    choice_key_type(c, "value", "valueDateTime"),
                    Some("dateTime")
                );
                assert_eq!(choice_key_type(c, "value", "valueWibble"), None);
            }
            _ => panic!("Observation.value"),
        }
        assert_eq!(
            json_child_type(Some("Observation"), "valueQuantity"),
            Some("Quantity")
        );
        assert!(matches!(
            lookup_child(Some("Patient"), "given1"),
            ChildLookup::Unknown
        ));
        assert!(is_subtype("Age", "Quantity"));
        assert!(is_subtype("code", "string"));
        assert!(is_subtype("Patient", "Resource"));
        assert_eq!(choice_suffix_type("DateTime"), Some("dateTime"));
    }
}
