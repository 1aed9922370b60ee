//! Client registration and token-endpoint client authentication
//! (public, `client_secret_basic`/`client_secret_post`, RFC 7523 `private_key_jwt`).

use async_trait::async_trait;
use axum::http::HeaderMap;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{OAuthError, StoreError};
use crate::scopes::ScopeSet;
use crate::store::{now, AuthStore, AuthStoreExt, Client, ClientAuthMethod};
use crate::{ct_eq, random_token, sha256_hex, AuthState};

pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Fetches a client's JWKS from its `jwks_uri`. No caching is done by the server (so it never
/// caches longer than the client's `Cache-Control` allows).
#[async_trait]
pub trait JwksFetcher: Send + Sync {
    async fn fetch(&self, url: &str) -> Result<Value, String>;
}

/// `reqwest`-based fetcher (feature `jwks-fetch`).
#[cfg(feature = "jwks-fetch")]
#[derive(Default)]
pub struct ReqwestJwksFetcher {
    client: reqwest::Client,
}

#[cfg(feature = "jwks-fetch")]
#[async_trait]
impl JwksFetcher for ReqwestJwksFetcher {
    async fn fetch(&self, url: &str) -> Result<Value, String> {
        let resp = self
            .client
            .get(url)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("jwks_uri returned {}", resp.status()));
        }
        resp.json::<Value>().await.map_err(|e| e.to_string())
    }
}

/// What `add_client` needs (CLI `kiln clients add`, RFC 7591 registration).
#[derive(Debug, Clone, Default)]
pub struct NewClient {
    /// Generated when `None`.
    pub client_id: Option<String>,
    pub client_name: String,
    pub redirect_uris: Vec<String>,
    pub auth_method: Option<ClientAuthMethod>,
    pub jwks: Option<Value>,
    pub jwks_uri: Option<String>,
    /// Allowed scopes (space separated). Defaults to everything for user launches.
    pub scope: Option<String>,
    pub grant_types: Vec<String>,
    pub launch_uri: Option<String>,
}

