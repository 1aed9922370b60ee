//! Storage boundary: a small record store (`AuthStore`) plus typed accessors (`AuthStoreExt`).
//!
//! Backends implement seven primitives over JSON records keyed by `(RecordKind, id)` with an
//! optional expiry (unix seconds). Expired records are invisible to every read. `take` and
//! `insert_new` must be atomic: they give single-use authorization codes and the jti replay cache.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::StoreError;

/// The record families the authorization server keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Client,
    User,
    AuthorizationCode,
    RefreshToken,
    RevokedToken,
    SigningKey,
    LaunchContext,
    JtiReplay,
    Session,
    PendingAuthorization,
    PasswordReset,
}

impl RecordKind {
    pub const ALL: [RecordKind; 11] = [
        RecordKind::Client,
        RecordKind::User,
        RecordKind::AuthorizationCode,
        RecordKind::RefreshToken,
        RecordKind::RevokedToken,
        RecordKind::SigningKey,
        RecordKind::LaunchContext,
        RecordKind::JtiReplay,
        RecordKind::Session,
        RecordKind::PendingAuthorization,
        RecordKind::PasswordReset,
    ];

    /// SQL table name (`auth_*`).
    pub fn table(self) -> &'static str {
        match self {
            RecordKind::Client => "auth_clients",
            RecordKind::User => "auth_users",
            RecordKind::AuthorizationCode => "auth_codes",
            RecordKind::RefreshToken => "auth_refresh_tokens",
            RecordKind::RevokedToken => "auth_revoked_tokens",
            RecordKind::SigningKey => "auth_signing_keys",
            RecordKind::LaunchContext => "auth_launch_contexts",
            RecordKind::JtiReplay => "auth_jti_replay",
            RecordKind::Session => "auth_sessions",
            RecordKind::PendingAuthorization => "auth_pending_authorizations",
            RecordKind::PasswordReset => "auth_password_resets",
        }
    }
}

/// Storage primitives. Implemented by [`MemoryAuthStore`] and [`crate::SqlAuthStore`].
#[async_trait]
pub trait AuthStore: Send + Sync {
    /// Insert or replace.
    async fn put(
        &self,
        kind: RecordKind,
        id: &str,
        value: &Value,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError>;
    /// Read an unexpired record.
    async fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Value>, StoreError>;
    /// Atomically read and delete (returns `None` if absent or expired).
    async fn take(&self, kind: RecordKind, id: &str) -> Result<Option<Value>, StoreError>;
    /// Atomically insert if no unexpired record has this id; `false` if one exists.
    async fn insert_new(
        &self,
        kind: RecordKind,
        id: &str,
        value: &Value,
        expires_at: Option<i64>,
    ) -> Result<bool, StoreError>;
    async fn delete(&self, kind: RecordKind, id: &str) -> Result<(), StoreError>;
    /// All unexpired records of a kind.
    async fn list(&self, kind: RecordKind) -> Result<Vec<Value>, StoreError>;
    /// Remove expired records; returns how many.
    async fn purge_expired(&self) -> Result<u64, StoreError>;
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn live(expires_at: Option<i64>, now: i64) -> bool {
    expires_at.is_none_or(|e| e > now)
}

type RecordMap = HashMap<(RecordKind, String), (Value, Option<i64>)>;

/// In-memory store (tests, single-process demos).
#[derive(Default)]
pub struct MemoryAuthStore {
    records: Mutex<RecordMap>,
}

impl MemoryAuthStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecordMap> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl AuthStore for MemoryAuthStore {
    async fn put(
        &self,
        kind: RecordKind,
        id: &str,
        value: &Value,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.lock()
            .insert((kind, id.to_string()), (value.clone(), expires_at));
        Ok(())
    }

    async fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Value>, StoreError> {
        let now = now();
        Ok(self
            .lock()
            .get(&(kind, id.to_string()))
            .filter(|(_, e)| live(*e, now))
            .map(|(v, _)| v.clone()))
    }

    async fn take(&self, kind: RecordKind, id: &str) -> Result<Option<Value>, StoreError> {
        let now = now();
        Ok(self
            .lock()
            .remove(&(kind, id.to_string()))
            .filter(|(_, e)| live(*e, now))
            .map(|(v, _)| v))
    }

    async fn insert_new(
        &self,
        kind: RecordKind,
        id: &str,
        value: &Value,
        expires_at: Option<i64>,
    ) -> Result<bool, StoreError> {
        let now = now();
        let mut map = self.lock();
        let key = (kind, id.to_string());
        if map.get(&key).is_some_and(|(_, e)| live(*e, now)) {
            return Ok(false);
        }
        map.insert(key, (value.clone(), expires_at));
        Ok(true)
    }

    async fn delete(&self, kind: RecordKind, id: &str) -> Result<(), StoreError> {
        self.lock().remove(&(kind, id.to_string()));
        Ok(())
    }

    async fn list(&self, kind: RecordKind) -> Result<Vec<Value>, StoreError> {
        let now = now();
        Ok(self
            .lock()
            .iter()
            .filter(|((k, _), (_, e))| *k == kind && live(*e, now))
            .map(|(_, (v, _))| v.clone())
            .collect())
    }

    async fn purge_expired(&self) -> Result<u64, StoreError> {
        let now = now();
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, (_, e)| live(*e, now));
        Ok((before - map.len()) as u64)
    }
}

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// Public client (`none`): PKCE only.
    None,
    /// Confidential symmetric: HTTP Basic or `client_secret_post`.
    ClientSecretBasic,
    /// Confidential asymmetric: RFC 7523 JWT assertion (RS384 / ES384).
    PrivateKeyJwt,
}

