//! Access tokens (RS256 JWTs), the resource-server enforcement API and the `Grant`.

use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::AuthError;
use crate::scopes::{Interaction, ScopeContext, ScopeFilter, ScopeSet};
use crate::store::{AuthStoreExt, LaunchContext};
use crate::AuthState;

/// Claims of our access tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessToken {
    pub iss: String,
    /// User name, or the client id for backend-services tokens.
    pub sub: String,
    /// The FHIR base URL.
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub client_id: String,
    pub scope: String,
    /// Grant id shared by every token of one authorization (revoking one revokes the grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<String>,
    #[serde(default, rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encounter: Option<String>,
    #[serde(
        default,
        rename = "fhirContext",
        skip_serializing_if = "Option::is_none"
    )]
    pub fhir_context: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
}

impl AccessToken {
    pub fn context(&self) -> LaunchContext {
        LaunchContext {
            patient: self.patient.clone(),
            encounter: self.encounter.clone(),
            fhir_context: self.fhir_context.clone(),
            need_patient_banner: None,
            smart_style_url: None,
            intent: self.intent.clone(),
            tenant: self.tenant.clone(),
        }
    }
}

/// The authorization a verified access token carries.
#[derive(Debug, Clone)]
pub struct Grant {
    pub token: AccessToken,
    pub scopes: ScopeSet,
}

impl Grant {
    pub fn new(token: AccessToken) -> Grant {
        let (scopes, _) = ScopeSet::parse_lenient(&token.scope);
        Grant { token, scopes }
    }

    /// Does any granted scope permit `interaction` on `resource_type`?
    /// (With `patient()` set, the server must still restrict results to that patient's compartment
    /// where [`Grant::requires_patient_compartment`] says so, and apply [`Grant::scope_filter`].)
    pub fn allows(&self, interaction: Interaction, resource_type: &str) -> bool {
        self.scopes.filter_for(interaction, resource_type) != ScopeFilter::Denied
    }

    /// `Ok(filter)` if allowed, else a 403 `AuthError`.
    pub fn check(
        &self,
        interaction: Interaction,
        resource_type: &str,
    ) -> Result<ScopeFilter, AuthError> {
        match self.scopes.filter_for(interaction, resource_type) {
            ScopeFilter::Denied => Err(AuthError::Forbidden(format!(
                "scope '{}' does not permit {interaction:?} on {resource_type}",
                self.token.scope
            ))),
            f => Ok(f),
        }
    }

    /// Exact granular semantics: `Denied`, `Unrestricted`, or OR-of-AND parameter sets.
    pub fn scope_filter(&self, interaction: Interaction, resource_type: &str) -> ScopeFilter {
        self.scopes.filter_for(interaction, resource_type)
    }

    /// Granular search filters for reads/searches of `resource_type`: empty when a whole-type
    /// scope applies (or nothing is allowed — check `allows` first). Each pair is one
    /// alternative (OR); multi-parameter scopes are flattened, use `scope_filter` for exactness.
    pub fn granular_filters(&self, resource_type: &str) -> Vec<(String, String)> {
        match self.scopes.filter_for(Interaction::Search, resource_type) {
            ScopeFilter::AnyOf(sets) => sets.into_iter().flatten().collect(),
            _ => Vec::new(),
        }
    }

    /// True when only `patient/` scopes allow this interaction, i.e. the server must limit it
    /// to the compartment of [`Grant::patient`].
    pub fn requires_patient_compartment(
        &self,
        interaction: Interaction,
        resource_type: &str,
    ) -> bool {
        let broader = ScopeSet(
            self.scopes
                .iter()
                .filter(|s| match s {
                    crate::scopes::Scope::Resource(r) => r.context != ScopeContext::Patient,
                    _ => false,
                })
                .cloned()
                .collect(),
        );
        broader.filter_for(interaction, resource_type) == ScopeFilter::Denied
            && self.allows(interaction, resource_type)
    }

