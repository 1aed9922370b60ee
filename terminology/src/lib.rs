//! Kiln terminology service library: UCUM, code system providers (FHIR CodeSystem resources,
//! ICD-10-CM, LOINC, SNOMED CT), and the FHIR terminology operations on `serde_json::Value`.

pub mod icd10cm;
pub mod provider;
pub mod resource;
pub mod service;
pub mod store;
pub mod ucum;

pub use provider::{
    CodeSystemProvider, Concept, ConceptTable, Designation, PropertyValue, Subsumption,
};
pub use service::{Params, Terminology, TxError};
pub use store::TerminologyStore;
