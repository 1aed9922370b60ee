//! Stand-alone demo of the authorization server (in-memory store) for manual and browser testing:
//! `cargo run -p kiln-smart-auth --example demo -- 8765` then open
//! http://127.0.0.1:8765/fhir/.well-known/smart-configuration. Users: `pat` / `patient-password`
//! (Patient/p1), `doc` / `doctor-password` (admin, Practitioner/dr1). Public client `demo-app`
//! with redirect URI http://127.0.0.1:8765/callback. Dynamic registration is on.

use std::net::SocketAddr;
use std::sync::Arc;

use kiln_smart_auth::*;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(8765);
    let base = format!("http://127.0.0.1:{port}/fhir");
    let store: Arc<dyn AuthStore> = Arc::new(MemoryAuthStore::new());
    let mut config = SmartConfig::new(&base);
    config.dynamic_registration = true;
    let state = AuthState::new(config, store.clone()).await?;
    add_user(
        store.as_ref(),
        NewUser {
            username: "pat".into(),
            password: "patient-password".into(),
            fhir_user: Some("Patient/p1".into()),
            display_name: Some("Pat Patient".into()),
            ..Default::default()
        },
    )
    .await?;
    add_user(
        store.as_ref(),
        NewUser {
            username: "doc".into(),
            password: "doctor-password".into(),
            fhir_user: Some("Practitioner/dr1".into()),
            patients: vec!["p1".into(), "p2".into()],
            admin: true,
            ..Default::default()
        },
    )
    .await?;
    add_client(
        store.as_ref(),
        NewClient {
            client_id: Some("demo-app".into()),
            client_name: "Demo App".into(),
            redirect_uris: vec![format!("http://127.0.0.1:{port}/callback")],
            ..Default::default()
        },
    )
    .await?;
    let app = axum::Router::new().nest("/fhir", router(state));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {base}");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
