//! `kiln-fhir`: the FHIR R4 resource model (vendored definitions), OperationOutcome issues,
//! XML⇄JSON, and structural validation. This crate does no I/O beyond reading its own vendored
//! files and no HTTP.

pub mod outcome;

pub use outcome::{operation_outcome, Issue, Severity};
pub mod model;
pub mod validation;
pub mod xml;
