//! Server-rendered, accessible pages (no external assets, no scripts).

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem;line-height:1.5;color:#111}\
label{display:block;margin:.75rem 0 .25rem;font-weight:600}input[type=text],input[type=password],input[type=search]{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box}\
button{padding:.5rem 1.25rem;font-size:1rem;margin:1rem .5rem 0 0;cursor:pointer}\
.error{border:2px solid #a00;background:#fee;padding:.5rem 1rem}fieldset{border:1px solid #888;padding:.5rem 1rem}\
li{list-style:none;margin:.35rem 0}li label{display:inline;font-weight:400}code{background:#eee;padding:0 .2rem}\
:focus{outline:3px solid #1a5fb4;outline-offset:2px}";

pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{t}</title>\
<style>{STYLE}</style></head><body><main><h1>{t}</h1>{body}</main></body></html>",
        t = escape(title)
    )
}

fn error_box(error: Option<&str>) -> String {
    error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default()
}

pub fn login(req: Option<&str>, error: Option<&str>, username: &str, show_mfa: bool) -> String {
    let req_field = req
        .map(|r| {
            format!(
                "<input type=\"hidden\" name=\"req\" value=\"{}\">",
                escape(r)
            )
        })
        .unwrap_or_default();
    let mfa = if show_mfa {
        "<label for=\"mfa_code\">Authenticator code or recovery code</label>\
<input type=\"text\" id=\"mfa_code\" name=\"mfa_code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required>"
    } else {
        "<label for=\"mfa_code\">Authenticator code (if enabled)</label>\
<input type=\"text\" id=\"mfa_code\" name=\"mfa_code\" inputmode=\"numeric\" autocomplete=\"one-time-code\">"
    };
    page(
        "Sign in",
        &format!(
            "{err}<form method=\"post\" action=\"login\">{req_field}\
<label for=\"username\">User name</label>\
<input type=\"text\" id=\"username\" name=\"username\" autocomplete=\"username\" value=\"{u}\" required>\
<label for=\"password\">Password</label>\
<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
{mfa}<button type=\"submit\">Sign in</button></form>",
            err = error_box(error),
            u = escape(username)
        ),
    )
}

pub fn picker(
    req: &str,
    csrf: &str,
    patients: &[(String, String)],
    query: &str,
    allow_free_entry: bool,
    error: Option<&str>,
) -> String {
    let mut list = String::new();
    for (i, (id, name)) in patients.iter().enumerate() {
        list.push_str(&format!(
            "<li><input type=\"radio\" name=\"patient\" id=\"p{i}\" value=\"{id}\"{checked}> \
<label for=\"p{i}\">{name} <code>Patient/{id}</code></label></li>",
            id = escape(id),
            name = escape(name),
            checked = if i == 0 { " checked" } else { "" }
        ));
    }
    if patients.is_empty() {
        list.push_str("<li>No patients found.</li>");
    }
    let free = if allow_free_entry {
        "<label for=\"patient_id\">Or enter a patient id</label><input type=\"text\" id=\"patient_id\" name=\"patient_id\">"
    } else {
        ""
    };
    page(
        "Select a patient",
        &format!(
            "{err}<form method=\"get\" action=\"select-patient\" role=\"search\">\
<input type=\"hidden\" name=\"req\" value=\"{req}\">\
<label for=\"q\">Search patients by name or identifier</label><input type=\"search\" id=\"q\" name=\"q\" value=\"{q}\">\
<button type=\"submit\">Search</button></form>\
<form method=\"post\" action=\"select-patient\"><input type=\"hidden\" name=\"req\" value=\"{req}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><fieldset><legend>Patients</legend><ul>{list}</ul></fieldset>{free}\
<button type=\"submit\">Continue</button></form>",
            err = error_box(error),
            req = escape(req),
            csrf = escape(csrf),
            q = escape(query)
        ),
    )
}

/// The standalone encounter picker: the chosen patient's encounters, most recent first.
pub fn encounter_picker(
    req: &str,
    csrf: &str,
    patient: &str,
    patient_name: Option<&str>,
    encounters: &[crate::EncounterChoice],
    error: Option<&str>,
) -> String {
    let mut list = String::new();
    for (i, e) in encounters.iter().enumerate() {
        let mut details = Vec::new();
        if let Some(p) = &e.period {
            details.push(escape(p));
        }
        if let Some(st) = &e.status {
            details.push(escape(st));
        }
        let details = if details.is_empty() {
            String::new()
        } else {
            format!(" ({})", details.join(", "))
        };
        list.push_str(&format!(
            "<li><input type=\"radio\" name=\"encounter\" id=\"e{i}\" value=\"{id}\"{checked}> \
<label for=\"e{i}\">{d}{details} <code>Encounter/{id}</code></label></li>",
            id = escape(&e.id),
            d = escape(&e.description),
            checked = if i == 0 { " checked" } else { "" }
        ));
    }
    let who = match patient_name {
        Some(n) => format!("{} <code>Patient/{}</code>", escape(n), escape(patient)),
        None => format!("<code>Patient/{}</code>", escape(patient)),
    };
    page(
        "Select an encounter",
        &format!(
            "{err}<p>Patient: {who}</p>\
<form method=\"post\" action=\"select-encounter\"><input type=\"hidden\" name=\"req\" value=\"{req}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><fieldset><legend>Encounters, most recent first</legend>\
<ul>{list}</ul></fieldset><button type=\"submit\">Continue</button></form>",
            err = error_box(error),
            req = escape(req),
            csrf = escape(csrf)
        ),
    )
}

#[allow(clippy::too_many_arguments)]
pub fn consent(
    req: &str,
    csrf: &str,
    client_name: &str,
    user: &str,
    patient: Option<&str>,
    encounter: Option<&str>,
    scopes: &[(String, String)],
    offline: bool,
) -> String {
    let mut items = String::new();
    for (i, (scope, desc)) in scopes.iter().enumerate() {
        items.push_str(&format!(
            "<li><input type=\"checkbox\" name=\"scope\" id=\"s{i}\" value=\"{s}\" checked> \
<label for=\"s{i}\">{d} <code>{s}</code></label></li>",
            s = escape(scope),
            d = escape(desc)
        ));
    }
    let patient_line = patient
        .map(|p| {
            format!(
                "<p>Patient in context: <code>Patient/{}</code></p>",
                escape(p)
            )
        })
        .unwrap_or_default();
    let encounter_line = encounter
        .map(|e| {
            format!(
                "<p>Encounter in context: <code>Encounter/{}</code></p>",
                escape(e)
            )
        })
        .unwrap_or_default();
    let offline_line = if offline {
        "<p><strong>This application asks for offline access:</strong> it can keep accessing the data \
below after you sign out, until you revoke it.</p>"
    } else {
        ""
    };
    page(
        "Authorize application",
        &format!(
            "<p><strong>{c}</strong> asks to access data as <strong>{u}</strong>.</p>{patient_line}{encounter_line}{offline_line}\
<form method=\"post\" action=\"consent\"><input type=\"hidden\" name=\"req\" value=\"{req}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<fieldset><legend>Permissions (untick any you do not want to grant)</legend><ul>{items}</ul></fieldset>\
<button type=\"submit\" name=\"decision\" value=\"approve\">Allow</button>\
<button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
            c = escape(client_name),
            u = escape(user),
            req = escape(req),
            csrf = escape(csrf)
        ),
    )
}

pub fn message(title: &str, text: &str) -> String {
    page(title, &format!("<p>{}</p>", escape(text)))
}

pub fn mfa_status(csrf: &str, enabled: bool, recovery_left: usize) -> String {
    let body = if enabled {
        format!(
            "<p>Two-step sign-in is <strong>on</strong>. Recovery codes left: {recovery_left}.</p>\
<form method=\"post\" action=\"mfa\"><input type=\"hidden\" name=\"csrf\" value=\"{c}\">\
<button type=\"submit\" name=\"action\" value=\"enrol\">Replace authenticator</button></form>",
            c = escape(csrf)
        )
    } else {
        format!(
            "<p>Two-step sign-in is <strong>off</strong>.</p>\
<form method=\"post\" action=\"mfa\"><input type=\"hidden\" name=\"csrf\" value=\"{c}\">\
<button type=\"submit\" name=\"action\" value=\"enrol\">Set up an authenticator app</button></form>",
            c = escape(csrf)
        )
    };
    page("Two-step sign-in", &body)
}

pub fn mfa_enrol(csrf: &str, secret: &str, uri: &str, error: Option<&str>) -> String {
    page(
        "Set up your authenticator",
        &format!(
            "{err}<p>Add this key to your authenticator app (time-based, 6 digits, 30 seconds):</p>\
<p><code>{s}</code></p><p>Or open this link on your phone: <code>{u}</code></p>\
<form method=\"post\" action=\"mfa\"><input type=\"hidden\" name=\"csrf\" value=\"{c}\">\
<label for=\"code\">Code shown by the app</label>\
<input type=\"text\" id=\"code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required>\
<button type=\"submit\" name=\"action\" value=\"confirm\">Turn on</button></form>",
            err = error_box(error),
            s = escape(secret),
            u = escape(uri),
            c = escape(csrf)
        ),
    )
}

pub fn mfa_recovery_codes(codes: &[String]) -> String {
    let items: String = codes
        .iter()
        .map(|c| format!("<li><code>{}</code></li>", escape(c)))
        .collect();
    page(
        "Two-step sign-in is on",
        &format!(
            "<p>Keep these recovery codes somewhere safe. Each works once, in place of an \
authenticator code.</p><ul>{items}</ul>"
        ),
    )
}

pub fn password_reset(token: &str, error: Option<&str>) -> String {
    page(
        "Choose a new password",
        &format!(
            "{err}<form method=\"post\" action=\"password-reset\">\
<input type=\"hidden\" name=\"token\" value=\"{t}\">\
<label for=\"password\">New password (at least 8 characters)</label>\
<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"new-password\" minlength=\"8\" required>\
<button type=\"submit\">Set password</button></form>",
            err = error_box(error),
            t = escape(token)
        ),
    )
}
