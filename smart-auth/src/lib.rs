//! Kiln's SMART-on-FHIR authorization server (SMART App Launch 2.2, OAuth 2.0, OIDC).
//!
//! Mount [`router`] at the FHIR base. Routes (relative to the base):
//!
//! | path | method | what |
//! |---|---|---|
//! | `/.well-known/smart-configuration` | GET | SMART discovery |
//! | `/.well-known/openid-configuration` | GET | OIDC discovery |
//! | `/auth/authorize` | GET, POST | authorization endpoint |
//! | `/auth/login` | GET, POST | login form (password + TOTP) |
//! | `/auth/select-patient` | GET, POST | standalone patient picker |
//! | `/auth/select-encounter` | GET, POST | standalone encounter picker (`launch/encounter`) |
//! | `/auth/consent` | GET, POST | consent page (user may un-tick scopes) |
//! | `/auth/token` | POST | token endpoint |
//! | `/auth/introspect` | POST | RFC 7662 |
//! | `/auth/revoke` | POST | RFC 7009 |
//! | `/auth/register` | POST | RFC 7591 dynamic registration (if enabled) |
//! | `/auth/jwks` | GET | our public keys |
//! | `/auth/userinfo` | GET | OIDC userinfo |
//! | `/auth/launch` | POST | admin: create an EHR launch context (JSON) |
//! | `/auth/ehr-launch` | GET | signed-in user: create a launch and redirect to the app's `launch_uri` |
//! | `/auth/logout` | POST | end the login session |
//! | `/auth/mfa` | GET, POST | signed-in user: TOTP enrolment, recovery codes |
//! | `/auth/password-reset` | GET, POST | set a new password with a reset token |
//! | `/auth/smart-style.json` | GET | the `smart_style_url` document |
//!
//! The resource server calls [`authorize_bearer`] on every request and enforces the [`Grant`].
//!
//! # Wiring (server side)
//!
//! ```text
//! let store = SqlAuthStore::new(AnyAuthPool::Sqlite(pool.clone()));
//! store.migrate().await?;
//! let auth = AuthState::new(SmartConfig::new("https://ehr.example/fhir"), Arc::new(store)).await?
//!     .with_patient_directory(Arc::new(MyPatientSearch));   // optional, for the picker
//! let app = fhir_routes.merge(kiln_smart_auth::router(auth.clone()));   // under the FHIR base
//! // serve with `into_make_service_with_connect_info::<SocketAddr>()` so rate limits are per address
//! // per request:
//! let grant = authorize_bearer(&auth, headers.get("authorization").and_then(|v| v.to_str().ok())).await?;
//! match grant.check(Interaction::Search, "Observation")? {          // 403 when not allowed
//!     ScopeFilter::Unrestricted => {}
//!     ScopeFilter::AnyOf(sets) => { /* OR of AND-ed search params, e.g. category=laboratory */ }
//!     ScopeFilter::Denied => unreachable!(),
//! }
//! if grant.requires_patient_compartment(Interaction::Search, "Observation") {
//!     /* restrict to the compartment of grant.patient() */
//! }
//! // CLI: add_user(auth.store(), NewUser { .. }), add_client(auth.store(), NewClient { .. })
//! // periodically: auth.purge_expired().await
//! ```

pub mod clients;
pub mod error;
mod handlers;
mod html;
pub mod keys;
pub mod scopes;
pub mod sql;
pub mod store;
pub mod tokens;
pub mod users;

use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub use clients::{add_client, JwksFetcher, NewClient, RegisteredClient};
pub use error::{AuthError, OAuthError, StoreError};
pub use handlers::{capability_security, router, smart_configuration_document};
pub use keys::KeyRing;
pub use scopes::{Interaction, Scope, ScopeFilter, ScopeSet};
pub use sql::{AnyAuthPool, SqlAuthStore};
pub use store::{AuthStore, AuthStoreExt, ClientAuthMethod, MemoryAuthStore};
pub use tokens::{authorize_bearer, AccessToken, Grant};
pub use users::{add_user, NewUser};

