//! SMART-on-FHIR enforcement on every interaction.
//!
//! With `--auth on`, every request under the FHIR base (except `/metadata` and the SMART
//! discovery/authorization endpoints) needs a bearer token; its [`Grant`] decides, per
//! interaction and resource type, whether the request may run, and every resource a response
//! carries (read, search matches and includes, history entries, transaction results) must be
//! visible to the grant: the type is permitted, patient-context grants see only their patient's
//! compartment, granular scopes (`patient/Observation.rs?category=laboratory`) only matching
//! resources. Out-of-compartment reads answer 404, so no existence leaks.

use std::net::SocketAddr;

use axum::http::StatusCode;
use kiln_fhir::Issue;
use kiln_smart_auth::{AuthError, Grant, Interaction, ScopeFilter};
use serde_json::Value;

use crate::error::{FhirError, FhirResult};
use crate::state::AppState;

/// `--auth` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    On,
    Off,
}

/// The default is `off` on a loopback address and `on` otherwise; `off` on a non-loopback
/// address needs `--insecure-no-auth`.
pub fn resolve_mode(
    requested: Option<AuthMode>,
    listen: SocketAddr,
    insecure: bool,
) -> Result<AuthMode, String> {
    let loopback = listen.ip().is_loopback();
    match requested {
        Some(AuthMode::Off) if !loopback && !insecure => Err(format!(
            "--auth off on the non-loopback address {listen} would serve health data without \
             authorization; add --insecure-no-auth if you really mean it"
        )),
        Some(m) => Ok(m),
        None if loopback => Ok(AuthMode::Off),
        None => Ok(AuthMode::On),
    }
}

impl From<AuthError> for FhirError {
    fn from(e: AuthError) -> Self {
        let code = match e.status() {
            StatusCode::UNAUTHORIZED => "login",
            StatusCode::FORBIDDEN => "forbidden",
            _ => "exception",
        };
        let mut err = FhirError::new(e.status(), Issue::error(code, e.to_string()));
        if let Some(h) = e.www_authenticate() {
            err.headers.push(("www-authenticate".into(), h));
        }
        err
    }
}

/// What the current request may do: everything (auth off, or in-process tools like import), or
/// what a verified token grants.
#[derive(Debug, Clone)]
pub struct Access {
    grant: Option<Grant>,
}

impl Access {
    pub fn unrestricted() -> Access {
        Access { grant: None }
    }

    pub fn from_grant(grant: Grant) -> Access {
        Access { grant: Some(grant) }
    }

    pub fn grant(&self) -> Option<&Grant> {
        self.grant.as_ref()
    }

    /// May `interaction` run on `ty` at all? (403 otherwise.)
    pub fn check(&self, interaction: Interaction, ty: &str) -> FhirResult<()> {
        match &self.grant {
            None => Ok(()),
            Some(g) => g
                .check(interaction, ty)
                .map(|_| ())
                .map_err(FhirError::from),
        }
    }

    /// For system-wide interactions (system history/search, transactions): the grant must allow
    /// the interaction on at least one type; each resource is then checked with [`Access::visible`].
    pub fn check_any(&self, interaction: Interaction) -> FhirResult<()> {
        match &self.grant {
            None => Ok(()),
            Some(g) => {
                if kiln_fhir::model::r4()
                    .resource_types()
                    .iter()
                    .any(|t| g.allows(interaction, t))
                {
                    Ok(())
                } else {
                    Err(FhirError::from(AuthError::Forbidden(format!(
                        "no granted scope permits {interaction:?}"
                    ))))
                }
            }
        }
    }

    /// The patient whose compartment a search of `ty` must stay in, if any.
    pub fn compartment_patient(&self, interaction: Interaction, ty: &str) -> Option<String> {
        let g = self.grant.as_ref()?;
        if g.requires_patient_compartment(interaction, ty) {
            Some(
                g.patient()
                    .unwrap_or("\u{0}no-patient-in-context")
                    .to_string(),
            )
        } else {
            None
        }
    }

    /// Is this resource visible to the grant for `interaction`?
    pub fn visible(&self, state: &AppState, interaction: Interaction, resource: &Value) -> bool {
        let Some(g) = &self.grant else {
            return true;
        };
        let Some(ty) = resource.get("resourceType").and_then(Value::as_str) else {
            return false;
        };
        let filter = g.scope_filter(interaction, ty);
        if filter == ScopeFilter::Denied {
            return false;
        }
        if g.requires_patient_compartment(interaction, ty) {
            let Some(pid) = g.patient() else {
                return false;
            };
            let own = ty == "Patient" && resource.get("id").and_then(Value::as_str) == Some(pid);
            if !own && !state.search.in_compartment(resource, "Patient", pid) {
                return false;
            }
        }
        match filter {
            ScopeFilter::AnyOf(sets) => sets
                .iter()
                .any(|set| state.search.matches_params(resource, set)),
            _ => true,
        }
    }

