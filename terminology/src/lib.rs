//! Kiln terminology service library: UCUM, code system providers (FHIR CodeSystem resources,
//! ICD-10-CM, LOINC, SNOMED CT), and the FHIR terminology operations on `serde_json::Value`.

pub mod ecl;
pub mod gem;
pub mod icd10cm;
pub mod implicit;
pub mod loinc;
pub mod provider;
pub mod resource;
pub mod service;
pub mod snomed;
pub mod store;
pub mod tabular;
#[cfg(feature = "text-index")]
pub mod text_index;
pub mod ucum;

pub use provider::{
    CodeSystemProvider, Concept, ConceptTable, Designation, PropertyValue, Subsumption,
};
pub use service::{Params, Terminology, TxError};
pub use store::TerminologyStore;