/// Authorization-server settings.
#[derive(Debug, Clone)]
pub struct SmartConfig {
    /// The FHIR base URL (no trailing slash): the required `aud`, and the prefix of our endpoints.
    pub fhir_base_url: String,
    /// OIDC issuer (`iss` of our tokens). Defaults to `fhir_base_url`.
    pub issuer: String,
    /// Access/id token lifetime for user launches (seconds, ≤ 3600 recommended).
    pub token_lifetime: i64,
    /// Access token lifetime for backend services (seconds, ≤ 300 recommended).
    pub backend_token_lifetime: i64,
    /// `offline_access` refresh token lifetime (seconds).
    pub refresh_token_lifetime: i64,
    /// Authorization code lifetime (seconds, capped at 600).
    pub code_lifetime: i64,
    /// Login session lifetime (seconds); `online_access` refresh tokens end with it.
    pub session_lifetime: i64,
    /// EHR launch context lifetime (seconds).
    pub launch_lifetime: i64,
    /// Enable RFC 7591 `POST /auth/register`.
    pub dynamic_registration: bool,
    /// If set, registration requires `Authorization: Bearer <this>`.
    pub registration_access_token: Option<String>,
    /// If set, `Authorization: Bearer <this>` is an admin credential for `/auth/launch`.
    pub admin_api_key: Option<String>,
    /// Failed logins before lockout.
    pub max_failed_logins: u32,
    /// Lockout duration (seconds).
    pub lockout_seconds: i64,
    /// Login attempts per minute per client address and per user name.
    pub login_rate_per_minute: u32,
    /// Token/introspection/revocation requests per minute per client address.
    pub token_rate_per_minute: u32,
    /// Mark cookies `Secure` (default: when the base URL is https).
    pub secure_cookies: bool,
    /// Introspection requires a bearer token or client authentication.
    pub introspection_requires_auth: bool,
    /// Rotate the signing key when the active one is older than this (seconds; `None` = never).
    /// Applied by [`AuthState::run_maintenance`].
    pub key_rotation_secs: Option<i64>,
    /// Presenting a rotated-out refresh token again revokes the whole grant (OAuth 2.1 §4.3.1).
    pub refresh_reuse_detection: bool,
}

impl SmartConfig {
    pub fn new(fhir_base_url: impl Into<String>) -> SmartConfig {
        let base = fhir_base_url.into().trim_end_matches('/').to_string();
        SmartConfig {
            issuer: base.clone(),
            secure_cookies: base.starts_with("https://"),
            fhir_base_url: base,
            token_lifetime: 3600,
            backend_token_lifetime: 300,
            refresh_token_lifetime: 90 * 24 * 3600,
            code_lifetime: 600,
            session_lifetime: 8 * 3600,
            launch_lifetime: 3600,
            dynamic_registration: false,
            registration_access_token: None,
            admin_api_key: None,
            max_failed_logins: 5,
            lockout_seconds: 900,
            login_rate_per_minute: 30,
            token_rate_per_minute: 600,
            introspection_requires_auth: true,
            refresh_reuse_detection: true,
            key_rotation_secs: Some(90 * 24 * 3600),
        }
    }

    /// Absolute URL of one of our endpoints (`path` starts with `/`).
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{}", self.fhir_base_url, path)
    }

    pub fn token_endpoint(&self) -> String {
        self.endpoint("/auth/token")
    }
}

/// Which patients a signed-in user may choose in the standalone patient picker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientVisibility {
    /// Any patient (administrators, practitioners).
    Any,
    /// Only these patient ids (a Patient user: themself and linked patients; other users:
    /// their linked patients).
    Only(Vec<String>),
}