/// The stored client plus the secret (shown once) for symmetric clients.
#[derive(Debug, Clone)]
pub struct RegisteredClient {
    pub client: Client,
    pub client_secret: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

const DEFAULT_USER_SCOPES: &str = "openid fhirUser profile launch launch/patient launch/encounter \
offline_access online_access patient/*.cruds user/*.cruds patient/*.* user/*.*";

fn valid_redirect_uri(u: &str) -> bool {
    let lower = u.to_ascii_lowercase();
    let has_scheme = lower.split_once(':').is_some_and(|(s, rest)| {
        !s.is_empty()
            && !rest.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    has_scheme && !u.contains('#') && !u.chars().any(|c| c.is_whitespace())
}

/// Validates and stores a new client.
pub async fn add_client(
    store: &dyn AuthStore,
    new: NewClient,
) -> Result<RegisteredClient, ClientError> {
    let method = new
        .auth_method
        .unwrap_or(if new.jwks.is_some() || new.jwks_uri.is_some() {
            ClientAuthMethod::PrivateKeyJwt
        } else {
            ClientAuthMethod::None
        });
    let mut grant_types = new.grant_types.clone();
    if grant_types.is_empty() {
        grant_types = if new.redirect_uris.is_empty() {
            vec!["client_credentials".into()]
        } else {
            vec!["authorization_code".into(), "refresh_token".into()]
        };
    }
    for g in &grant_types {
        if !["authorization_code", "refresh_token", "client_credentials"].contains(&g.as_str()) {
            return Err(ClientError::Invalid(format!("unsupported grant type {g}")));
        }
    }
    if grant_types.iter().any(|g| g == "authorization_code") && new.redirect_uris.is_empty() {
        return Err(ClientError::Invalid(
            "redirect_uris required for authorization_code".into(),
        ));
    }
    if let Some(bad) = new.redirect_uris.iter().find(|u| !valid_redirect_uri(u)) {
        return Err(ClientError::Invalid(format!("invalid redirect_uri {bad}")));
    }
    if grant_types.iter().any(|g| g == "client_credentials") && method == ClientAuthMethod::None {
        return Err(ClientError::Invalid(
            "client_credentials needs a confidential client".into(),
        ));
    }
    if method == ClientAuthMethod::PrivateKeyJwt {
        match (&new.jwks, &new.jwks_uri) {
            (None, None) => {
                return Err(ClientError::Invalid(
                    "private_key_jwt needs jwks or jwks_uri".into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(ClientError::Invalid(
                    "give jwks or jwks_uri, not both".into(),
                ))
            }
            (Some(j), None) => {
                if !j.get("keys").is_some_and(Value::is_array) {
                    return Err(ClientError::Invalid(
                        "jwks must be {\"keys\": [...]}".into(),
                    ));
                }
            }
            (None, Some(u)) => {
                if !(u.starts_with("https://") || u.starts_with("http://")) {
                    return Err(ClientError::Invalid(
                        "jwks_uri must be an http(s) URL".into(),
                    ));
                }
            }
        }
    }
    let scope = match new
        .scope
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        Some(s) => {
            ScopeSet::parse_strict(s).map_err(|e| ClientError::Invalid(e.to_string()))?;
            s.to_string()
        }
        None if grant_types == ["client_credentials"] => "system/*.rs".to_string(),
        None => DEFAULT_USER_SCOPES.to_string(),
    };
    let client_id = match new.client_id {
        Some(id) if !id.trim().is_empty() => {
            if store.get_client(&id).await?.is_some() {
                return Err(ClientError::Invalid(format!("client {id} exists")));
            }
            id
        }
        _ => uuid::Uuid::new_v4().to_string(),
    };
    let secret = (method == ClientAuthMethod::ClientSecretBasic).then(|| random_token(32));
    let client = Client {
        client_id,
        client_name: new.client_name,
        redirect_uris: new.redirect_uris,
        auth_method: method,
        secret_hash: secret.as_deref().map(sha256_hex),
        jwks: new.jwks,
        jwks_uri: new.jwks_uri,
        scope,
        grant_types,
        launch_uri: new.launch_uri,
        created_at: now(),
    };
    store.put_client(&client).await?;
    Ok(RegisteredClient {
        client,
        client_secret: secret,
    })
}

/// Form parameters relevant to client authentication.
pub(crate) struct ClientCredentials<'a> {
    pub client_id: Option<&'a str>,
    pub client_secret: Option<&'a str>,
    pub assertion_type: Option<&'a str>,
    pub assertion: Option<&'a str>,
}

/// How the client proved itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientProof {
    Public,
    Secret,
    Assertion,
}

fn pct_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Authenticates the client at the token / introspection / revocation endpoints.
pub(crate) async fn authenticate_client(
    state: &AuthState,
    headers: &HeaderMap,
    creds: ClientCredentials<'_>,
) -> Result<(Client, ClientProof), OAuthError> {
    let store = state.store();
    let basic = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(s, _)| s.eq_ignore_ascii_case("basic"))
        .map(|(_, rest)| rest.trim().to_string());

    if let Some(b64) = basic {
        let raw = STANDARD
            .decode(b64.as_bytes())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| OAuthError::invalid_client("malformed Basic credentials"))?;
        let (id, secret) = raw
            .split_once(':')
            .ok_or_else(|| OAuthError::invalid_client("malformed Basic credentials"))?;
        let (id, secret) = (pct_decode(id), pct_decode(secret));
        if creds.client_id.is_some_and(|c| c != id) {
            return Err(OAuthError::invalid_client("client_id mismatch"));
        }
        return check_secret(store, &id, &secret).await;
    }
    if let Some(t) = creds.assertion_type {
        if t != JWT_BEARER_ASSERTION {
            return Err(OAuthError::invalid_client(
                "unsupported client_assertion_type",
            ));
        }
        let a = creds
            .assertion
            .ok_or_else(|| OAuthError::invalid_client("client_assertion missing"))?;
        let client = verify_client_assertion(state, a, creds.client_id).await?;
        return Ok((client, ClientProof::Assertion));
    }
    if creds.assertion.is_some() {
        return Err(OAuthError::invalid_client("client_assertion_type missing"));
    }
    let id = creds
        .client_id
        .ok_or_else(|| OAuthError::invalid_client("client authentication required"))?;
    if let Some(secret) = creds.client_secret {
        return check_secret(store, id, secret).await;
    }
    let client = store
        .get_client(id)
        .await?
        .ok_or_else(|| OAuthError::invalid_client("unknown client"))?;
    if client.auth_method != ClientAuthMethod::None {
        return Err(OAuthError::invalid_client(
            "confidential client must authenticate",
        ));
    }
    Ok((client, ClientProof::Public))
}