impl ClientAuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuthMethod::None => "none",
            ClientAuthMethod::ClientSecretBasic => "client_secret_basic",
            ClientAuthMethod::PrivateKeyJwt => "private_key_jwt",
        }
    }
}

/// A registered client application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Client {
    pub client_id: String,
    pub client_name: String,
    pub redirect_uris: Vec<String>,
    pub auth_method: ClientAuthMethod,
    /// Hex SHA-256 of the client secret (secrets are high-entropy random strings).
    #[serde(default)]
    pub secret_hash: Option<String>,
    /// JWKS registered by value.
    #[serde(default)]
    pub jwks: Option<Value>,
    /// JWKS registered by URL (also the only allowed `jku`).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Space-separated scopes this client may be granted (its pre-authorized policy).
    pub scope: String,
    pub grant_types: Vec<String>,
    #[serde(default)]
    pub launch_uri: Option<String>,
    pub created_at: i64,
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub username: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// `Patient/123`, `Practitioner/abc`, ... (relative or absolute).
    #[serde(default)]
    pub fhir_user: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub admin: bool,
    /// Patient ids this user may pick in the standalone patient picker (besides search).
    #[serde(default)]
    pub patients: Vec<String>,
    /// Base32 TOTP secret (confirmed or pending).
    #[serde(default)]
    pub totp_secret: Option<String>,
    #[serde(default)]
    pub totp_enabled: bool,
    /// Last accepted TOTP time step (codes are single use).
    #[serde(default)]
    pub totp_last_step: Option<u64>,
    /// Hex SHA-256 of unused recovery codes.
    #[serde(default)]
    pub recovery_codes: Vec<String>,
    #[serde(default)]
    pub failed_logins: u32,
    #[serde(default)]
    pub locked_until: Option<i64>,
    pub created_at: i64,
}

/// Launch context parameters (token response / introspection / EHR launch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LaunchContext {
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
    pub need_patient_banner: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smart_style_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// An EHR launch (`launch=` parameter) created through the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EhrLaunch {
    pub launch_id: String,
    pub context: LaunchContext,
    /// User the EHR launched for: only this user may complete the authorization.
    #[serde(default)]
    pub username: Option<String>,
    /// Client the launch is for: only this client may use it.
    #[serde(default)]
    pub client_id: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
}

/// An authorization request between `/auth/authorize` and the code redirect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingAuthorization {
    pub id: String,
    pub client_id: String,
    pub redirect_uri: String,
    pub requested_scope: String,
    #[serde(default)]
    pub state: Option<String>,
    pub code_challenge: String,
    #[serde(default)]
    pub nonce: Option<String>,
    pub context: LaunchContext,
    /// From an EHR launch.
    #[serde(default)]
    pub launch_id: Option<String>,
    /// The EHR launch was made for this user.
    #[serde(default)]
    pub launch_username: Option<String>,
    /// The standalone encounter picker was answered (or the patient had no encounters).
    #[serde(default)]
    pub encounter_chosen: bool,
    pub csrf: String,
    pub expires_at: i64,
}