impl PatientVisibility {
    pub fn allows(&self, id: &str) -> bool {
        match self {
            PatientVisibility::Any => true,
            PatientVisibility::Only(ids) => ids.iter().any(|i| i == id),
        }
    }
}

/// One row of the standalone encounter picker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncounterChoice {
    /// `Encounter.id`
    pub id: String,
    /// What kind of encounter (`type`, else `class`), for people.
    pub description: String,
    /// `Encounter.period` as text (`2024-03-01 – 2024-03-04`), when known.
    pub period: Option<String>,
    /// `Encounter.status`
    pub status: Option<String>,
}

/// Finds patients for the standalone patient picker and a patient's encounters for the
/// standalone encounter picker (the server plugs in its search engine; smart-auth does not
/// depend on it).
#[async_trait::async_trait]
pub trait PatientDirectory: Send + Sync {
    /// Up to `limit` `(patient id, display name)` pairs matching `text` (empty = any).
    async fn search(&self, text: &str, limit: usize) -> Vec<(String, String)>;

    /// Like [`PatientDirectory::search`] (by name, identifier or id), limited to the patients
    /// `visible` allows. The default filters [`PatientDirectory::search`]'s answer; a
    /// directory over a search engine should restrict the query instead.
    async fn search_visible(
        &self,
        text: &str,
        visible: &PatientVisibility,
        limit: usize,
    ) -> Vec<(String, String)> {
        let mut found = self.search(text, limit).await;
        found.retain(|(id, _)| visible.allows(id));
        found
    }

    /// The display name of one patient (the picker lists a user's linked patients by name).
    async fn display_name(&self, _id: &str) -> Option<String> {
        None
    }

    /// Up to `limit` encounters of `patient`, most recent first (standalone `launch/encounter`).
    /// The default knows none, and the launch then proceeds without an encounter.
    async fn encounters(&self, _patient: &str, _limit: usize) -> Vec<EncounterChoice> {
        Vec::new()
    }
}

type Limiter = DefaultKeyedRateLimiter<String>;

/// Shared state of the authorization server (cheap to clone).
#[derive(Clone)]
pub struct AuthState {
    config: Arc<SmartConfig>,
    store: Arc<dyn AuthStore>,
    keys: Arc<RwLock<Arc<KeyRing>>>,
    /// Unix time of the last on-demand key reload (unknown `kid`), to bound store reads.
    last_key_reload: Arc<std::sync::atomic::AtomicI64>,
    jwks_fetcher: Option<Arc<dyn JwksFetcher>>,
    patient_directory: Option<Arc<dyn PatientDirectory>>,
    login_limiter: Arc<Limiter>,
    token_limiter: Arc<Limiter>,
}

fn quota(per_minute: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN))
}

impl AuthState {
    /// Loads the signing keys from the store (generating one on first start).
    pub async fn new(
        config: SmartConfig,
        store: Arc<dyn AuthStore>,
    ) -> Result<AuthState, StoreError> {
        let ring = KeyRing::load_or_create(store.as_ref()).await?;
        Ok(AuthState {
            login_limiter: Arc::new(RateLimiter::keyed(quota(config.login_rate_per_minute))),
            token_limiter: Arc::new(RateLimiter::keyed(quota(config.token_rate_per_minute))),
            config: Arc::new(config),
            store,
            keys: Arc::new(RwLock::new(Arc::new(ring))),
            last_key_reload: Arc::new(std::sync::atomic::AtomicI64::new(0)),
            jwks_fetcher: default_fetcher(),
            patient_directory: None,
        })
    }

    /// Resolves clients' `jwks_uri` with this fetcher.
    pub fn with_jwks_fetcher(mut self, f: Arc<dyn JwksFetcher>) -> Self {
        self.jwks_fetcher = Some(f);
        self
    }

    /// Patient search for the standalone picker.
    pub fn with_patient_directory(mut self, d: Arc<dyn PatientDirectory>) -> Self {
        self.patient_directory = Some(d);
        self
    }