async fn check_secret(
    store: &dyn AuthStore,
    id: &str,
    secret: &str,
) -> Result<(Client, ClientProof), OAuthError> {
    let client = store
        .get_client(id)
        .await?
        .ok_or_else(|| OAuthError::invalid_client("unknown client"))?;
    let ok = client.auth_method == ClientAuthMethod::ClientSecretBasic
        && client
            .secret_hash
            .as_deref()
            .is_some_and(|h| ct_eq(h, &sha256_hex(secret)));
    if !ok {
        return Err(OAuthError::invalid_client("invalid client credentials"));
    }
    Ok((client, ClientProof::Secret))
}

#[derive(Deserialize)]
struct UnverifiedClaims {
    iss: Option<String>,
}

#[derive(Deserialize)]
struct AssertionClaims {
    exp: i64,
    jti: Option<String>,
}

/// RFC 7523 §3 / SMART client-confidential-asymmetric validation.
pub(crate) async fn verify_client_assertion(
    state: &AuthState,
    assertion: &str,
    form_client_id: Option<&str>,
) -> Result<Client, OAuthError> {
    let bad = |d: &str| OAuthError::invalid_client(format!("invalid client assertion: {d}"));
    let header = jsonwebtoken::decode_header(assertion).map_err(|e| bad(&e.to_string()))?;
    if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(bad("alg must be RS384 or ES384"));
    }
    let kid = header.kid.clone().ok_or_else(|| bad("kid required"))?;
    // Peek at iss to find the client; everything is verified below.
    let payload = assertion
        .split('.')
        .nth(1)
        .ok_or_else(|| bad("malformed JWT"))?;
    let unverified: UnverifiedClaims = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("malformed claims"))?;
    let client_id = unverified.iss.ok_or_else(|| bad("iss missing"))?;
    if form_client_id.is_some_and(|c| c != client_id) {
        return Err(bad("client_id does not match iss"));
    }
    let client = state
        .store()
        .get_client(&client_id)
        .await?
        .ok_or_else(|| bad("unknown client"))?;
    if client.auth_method != ClientAuthMethod::PrivateKeyJwt {
        return Err(bad("client is not registered for private_key_jwt"));
    }
    let jwks = match (&header.jku, &client.jwks, &client.jwks_uri) {
        (Some(jku), _, Some(uri)) if jku == uri => fetch_jwks(state, uri).await?,
        (Some(_), _, _) => return Err(bad("jku is not the registered jwks_uri")),
        (None, Some(j), _) => j.clone(),
        (None, None, Some(uri)) => fetch_jwks(state, uri).await?,
        (None, None, None) => return Err(bad("client has no keys")),
    };
    let want_kty = if header.alg == Algorithm::RS384 {
        "RSA"
    } else {
        "EC"
    };
    let candidates: Vec<&Value> = jwks
        .get("keys")
        .and_then(Value::as_array)
        .map(|keys| {
            keys.iter()
                .filter(|k| k.get("kid").and_then(Value::as_str) == Some(kid.as_str()))
                .filter(|k| k.get("kty").and_then(Value::as_str) == Some(want_kty))
                .collect()
        })
        .unwrap_or_default();
    if candidates.len() != 1 {
        return Err(bad("no single key matches kid and alg"));
    }
    let mut jwk_value = candidates[0].clone();
    // Keys may carry an alg we don't model (or key_ops); only the key material matters here.
    if let Some(o) = jwk_value.as_object_mut() {
        o.remove("key_ops");
        if let Some(alg) = o.get("alg").and_then(Value::as_str) {
            let expected = if header.alg == Algorithm::RS384 {
                "RS384"
            } else {
                "ES384"
            };
            if alg != expected {
                return Err(bad("key alg does not match header alg"));
            }
        }
    }
    let jwk: Jwk =
        serde_json::from_value(jwk_value).map_err(|e| bad(&format!("unusable JWK: {e}")))?;
    if let Some(a) = jwk.common.key_algorithm {
        if !matches!(a, KeyAlgorithm::RS384 | KeyAlgorithm::ES384) {
            return Err(bad("key alg mismatch"));
        }
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| bad(&e.to_string()))?;
    let mut v = Validation::new(header.alg);
    v.leeway = 30;
    v.set_audience(&[state.config().token_endpoint()]);
    v.set_issuer(&[&client.client_id]);
    v.sub = Some(client.client_id.clone());
    v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let data = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &v)
        .map_err(|e| bad(&e.to_string()))?;
    let now = now();
    if data.claims.exp > now + 300 + 30 {
        return Err(bad("exp more than 5 minutes in the future"));
    }
    let jti = data
        .claims
        .jti
        .filter(|j| !j.is_empty())
        .ok_or_else(|| bad("jti required"))?;
    if !state
        .store()
        .remember_jti(&client.client_id, &jti, data.claims.exp.max(now) + 60)
        .await?
    {
        return Err(bad("jti replayed"));
    }
    Ok(client)
}

