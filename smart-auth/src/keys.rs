//! Our token-signing keys: RSA 2048, RS256, generated on first start and persisted in the store.
//! Rotation retires the signing key but keeps it in the JWKS until the tokens it signed expire.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::StoreError;
use crate::store::{now, AuthStore, AuthStoreExt, SigningKeyRecord};

/// A loaded signing key.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    /// Public JWK (`kty`, `kid`, `use`, `alg`, `n`, `e`).
    pub jwk: Value,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish()
    }
}

/// Generates a fresh RSA-2048 key record.
pub fn generate_rsa_key() -> Result<SigningKeyRecord, StoreError> {
    let mut rng = rand_core::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, 2048)
        .map_err(|e| StoreError::Backend(format!("RSA key generation failed: {e}")))?;
    let der = key
        .to_pkcs1_der()
        .map_err(|e| StoreError::Backend(format!("RSA key encoding failed: {e}")))?;
    let n = URL_SAFE_NO_PAD.encode(key.n().to_bytes_be());
    let e = URL_SAFE_NO_PAD.encode(key.e().to_bytes_be());
    Ok(SigningKeyRecord {
        kid: rsa_thumbprint(&n, &e),
        alg: "RS256".into(),
        private_key_der: STANDARD.encode(der.as_bytes()),
        created_at: now(),
        retired_at: None,
        expires_at: None,
    })
}

/// RFC 7638 JWK thumbprint of an RSA public key.
fn rsa_thumbprint(n: &str, e: &str) -> String {
    let canonical = format!("{{\"e\":\"{e}\",\"kty\":\"RSA\",\"n\":\"{n}\"}}");
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

impl SigningKey {
    pub fn from_record(r: &SigningKeyRecord) -> Result<SigningKey, StoreError> {
        let der = STANDARD
            .decode(&r.private_key_der)
            .map_err(|e| StoreError::Corrupt(format!("signing key {}: {e}", r.kid)))?;
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let key = rsa::RsaPrivateKey::from_pkcs1_der(&der)
            .map_err(|e| StoreError::Corrupt(format!("signing key {}: {e}", r.kid)))?;
        let n = URL_SAFE_NO_PAD.encode(key.n().to_bytes_be());
        let e = URL_SAFE_NO_PAD.encode(key.e().to_bytes_be());
        let decoding = DecodingKey::from_rsa_components(&n, &e)
            .map_err(|e| StoreError::Corrupt(format!("signing key {}: {e}", r.kid)))?;
        Ok(SigningKey {
            kid: r.kid.clone(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(&der),
            decoding,
            jwk: json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": r.kid, "n": n, "e": e}),
            created_at: r.created_at,
            retired_at: r.retired_at,
        })
    }
}

/// The published keys; `keys[0]` signs.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    pub keys: Vec<SigningKey>,
}

impl KeyRing {
    /// Loads the unexpired keys, generating (and persisting) one if none can sign.
    pub async fn load_or_create(store: &dyn AuthStore) -> Result<KeyRing, StoreError> {
        let mut records = store.list_signing_keys().await?;
        if !records.iter().any(|r| r.retired_at.is_none()) {
            let r = generate_rsa_key()?;
            store.put_signing_key(&r).await?;
            records.push(r);
        }
        Self::from_records(&records)
    }

    pub fn from_records(records: &[SigningKeyRecord]) -> Result<KeyRing, StoreError> {
        let mut keys = records
            .iter()
            .map(SigningKey::from_record)
            .collect::<Result<Vec<_>, _>>()?;
        // Active keys first (newest first), then retired ones.
        keys.sort_by_key(|k| (k.retired_at.is_some(), -k.created_at));
        Ok(KeyRing { keys })
    }

    pub fn active(&self) -> Option<&SigningKey> {
        self.keys.first().filter(|k| k.retired_at.is_none())
    }

    pub fn find(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    pub fn jwks(&self) -> Value {
        json!({"keys": self.keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
    }
}

/// Retires the active key(s) and creates a new one. Old keys stay published for
/// `keep_published_secs` (the longest lifetime of a token they signed), then expire from the store.
pub async fn rotate_keys(
    store: &dyn AuthStore,
    keep_published_secs: i64,
) -> Result<KeyRing, StoreError> {
    let now = now();
    for mut r in store.list_signing_keys().await? {
        if r.retired_at.is_none() {
            r.retired_at = Some(now);
            r.expires_at = Some(now + keep_published_secs);
            store.put_signing_key(&r).await?;
        }
    }
    let fresh = generate_rsa_key()?;
    store.put_signing_key(&fresh).await?;
    KeyRing::load_or_create(store).await
}
