//! Kiln terminology service library: UCUM, code system providers (FHIR CodeSystem resources,
//! ICD-10-CM, LOINC, SNOMED CT), and the FHIR terminology operations on `serde_json::Value`.

pub mod ucum;