    /// The patient in context (`patient/` scopes are limited to it).
    pub fn patient(&self) -> Option<&str> {
        self.token.patient.as_deref()
    }
    pub fn encounter(&self) -> Option<&str> {
        self.token.encounter.as_deref()
    }
    pub fn fhir_user(&self) -> Option<&str> {
        self.token.fhir_user.as_deref()
    }
    pub fn client_id(&self) -> &str {
        &self.token.client_id
    }
    pub fn subject(&self) -> &str {
        &self.token.sub
    }
    /// Backend-services (system/) token.
    pub fn is_system(&self) -> bool {
        self.scopes.has_context(ScopeContext::System)
    }
}

/// Signs claims with the active key (RS256, `kid` set).
pub(crate) fn sign<T: Serialize>(state: &AuthState, claims: &T) -> Result<String, String> {
    let ring = state.key_ring();
    let key = ring.active().ok_or("no active signing key")?;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    header.typ = Some("JWT".into());
    jsonwebtoken::encode(&header, claims, &key.encoding).map_err(|e| e.to_string())
}

const UNKNOWN_KEY: &str = "unknown signing key";

/// Verifies one of our access tokens (signature, kid, iss, aud, exp) without the revocation check.
pub fn verify_access_token(state: &AuthState, token: &str) -> Result<AccessToken, AuthError> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| AuthError::invalid_token(format!("malformed token: {e}")))?;
    if header.alg != Algorithm::RS256 {
        return Err(AuthError::invalid_token("unexpected token algorithm"));
    }
    let ring = state.key_ring();
    let key = match &header.kid {
        Some(kid) => ring.find(kid),
        None if ring.keys.len() == 1 => ring.keys.first(),
        None => None,
    }
    .ok_or_else(|| AuthError::invalid_token(UNKNOWN_KEY))?;
    let mut v = Validation::new(Algorithm::RS256);
    v.leeway = 30;
    v.set_audience(&[&state.config().fhir_base_url]);
    v.set_issuer(&[&state.config().issuer]);
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let data = jsonwebtoken::decode::<AccessToken>(token, &key.decoding, &v)
        .map_err(|e| AuthError::invalid_token(format!("token rejected: {e}")))?;
    Ok(data.claims)
}

/// Verifies a token and checks that neither it nor its grant was revoked.
pub async fn verify_active_access_token(
    state: &AuthState,
    token: &str,
) -> Result<AccessToken, AuthError> {
    let claims = match verify_access_token(state, token) {
        Err(AuthError::Unauthorized { description, .. })
            if description == UNKNOWN_KEY && state.reload_keys_for_unknown_kid().await =>
        {
            verify_access_token(state, token)?
        }
        other => other?,
    };
    let store = state.store();
    if store.is_token_id_revoked(&claims.jti).await? {
        return Err(AuthError::invalid_token("token revoked"));
    }
    if let Some(gid) = &claims.gid {
        if store.is_token_id_revoked(gid).await? {
            return Err(AuthError::invalid_token("token revoked"));
        }
    }
    Ok(claims)
}

/// The resource server's entry point: validates the `Authorization` header value.
/// Missing → 401 without error code; malformed/invalid/expired/revoked → 401 `invalid_token`.
pub async fn authorize_bearer(state: &AuthState, header: Option<&str>) -> Result<Grant, AuthError> {
    let Some(h) = header else {
        return Err(AuthError::Unauthorized {
            error: None,
            description: "no access token".into(),
        });
    };
    let token = bearer_token(h).ok_or(AuthError::Unauthorized {
        error: Some("invalid_request"),
        description: "Authorization header is not a Bearer token".into(),
    })?;
    let claims = verify_active_access_token(state, token).await?;
    Ok(Grant::new(claims))
}

/// Extracts the token of a `Bearer` authorization header (scheme case-insensitive).
pub fn bearer_token(h: &str) -> Option<&str> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let t = rest.trim();
    (!t.is_empty()).then_some(t)
}