async fn fetch_jwks(state: &AuthState, uri: &str) -> Result<Value, OAuthError> {
    let f = state.jwks_fetcher().ok_or_else(|| {
        OAuthError::invalid_client("jwks_uri resolution is not enabled on this server")
    })?;
    f.fetch(uri)
        .await
        .map_err(|e| OAuthError::invalid_client(format!("cannot fetch jwks_uri: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryAuthStore;
    use serde_json::json;

    fn app(redirect: &str) -> NewClient {
        NewClient {
            client_name: "t".into(),
            redirect_uris: vec![redirect.into()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn add_client_validation() {
        let s = MemoryAuthStore::new();
        let c = add_client(&s, app("https://a.example/cb")).await.unwrap();
        assert_eq!(c.client.auth_method, ClientAuthMethod::None);
        assert!(c.client_secret.is_none());
        assert_eq!(
            c.client.grant_types,
            vec!["authorization_code", "refresh_token"]
        );
        for bad in ["no scheme", "https://a.example/cb#frag", "", "https://a b/"] {
            assert!(add_client(&s, app(bad)).await.is_err(), "{bad}");
        }
        // Native-app custom schemes are fine.
        assert!(add_client(&s, app("com.example.app:/callback"))
            .await
            .is_ok());
        let sym = add_client(
            &s,
            NewClient {
                auth_method: Some(ClientAuthMethod::ClientSecretBasic),
                ..app("https://a.example/cb")
            },
        )
        .await
        .unwrap();
        let secret = sym.client_secret.unwrap();
        assert!(secret.len() >= 40);
        assert_eq!(sym.client.secret_hash.unwrap(), sha256_hex(&secret));
        // Backend client defaults.
        let backend = add_client(
            &s,
            NewClient {
                client_name: "b".into(),
                jwks: Some(json!({"keys": []})),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(backend.client.auth_method, ClientAuthMethod::PrivateKeyJwt);
        assert_eq!(backend.client.grant_types, vec!["client_credentials"]);
        assert_eq!(backend.client.scope, "system/*.rs");
        // Invalid combinations.
        let bad = [
            NewClient {
                grant_types: vec!["client_credentials".into()],
                ..app("https://a.example/cb")
            },
            NewClient {
                grant_types: vec!["password".into()],
                ..app("https://a.example/cb")
            },
            NewClient {
                jwks: Some(json!({"nokeys": 1})),
                ..app("https://a.example/cb")
            },
            NewClient {
                jwks_uri: Some("ftp://x".into()),
                ..app("https://a.example/cb")
            },
            NewClient {
                scope: Some("patient/Observation.dus".into()),
                ..app("https://a.example/cb")
            },
            NewClient {
                client_id: Some(c.client.client_id.clone()),
                ..app("https://a.example/cb")
            },
        ];
        for (i, n) in bad.into_iter().enumerate() {
            assert!(add_client(&s, n).await.is_err(), "case {i}");
        }
        assert_eq!(s.list_clients().await.unwrap().len(), 4);
    }

    #[test]
    fn percent_decoding_of_basic_credentials() {
        assert_eq!(pct_decode("a%3Ab%2B"), "a:b+");
        assert_eq!(pct_decode("plain"), "plain");
    }
}