/// A single-use authorization code (stored under the SHA-256 of the code).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthorizationCode {
    pub client_id: String,
    pub redirect_uri: String,
    pub code_challenge: String,
    pub scope: String,
    pub username: String,
    pub context: LaunchContext,
    #[serde(default)]
    pub nonce: Option<String>,
    pub session_id: String,
    pub auth_time: i64,
    pub expires_at: i64,
}

/// A refresh token (stored under the SHA-256 of the token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshTokenRecord {
    pub grant_id: String,
    pub client_id: String,
    /// The scope originally granted by the user: refreshes may only narrow it.
    pub scope: String,
    #[serde(default)]
    pub username: Option<String>,
    pub context: LaunchContext,
    /// `online_access`: bound to this session.
    #[serde(default)]
    pub session_id: Option<String>,
    pub issued_at: i64,
    pub expires_at: i64,
}

/// A login session (cookie `kiln_session`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub username: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// A persisted signing key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub alg: String,
    /// Base64 PKCS#1 DER of the RSA private key.
    pub private_key_der: String,
    pub created_at: i64,
    /// After this instant the key no longer signs; it stays published until `expires_at`.
    #[serde(default)]
    pub retired_at: Option<i64>,
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// A password reset token (stored under the SHA-256 of the token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PasswordReset {
    pub username: String,
    pub expires_at: i64,
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, StoreError> {
    serde_json::to_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_value<T: DeserializeOwned>(v: Option<Value>) -> Result<Option<T>, StoreError> {
    match v {
        None => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

/// Typed accessors over any [`AuthStore`].
#[async_trait]
pub trait AuthStoreExt: AuthStore {
    async fn get_client(&self, client_id: &str) -> Result<Option<Client>, StoreError> {
        from_value(self.get(RecordKind::Client, client_id).await?)
    }
    async fn put_client(&self, c: &Client) -> Result<(), StoreError> {
        self.put(RecordKind::Client, &c.client_id, &to_value(c)?, None)
            .await
    }
    async fn list_clients(&self) -> Result<Vec<Client>, StoreError> {
        let mut out = Vec::new();
        for v in self.list(RecordKind::Client).await? {
            if let Some(c) = from_value(Some(v))? {
                out.push(c);
            }
        }
        Ok(out)
    }
    async fn get_user(&self, username: &str) -> Result<Option<User>, StoreError> {
        from_value(self.get(RecordKind::User, username).await?)
    }
    async fn put_user(&self, u: &User) -> Result<(), StoreError> {
        self.put(RecordKind::User, &u.username, &to_value(u)?, None)
            .await
    }
    async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let mut out = Vec::new();
        for v in self.list(RecordKind::User).await? {
            if let Some(u) = from_value(Some(v))? {
                out.push(u);
            }
        }
        Ok(out)
    }
    async fn put_code(&self, code_hash: &str, c: &AuthorizationCode) -> Result<(), StoreError> {
        self.put(
            RecordKind::AuthorizationCode,
            code_hash,
            &to_value(c)?,
            Some(c.expires_at),
        )
        .await
    }
    /// Single use: the code is deleted as it is read.
    async fn take_code(&self, code_hash: &str) -> Result<Option<AuthorizationCode>, StoreError> {
        from_value(self.take(RecordKind::AuthorizationCode, code_hash).await?)
    }
    async fn put_refresh_token(
        &self,
        token_hash: &str,
        r: &RefreshTokenRecord,
    ) -> Result<(), StoreError> {
        self.put(
            RecordKind::RefreshToken,
            token_hash,
            &to_value(r)?,
            Some(r.expires_at),
        )
        .await
    }
    async fn get_refresh_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<RefreshTokenRecord>, StoreError> {
        from_value(self.get(RecordKind::RefreshToken, token_hash).await?)
    }
    async fn take_refresh_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<RefreshTokenRecord>, StoreError> {
        from_value(self.take(RecordKind::RefreshToken, token_hash).await?)
    }
    /// Marks a token id (`jti`) or grant id as revoked until `expires_at`.
    async fn revoke_token_id(&self, id: &str, expires_at: i64) -> Result<(), StoreError> {
        self.put(
            RecordKind::RevokedToken,
            id,
            &Value::Bool(true),
            Some(expires_at),
        )
        .await
    }
    async fn is_token_id_revoked(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.get(RecordKind::RevokedToken, id).await?.is_some())
    }
    async fn list_signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let mut out = Vec::new();
        for v in self.list(RecordKind::SigningKey).await? {
            if let Some(k) = from_value(Some(v))? {
                out.push(k);
            }
        }
        Ok(out)
    }
    async fn put_signing_key(&self, k: &SigningKeyRecord) -> Result<(), StoreError> {
        self.put(RecordKind::SigningKey, &k.kid, &to_value(k)?, k.expires_at)
            .await
    }
    async fn put_launch(&self, l: &EhrLaunch) -> Result<(), StoreError> {
        self.put(
            RecordKind::LaunchContext,
            &l.launch_id,
            &to_value(l)?,
            Some(l.expires_at),
        )
        .await
    }
    async fn get_launch(&self, launch_id: &str) -> Result<Option<EhrLaunch>, StoreError> {
        from_value(self.get(RecordKind::LaunchContext, launch_id).await?)
    }
    /// Records `(iss, jti)`; `false` if it was already seen (a replay).
    async fn remember_jti(
        &self,
        iss: &str,
        jti: &str,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        let id = format!("{iss}\u{1f}{jti}");
        self.insert_new(
            RecordKind::JtiReplay,
            &id,
            &Value::Bool(true),
            Some(expires_at),
        )
        .await
    }
    async fn put_session(&self, s: &Session) -> Result<(), StoreError> {
        self.put(
            RecordKind::Session,
            &s.id,
            &to_value(s)?,
            Some(s.expires_at),
        )
        .await
    }
    async fn get_session(&self, id: &str) -> Result<Option<Session>, StoreError> {
        from_value(self.get(RecordKind::Session, id).await?)
    }
    async fn delete_session(&self, id: &str) -> Result<(), StoreError> {
        self.delete(RecordKind::Session, id).await
    }
    async fn put_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError> {
        self.put(
            RecordKind::PendingAuthorization,
            &p.id,
            &to_value(p)?,
            Some(p.expires_at),
        )
        .await
    }
    async fn get_pending(&self, id: &str) -> Result<Option<PendingAuthorization>, StoreError> {
        from_value(self.get(RecordKind::PendingAuthorization, id).await?)
    }
    async fn take_pending(&self, id: &str) -> Result<Option<PendingAuthorization>, StoreError> {
        from_value(self.take(RecordKind::PendingAuthorization, id).await?)
    }
    async fn put_password_reset(
        &self,
        token_hash: &str,
        r: &PasswordReset,
    ) -> Result<(), StoreError> {
        self.put(
            RecordKind::PasswordReset,
            token_hash,
            &to_value(r)?,
            Some(r.expires_at),
        )
        .await
    }
    async fn take_password_reset(
        &self,
        token_hash: &str,
    ) -> Result<Option<PasswordReset>, StoreError> {
        from_value(self.take(RecordKind::PasswordReset, token_hash).await?)
    }
}

impl<T: AuthStore + ?Sized> AuthStoreExt for T {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn memory_store_semantics() {
        let s = MemoryAuthStore::new();
        let k = RecordKind::AuthorizationCode;
        s.put(k, "a", &json!({"x": 1}), Some(now() + 60))
            .await
            .unwrap();
        assert!(s.get(k, "a").await.unwrap().is_some());
        assert!(s.take(k, "a").await.unwrap().is_some());
        assert!(
            s.take(k, "a").await.unwrap().is_none(),
            "take is single-use"
        );
        s.put(k, "old", &json!(1), Some(now() - 1)).await.unwrap();
        assert!(
            s.get(k, "old").await.unwrap().is_none(),
            "expired invisible"
        );
        assert!(
            s.insert_new(k, "old", &json!(2), None).await.unwrap(),
            "expired replaced"
        );
        assert!(!s.insert_new(k, "old", &json!(3), None).await.unwrap());
        assert!(s.remember_jti("c", "j1", now() + 60).await.unwrap());
        assert!(!s.remember_jti("c", "j1", now() + 60).await.unwrap());
        assert!(s.remember_jti("c2", "j1", now() + 60).await.unwrap());
    }
}
