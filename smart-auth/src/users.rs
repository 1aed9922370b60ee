//! User accounts: argon2id passwords, TOTP MFA with recovery codes, lockout, password resets.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use totp_rs::{Algorithm as TotpAlg, TOTP};

use crate::error::StoreError;
use crate::store::{now, AuthStore, AuthStoreExt, PasswordReset, User};
use crate::{ct_eq, random_token, sha256_hex, SmartConfig};

/// What `add_user` needs (CLI `kiln users add`).
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    pub username: String,
    pub password: String,
    /// `Patient/123`, `Practitioner/abc`, ...
    pub fhir_user: Option<String>,
    pub display_name: Option<String>,
    pub admin: bool,
    /// Patients this user may select in the standalone picker.
    pub patients: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown user")]
    UnknownUser,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub const MIN_PASSWORD_LEN: usize = 8;

pub fn hash_password(password: &str) -> Result<String, UserError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Invalid(format!("cannot hash password: {e}")))
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

fn valid_username(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 128
        && u.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
}

fn valid_fhir_user(f: &str) -> bool {
    let rel = f.rsplit('/').take(2).collect::<Vec<_>>();
    rel.len() == 2
        && [
            "Patient",
            "Practitioner",
            "PractitionerRole",
            "RelatedPerson",
            "Person",
        ]
        .contains(&rel[1])
        && !rel[0].is_empty()
}

