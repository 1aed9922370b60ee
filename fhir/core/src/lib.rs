//! `kiln-fhir`: the FHIR R4 resource model (vendored definitions), OperationOutcome issues,
//! XML⇄JSON, structural and profile validation, and `_summary`/`_elements`. This crate does no
//! I/O beyond reading its own vendored files and no HTTP.
//!
//! - [`model`]: [`r4()`] — types, elements (choice/backbone/contentReference resolution),
//!   required value sets, invariants, the 1,378 SearchParameters, the Patient compartment.
//! - [`xml`]: [`json_to_xml`] / [`xml_to_json`].
//! - [`validation`]: [`validate`] (structural), [`validation::walk`] (typed traversal for
//!   evaluating invariants with a FHIRPath engine).
//! - [`profile`]: [`Profile`] from a StructureDefinition snapshot, [`validate_with_profile`].
//! - [`summary`]: [`summarize`] (`_summary`), [`select_elements`] (`_elements`).

pub mod model;
pub mod outcome;
pub mod profile;
pub mod summary;
pub mod validation;
pub mod xml;

pub use model::{r4, Constraint, ElementInfo, ElementMatch, Model, TypeInfo, TypeKind};
pub use outcome::{operation_outcome, Issue, Severity};
pub use profile::{validate_with_profile, validate_with_profile_and_codes, Profile};
pub use summary::{select_elements, summarize, SummaryMode};
pub use validation::{
    validate, validate_with, value_set_includes_system, CodeValidator, CodeVerdict, Validator,
};
pub use xml::{json_to_xml, xml_to_json, XmlError};