    /// 404 unless visible (reads: existence of invisible resources is not revealed).
    pub fn require_visible(
        &self,
        state: &AppState,
        interaction: Interaction,
        resource: &Value,
    ) -> FhirResult<()> {
        if self.visible(state, interaction, resource) {
            Ok(())
        } else {
            let ty = resource
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("?");
            let id = resource.get("id").and_then(Value::as_str).unwrap_or("?");
            Err(FhirError::not_found(format!("{ty}/{id} does not exist")))
        }
    }

    /// Writes: the resource written must be within the grant (403 otherwise).
    pub fn require_writable(
        &self,
        state: &AppState,
        interaction: Interaction,
        resource: &Value,
    ) -> FhirResult<()> {
        if self.visible(state, interaction, resource) {
            Ok(())
        } else {
            Err(FhirError::from(AuthError::Forbidden(
                "the resource lies outside what the access token grants (patient compartment or granular scope)".into(),
            )))
        }
    }

    /// Conditional interactions match by search, which could reach outside a restricted grant's
    /// compartment or granular filter: they need a grant not limited that way for the type.
    pub fn require_unrestricted(&self, interaction: Interaction, ty: &str) -> FhirResult<()> {
        self.check(interaction, ty)?;
        if let Some(g) = &self.grant {
            if g.requires_patient_compartment(interaction, ty)
                || matches!(g.scope_filter(interaction, ty), ScopeFilter::AnyOf(_))
            {
                return Err(FhirError::from(AuthError::Forbidden(format!(
                    "conditional {interaction:?} on {ty} needs a scope not limited to a patient or a granular filter"
                ))));
            }
        }
        Ok(())
    }

    /// Checks the single resource of a read/vread response against the grant (404 otherwise).
    pub fn require_visible_response(
        &self,
        state: &AppState,
        interaction: Interaction,
        r: crate::format::FhirResponse,
    ) -> FhirResult<crate::format::FhirResponse> {
        if self.grant.is_some() {
            if let Some(body) = &r.body {
                self.require_visible(state, interaction, &body.clone().into_value()?)?;
            }
        }
        Ok(r)
    }

    /// Removes every entry whose resource is not visible (search results, history, bundles).
    pub fn filter_bundle(&self, state: &AppState, interaction: Interaction, bundle: &mut Value) {
        if self.grant.is_none() {
            return;
        }
        let restricted = self.grant.as_ref().is_some_and(|g| g.patient().is_some())
            || bundle.get("type").and_then(Value::as_str) == Some("history");
        let mut removed = false;
        if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
            let before = entries.len();
            entries.retain(|e| match e.get("resource") {
                None => e.get("request").is_some() && self.history_stub_visible(e),
                Some(r)
                    if r.get("resourceType").and_then(Value::as_str)
                        == Some("OperationOutcome")
                        && e.pointer("/search/mode").and_then(Value::as_str) == Some("outcome") =>
                {
                    true
                }
                Some(r) => self.visible(state, interaction, r),
            });
            removed = entries.len() != before;
        }
        // a total computed over resources the grant cannot see would leak how many exist
        if removed || restricted {
            if let Some(obj) = bundle.as_object_mut() {
                obj.remove("total");
            }
        }
    }

    /// A history entry without a resource (a deletion) is only shown to unrestricted grants.
    fn history_stub_visible(&self, _e: &Value) -> bool {
        match &self.grant {
            None => true,
            Some(g) => g.patient().is_none(),
        }
    }
}

/// Maps a path + method to the SMART interaction it is.
pub fn interaction_for_method(method: &axum::http::Method, has_id: bool) -> Interaction {
    use axum::http::Method;
    match *method {
        Method::POST => Interaction::Create,
        Method::PUT => Interaction::Update,
        Method::PATCH => Interaction::Patch,
        Method::DELETE => Interaction::Delete,
        _ if has_id => Interaction::Read,
        _ => Interaction::Search,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_defaults() {
        let lo: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(resolve_mode(None, lo, false), Ok(AuthMode::Off));
        assert_eq!(resolve_mode(None, any, false), Ok(AuthMode::On));
        assert!(resolve_mode(Some(AuthMode::Off), any, false).is_err());
        assert_eq!(
            resolve_mode(Some(AuthMode::Off), any, true),
            Ok(AuthMode::Off)
        );
        assert_eq!(
            resolve_mode(Some(AuthMode::On), lo, false),
            Ok(AuthMode::On)
        );
    }
}