/// Creates a user (argon2id password hash).
pub async fn add_user(store: &dyn AuthStore, new: NewUser) -> Result<User, UserError> {
    if !valid_username(&new.username) {
        return Err(UserError::Invalid(
            "username: 1-128 of [A-Za-z0-9._-@]".into(),
        ));
    }
    if new.password.chars().count() < MIN_PASSWORD_LEN {
        return Err(UserError::Invalid(format!(
            "password needs at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    if let Some(f) = &new.fhir_user {
        if !valid_fhir_user(f) {
            return Err(UserError::Invalid("fhirUser must reference a Patient, Practitioner, PractitionerRole, RelatedPerson or Person".into()));
        }
    }
    if store.get_user(&new.username).await?.is_some() {
        return Err(UserError::Invalid(format!("user {} exists", new.username)));
    }
    let mut patients = new.patients;
    if let Some(id) = new
        .fhir_user
        .as_deref()
        .and_then(|f| f.strip_prefix("Patient/"))
    {
        if !patients.iter().any(|p| p == id) {
            patients.insert(0, id.to_string());
        }
    }
    let user = User {
        username: new.username,
        password_hash: hash_password(&new.password)?,
        fhir_user: new.fhir_user,
        display_name: new.display_name,
        admin: new.admin,
        patients,
        totp_secret: None,
        totp_enabled: false,
        totp_last_step: None,
        recovery_codes: Vec::new(),
        failed_logins: 0,
        locked_until: None,
        created_at: now(),
    };
    store.put_user(&user).await?;
    Ok(user)
}

/// Result of a login attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    Success(String),
    /// Password right, TOTP (or recovery code) needed.
    MfaRequired,
    InvalidCredentials,
    Locked,
}

fn totp_for(secret_b32: &str, username: &str) -> Option<TOTP> {
    let bytes = totp_rs::Secret::Encoded(secret_b32.to_string())
        .to_bytes()
        .ok()?;
    let _ = username;
    TOTP::new_unchecked(TotpAlg::SHA1, 6, 1, 30, bytes).into()
}

/// Verifies a 6-digit code against the previous, current and next 30 s step; returns the matched
/// step if it is later than `last_step` (a code is accepted once: no replay within its window).
fn check_totp(secret_b32: &str, username: &str, code: &str, last_step: Option<u64>) -> Option<u64> {
    let code = code.trim();
    if code.len() != 6 || !code.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let totp = totp_for(secret_b32, username)?;
    let current = now().max(0) as u64 / 30;
    (current.saturating_sub(1)..=current + 1)
        .filter(|step| last_step.is_none_or(|l| *step > l))
        .find(|step| ct_eq(&totp.generate(step * 30), code))
}

/// Checks password (+ MFA code when enrolled), counting failures and locking the account after
/// `max_failed_logins`. The same answer is given for unknown users and wrong passwords.
pub async fn verify_login(
    store: &dyn AuthStore,
    config: &SmartConfig,
    username: &str,
    password: &str,
    mfa_code: Option<&str>,
) -> Result<LoginOutcome, StoreError> {
    let Some(mut user) = store.get_user(username).await? else {
        // Spend comparable time on unknown users (no user-name probing by timing).
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let dummy = DUMMY.get_or_init(|| hash_password("dummy password").unwrap_or_default());
        let _ = verify_password(password, dummy);
        return Ok(LoginOutcome::InvalidCredentials);
    };
    let now = now();
    if user.locked_until.is_some_and(|t| t > now) {
        return Ok(LoginOutcome::Locked);
    }
    let mut ok = verify_password(password, &user.password_hash);
    let mut mfa_missing = false;
    if ok && user.totp_enabled {
        match mfa_code.map(str::trim).filter(|c| !c.is_empty()) {
            None => mfa_missing = true,
            Some(code) => {
                let step = user
                    .totp_secret
                    .as_deref()
                    .and_then(|s| check_totp(s, &user.username, code, user.totp_last_step));
                if let Some(step) = step {
                    user.totp_last_step = Some(step);
                } else {
                    // Recovery code (single use).
                    let h = sha256_hex(&code.replace('-', "").to_ascii_lowercase());
                    if let Some(i) = user.recovery_codes.iter().position(|r| ct_eq(r, &h)) {
                        user.recovery_codes.remove(i);
                    } else {
                        ok = false;
                    }
                }
            }
        }
    }
    if mfa_missing {
        return Ok(LoginOutcome::MfaRequired);
    }
    if ok {
        user.failed_logins = 0;
        user.locked_until = None;
        store.put_user(&user).await?;
        Ok(LoginOutcome::Success(user.username))
    } else {
        user.failed_logins += 1;
        let locked = user.failed_logins >= config.max_failed_logins;
        if locked {
            user.locked_until = Some(now + config.lockout_seconds);
            user.failed_logins = 0;
        }
        store.put_user(&user).await?;
        Ok(if locked {
            LoginOutcome::Locked
        } else {
            LoginOutcome::InvalidCredentials
        })
    }
}

/// TOTP enrolment data shown to the user.
#[derive(Debug, Clone)]
pub struct TotpEnrolment {
    /// Base32 secret.
    pub secret: String,
    /// `otpauth://totp/...` URI for authenticator apps.
    pub otpauth_uri: String,
}

/// Starts TOTP enrolment (stores a pending secret; MFA is not enforced until confirmed).
pub async fn enrol_totp(
    store: &dyn AuthStore,
    username: &str,
    issuer: &str,
) -> Result<TotpEnrolment, UserError> {
    let mut user = store
        .get_user(username)
        .await?
        .ok_or(UserError::UnknownUser)?;
    let mut raw = [0u8; 20];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
    let secret = totp_rs::Secret::Raw(raw.to_vec()).to_encoded().to_string();
    user.totp_secret = Some(secret.clone());
    user.totp_enabled = false;
    store.put_user(&user).await?;
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    Ok(TotpEnrolment {
        otpauth_uri: format!(
            "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits=6&period=30",
            enc(issuer),
            enc(username),
            secret,
            enc(issuer)
        ),
        secret,
    })
}

/// Confirms enrolment with a current code; returns 10 single-use recovery codes.
pub async fn confirm_totp(
    store: &dyn AuthStore,
    username: &str,
    code: &str,
) -> Result<Vec<String>, UserError> {
    let mut user = store
        .get_user(username)
        .await?
        .ok_or(UserError::UnknownUser)?;
    let secret = user
        .totp_secret
        .clone()
        .ok_or_else(|| UserError::Invalid("no TOTP enrolment in progress".into()))?;
    let Some(step) = check_totp(&secret, username, code, None) else {
        return Err(UserError::Invalid("wrong TOTP code".into()));
    };
    user.totp_last_step = Some(step);
    let codes: Vec<String> = (0..10)
        .map(|_| {
            let t = random_token(8)
                .to_ascii_lowercase()
                .replace(['-', '_'], "x");
            t.chars().take(10).collect()
        })
        .collect();
    user.recovery_codes = codes.iter().map(|c| sha256_hex(c)).collect();
    user.totp_enabled = true;
    store.put_user(&user).await?;
    Ok(codes)
}

/// Current TOTP code for a secret (for tests and admin tooling).
pub fn current_totp(secret_b32: &str) -> Option<String> {
    totp_at(secret_b32, now())
}

/// TOTP code for a secret at a unix time.
pub fn totp_at(secret_b32: &str, unix_time: i64) -> Option<String> {
    totp_for(secret_b32, "").map(|t| t.generate(unix_time.max(0) as u64))
}

pub async fn set_password(
    store: &dyn AuthStore,
    username: &str,
    password: &str,
) -> Result<(), UserError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(UserError::Invalid(format!(
            "password needs at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    let mut user = store
        .get_user(username)
        .await?
        .ok_or(UserError::UnknownUser)?;
    user.password_hash = hash_password(password)?;
    user.failed_logins = 0;
    user.locked_until = None;
    store.put_user(&user).await?;
    Ok(())
}

/// Issues a single-use password reset token (valid `ttl_secs`). Deliver it out of band.
pub async fn create_password_reset(
    store: &dyn AuthStore,
    username: &str,
    ttl_secs: i64,
) -> Result<String, UserError> {
    store
        .get_user(username)
        .await?
        .ok_or(UserError::UnknownUser)?;
    let token = random_token(32);
    store
        .put_password_reset(
            &sha256_hex(&token),
            &PasswordReset {
                username: username.to_string(),
                expires_at: now() + ttl_secs,
            },
        )
        .await?;
    Ok(token)
}

/// Consumes a reset token and sets the new password; returns the user name.
pub async fn reset_password(
    store: &dyn AuthStore,
    token: &str,
    new_password: &str,
) -> Result<String, UserError> {
    if new_password.chars().count() < MIN_PASSWORD_LEN {
        return Err(UserError::Invalid(format!(
            "password needs at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    let r = store
        .take_password_reset(&sha256_hex(token))
        .await?
        .ok_or_else(|| UserError::Invalid("invalid or expired reset token".into()))?;
    set_password(store, &r.username, new_password).await?;
    Ok(r.username)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryAuthStore;

    fn cfg() -> SmartConfig {
        let mut c = SmartConfig::new("http://localhost/fhir");
        c.max_failed_logins = 3;
        c
    }

    #[tokio::test]
    async fn password_lockout_and_reset() {
        let s = MemoryAuthStore::new();
        let c = cfg();
        assert!(add_user(
            &s,
            NewUser {
                username: "bad name".into(),
                password: "longenough".into(),
                ..Default::default()
            }
        )
        .await
        .is_err());
        assert!(add_user(
            &s,
            NewUser {
                username: "a".into(),
                password: "short".into(),
                ..Default::default()
            }
        )
        .await
        .is_err());
        let u = add_user(
            &s,
            NewUser {
                username: "alice".into(),
                password: "correct horse".into(),
                fhir_user: Some("Patient/p1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(u.password_hash.starts_with("$argon2id$"));
        assert_eq!(u.patients, vec!["p1".to_string()]);
        assert!(add_user(
            &s,
            NewUser {
                username: "alice".into(),
                password: "correct horse".into(),
                ..Default::default()
            }
        )
        .await
        .is_err());
        assert_eq!(
            verify_login(&s, &c, "alice", "correct horse", None)
                .await
                .unwrap(),
            LoginOutcome::Success("alice".into())
        );
        assert_eq!(
            verify_login(&s, &c, "nobody", "x", None).await.unwrap(),
            LoginOutcome::InvalidCredentials
        );
        assert_eq!(
            verify_login(&s, &c, "alice", "wrong", None).await.unwrap(),
            LoginOutcome::InvalidCredentials
        );
        assert_eq!(
            verify_login(&s, &c, "alice", "wrong", None).await.unwrap(),
            LoginOutcome::InvalidCredentials
        );
        assert_eq!(
            verify_login(&s, &c, "alice", "wrong", None).await.unwrap(),
            LoginOutcome::Locked
        );
        // Locked even with the right password.
        assert_eq!(
            verify_login(&s, &c, "alice", "correct horse", None)
                .await
                .unwrap(),
            LoginOutcome::Locked
        );
        let t = create_password_reset(&s, "alice", 600).await.unwrap();
        assert_eq!(
            reset_password(&s, &t, "new password!").await.unwrap(),
            "alice"
        );
        assert!(
            reset_password(&s, &t, "new password!").await.is_err(),
            "single use"
        );
        assert_eq!(
            verify_login(&s, &c, "alice", "new password!", None)
                .await
                .unwrap(),
            LoginOutcome::Success("alice".into())
        );
    }

    #[tokio::test]
    async fn totp_mfa_and_recovery_codes() {
        let s = MemoryAuthStore::new();
        let c = cfg();
        add_user(
            &s,
            NewUser {
                username: "bob".into(),
                password: "password123".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let e = enrol_totp(&s, "bob", "Kiln").await.unwrap();
        assert!(e.otpauth_uri.starts_with("otpauth://totp/Kiln:bob?secret="));
        // Not enforced before confirmation.
        assert_eq!(
            verify_login(&s, &c, "bob", "password123", None)
                .await
                .unwrap(),
            LoginOutcome::Success("bob".into())
        );
        assert!(confirm_totp(&s, "bob", "000000x").await.is_err());
        let code = current_totp(&e.secret).unwrap();
        let recovery = confirm_totp(&s, "bob", &code).await.unwrap();
        assert_eq!(recovery.len(), 10);
        assert_eq!(
            verify_login(&s, &c, "bob", "password123", None)
                .await
                .unwrap(),
            LoginOutcome::MfaRequired
        );
        // The confirmation code can't be replayed; the next step's code works (±1 step skew).
        assert_eq!(
            verify_login(&s, &c, "bob", "password123", Some(&code))
                .await
                .unwrap(),
            LoginOutcome::InvalidCredentials
        );
        let next = totp_at(&e.secret, now() + 30).unwrap();
        assert_eq!(
            verify_login(&s, &c, "bob", "password123", Some(&next))
                .await
                .unwrap(),
            LoginOutcome::Success("bob".into())
        );
        assert_eq!(
            verify_login(&s, &c, "bob", "password123", Some(&next))
                .await
                .unwrap(),
            LoginOutcome::InvalidCredentials,
            "replay"
        );
        assert_eq!(
            verify_login(&s, &c, "bob", "password123", Some("12345x"))
                .await
                .unwrap(),
            LoginOutcome::InvalidCredentials
        );
        assert_eq!(
            verify_login(&s, &c, "bob", "password123", Some(&recovery[0]))
                .await
                .unwrap(),
            LoginOutcome::Success("bob".into())
        );
        assert_eq!(
            verify_login(&s, &c, "bob", "password123", Some(&recovery[0]))
                .await
                .unwrap(),
            LoginOutcome::InvalidCredentials,
            "recovery codes are single use"
        );
    }
}