    pub fn config(&self) -> &SmartConfig {
        &self.config
    }

    pub fn store(&self) -> &dyn AuthStore {
        self.store.as_ref()
    }

    pub fn key_ring(&self) -> Arc<KeyRing> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reloads keys from the store (after another instance rotated them).
    pub async fn reload_keys(&self) -> Result<(), StoreError> {
        let ring = KeyRing::load_or_create(self.store()).await?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        Ok(())
    }

    /// Reloads keys when a token names an unknown `kid` (another instance may have rotated),
    /// at most once every 30 seconds. Returns whether a reload happened.
    pub(crate) async fn reload_keys_for_unknown_kid(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = store::now();
        let last = self.last_key_reload.load(Ordering::Relaxed);
        if now - last < 30
            || self
                .last_key_reload
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        self.reload_keys().await.is_ok()
    }

    /// Rotates the signing key; the old one stays in the JWKS until its tokens expire.
    pub async fn rotate_signing_key(&self) -> Result<(), StoreError> {
        let keep = self
            .config
            .token_lifetime
            .max(self.config.backend_token_lifetime)
            + 300;
        let ring = keys::rotate_keys(self.store(), keep).await?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        Ok(())
    }

    /// Deletes expired codes, tokens, sessions, launches and replay-cache entries and forgets
    /// idle rate-limit buckets. Call periodically (e.g. every few minutes).
    pub async fn purge_expired(&self) -> Result<u64, StoreError> {
        self.login_limiter.retain_recent();
        self.token_limiter.retain_recent();
        self.store.purge_expired().await
    }

    /// One maintenance pass: purge expired records, rotate the signing key when it is older than
    /// `key_rotation_secs`, pick up keys rotated by other instances.
    pub async fn run_maintenance(&self) -> Result<(), StoreError> {
        self.purge_expired().await?;
        let ring = self.key_ring();
        let due = match (self.config.key_rotation_secs, ring.active()) {
            (Some(max_age), Some(k)) => store::now() - k.created_at > max_age,
            _ => false,
        };
        if due {
            self.rotate_signing_key().await
        } else {
            self.reload_keys().await
        }
    }

    /// Spawns a task running [`AuthState::run_maintenance`] every `every` (errors are logged).
    pub fn spawn_maintenance(&self, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = state.run_maintenance().await {
                    tracing::warn!("smart-auth maintenance failed: {e}");
                }
            }
        })
    }

    pub(crate) fn jwks_fetcher(&self) -> Option<&Arc<dyn JwksFetcher>> {
        self.jwks_fetcher.as_ref()
    }

    pub(crate) fn patient_directory(&self) -> Option<&Arc<dyn PatientDirectory>> {
        self.patient_directory.as_ref()
    }

    pub(crate) fn login_allowed(&self, key: &str) -> bool {
        self.login_limiter.check_key(&key.to_string()).is_ok()
    }

    pub(crate) fn token_allowed(&self, key: &str) -> bool {
        self.token_limiter.check_key(&key.to_string()).is_ok()
    }
}

#[cfg(feature = "jwks-fetch")]
fn default_fetcher() -> Option<Arc<dyn JwksFetcher>> {
    Some(Arc::new(clients::ReqwestJwksFetcher::default()))
}

#[cfg(not(feature = "jwks-fetch"))]
fn default_fetcher() -> Option<Arc<dyn JwksFetcher>> {
    None
}

/// Random URL-safe token with `bytes` bytes of entropy.
pub(crate) fn random_token(bytes: usize) -> String {
    use base64::Engine;
    use rand_core::RngCore;
    let mut buf = vec![0u8; bytes];
    rand_core::OsRng.fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Hex SHA-256 (storage key for codes, refresh tokens, secrets).
pub(crate) fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(s.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Constant-time string equality.
pub(crate) fn ct_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}
