//! Account pages: TOTP enrolment and MFA sign-in, password reset, logout.

mod common;

use axum::http::StatusCode;
use common::*;
use kiln_smart_auth::users::{create_password_reset, current_totp, totp_at};

fn first_code(html: &str) -> String {
    let i = html.find("<code>").expect("code element") + "<code>".len();
    html[i..].split('<').next().unwrap().to_string()
}

#[tokio::test]
async fn totp_enrolment_and_mfa_login() {
    let s = server().await;
    let r = s.get("/auth/mfa", &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "needs a session");
    let cookie = s.login("doc", "doctor-password").await;
    let ck = [("cookie", cookie.as_str())];
    let r = s.get("/auth/mfa", &ck).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("<strong>off</strong>"));
    let csrf = hidden(&r.body, "csrf");
    assert_eq!(
        s.post_form("/auth/mfa", &[("csrf", "forged"), ("action", "enrol")], &ck)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let r = s
        .post_form("/auth/mfa", &[("csrf", &csrf), ("action", "enrol")], &ck)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let secret = first_code(&r.body);
    assert!(r.body.contains("otpauth://totp/"));
    let r = s
        .post_form(
            "/auth/mfa",
            &[("csrf", &csrf), ("action", "confirm"), ("code", "123")],
            &ck,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let code = current_totp(&secret).unwrap();
    let r = s
        .post_form(
            "/auth/mfa",
            &[("csrf", &csrf), ("action", "confirm"), ("code", &code)],
            &ck,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let recovery = first_code(&r.body);
    assert_eq!(r.body.matches("<li><code>").count(), 10);

    // Password alone is no longer enough.
    let r = s
        .post_form(
            "/auth/login",
            &[("username", "doc"), ("password", "doctor-password")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("set-cookie").is_none());
    assert!(r.body.contains("name=\"mfa_code\"") && r.body.contains("required>"));
    let login = |code: String| {
        let s = &s;
        async move {
            s.post_form(
                "/auth/login",
                &[
                    ("username", "doc"),
                    ("password", "doctor-password"),
                    ("mfa_code", &code),
                ],
                &[],
            )
            .await
        }
    };
    // The code that confirmed enrolment can't be replayed; the next time step's code works.
    assert_eq!(login(code.clone()).await.status, StatusCode::UNAUTHORIZED);
    let r = login(totp_at(&secret, chrono::Utc::now().timestamp() + 30).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("set-cookie").is_some());
    let r = s
        .post_form(
            "/auth/login",
            &[
                ("username", "doc"),
                ("password", "doctor-password"),
                ("mfa_code", &recovery),
            ],
            &[],
        )
        .await;
    assert!(r.header("set-cookie").is_some(), "recovery code works once");
    let r = s
        .post_form(
            "/auth/login",
            &[
                ("username", "doc"),
                ("password", "doctor-password"),
                ("mfa_code", &recovery),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Logout ends the session.
    let r = s.post_form("/auth/logout", &[], &ck).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(s.get("/auth/mfa", &ck).await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn password_reset_page() {
    let s = server().await;
    let token = create_password_reset(s.state.store(), "pat", 600)
        .await
        .unwrap();
    let r = s
        .get(&format!("/auth/password-reset?token={token}"), &[])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("<label for=\"password\">"));
    let r = s
        .post_form(
            "/auth/password-reset",
            &[("token", &token), ("password", "short")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = s
        .post_form(
            "/auth/password-reset",
            &[("token", &token), ("password", "a brand new password")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = s
        .post_form(
            "/auth/password-reset",
            &[("token", &token), ("password", "another password")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "token is single use");
    assert_eq!(
        s.post_form(
            "/auth/login",
            &[("username", "pat"), ("password", "patient-password")],
            &[]
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    s.login("pat", "a brand new password").await;
}
