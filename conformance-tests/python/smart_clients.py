#!/usr/bin/env python3
"""Real Python SMART clients against a running Kiln, driven by conformance-tests/tests/smart_clients.rs.

  smart_clients.py standalone <config.json>
      SMART's `fhirclient` (PyPI) does a standalone launch: it reads Kiln's CapabilityStatement
      (oauth-uris), builds the authorization URL itself (PKCE S256: fhirclient >= 4.2 always sends
      code_challenge/code_challenge_method=S256), and after the user-agent steps exchanges the
      code with its code_verifier and reads the patient in context. The user-agent steps
      (login form, consent form) are done with `requests`, parsing Kiln's HTML like a browser.
  smart_clients.py backend <config.json>
      Backend services: a JWT client assertion signed with PyJWT + cryptography (RS384 and ES384,
      keys handed over as DER), given to `fhirclient` as `jwt_token`; fhirclient's
      client_credentials grant gets a system token, then reads resources with it. The same
      assertion is then replayed with `requests` and must be refused.

Prints one JSON object on stdout; the Rust test asserts on it. Only Kiln's URLs are fetched: the
redirect to the app's redirect_uri is never followed.
"""
import base64
import json
import sys
import time
import uuid
from datetime import datetime
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlsplit

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from fhirclient import client
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient


class Form(HTMLParser):
    """The first POST form of a page: action, hidden fields, checkboxes (value, checked), radios."""

    def __init__(self):
        super().__init__()
        self.action = None
        self.hidden = {}
        self.checkboxes = []
        self.radios = []
        self.alert = None
        self._in_alert = False
        self._done = False
        self._in_form = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and not self._done and (a.get("method") or "").lower() == "post":
            self.action = a.get("action")
            self._in_form = True
        elif tag == "input" and self._in_form:
            t = (a.get("type") or "text").lower()
            if t == "hidden":
                self.hidden[a.get("name")] = a.get("value") or ""
            elif t == "checkbox":
                self.checkboxes.append((a.get("name"), a.get("value"), "checked" in a))
            elif t == "radio":
                self.radios.append((a.get("name"), a.get("value"), "checked" in a))
        if a.get("role") == "alert":
            self._in_alert = True

    def handle_endtag(self, tag):
        if tag == "form" and self._in_form:
            self._in_form = False
            self._done = True
        if self._in_alert and tag in ("p", "div"):
            self._in_alert = False

    def handle_data(self, data):
        if self._in_alert:
            self.alert = (self.alert or "") + data


def parse_form(html):
    f = Form()
    f.feed(html)
    return f


def user_agent(session, start_url, cfg, report):
    """Follows Kiln's pages from the authorization URL to the redirect back to the app."""
    base = cfg["base"]
    redirect_uri = cfg["redirect_uri"]
    url = start_url
    method, data = "GET", None
    for _ in range(12):
        if method == "GET":
            r = session.get(url, allow_redirects=False)
        else:
            r = session.post(url, data=data, allow_redirects=False)
        report["steps"].append(f"{method} {urlsplit(url).path} -> {r.status_code}")
        if r.status_code in (302, 303):
            nxt = urljoin(url, r.headers["Location"])
            if nxt.startswith(redirect_uri):
                return nxt
            if not nxt.startswith(base):
                raise Exception(f"redirected off Kiln to {nxt}")
            url, method, data = nxt, "GET", None
            continue
        if r.status_code != 200:
            raise Exception(f"{method} {url}: {r.status_code} {r.text[:300]}")
        form = parse_form(r.text)
        path = urlsplit(url).path
        action = urljoin(url, form.action or "")
        if path.endswith("/auth/login"):
            data = dict(form.hidden)
            data.update({"username": cfg["username"], "password": cfg["password"]})
        elif path.endswith("/auth/select-patient"):
            data = dict(form.hidden)
            data["patient"] = cfg["pick_patient"]
        elif path.endswith("/auth/consent"):
            offered = [v for (n, v, _c) in form.checkboxes if n == "scope"]
            report["consent_offered"] = offered
            keep = [v for v in offered if v not in cfg.get("untick", [])]
            data = list(form.hidden.items()) + [("scope", v) for v in keep] + [("decision", "approve")]
        else:
            raise Exception(f"unexpected page {url}")
        url, method = action, "POST"
    raise Exception("too many steps")


def standalone(cfg):
    report = {"steps": []}
    settings = {
        "app_id": cfg["client_id"],
        "api_base": cfg["base"],
        "redirect_uri": cfg["redirect_uri"],
        "scope": cfg["scope"],
    }
    smart = client.FHIRClient(settings=settings)
    smart.wants_patient = False  # cfg["scope"] already asks for launch/patient
    auth_url = smart.authorize_url  # fetches /metadata, builds the URL with PKCE
    q = parse_qs(urlsplit(auth_url).query)
    report["authorize_params"] = {k: v[0] for k, v in q.items()}
    callback = user_agent(requests.Session(), auth_url, cfg, report)
    report["callback_has_code"] = "code" in parse_qs(urlsplit(callback).query)
    smart.handle_callback(callback)  # code + code_verifier → token
    ctx = smart.launch_context or {}
    report["token"] = {k: v for k, v in ctx.items() if k not in ("id_token",)}
    report["has_id_token"] = "id_token" in ctx
    report["patient_id"] = smart.patient_id
    p = smart.patient
    report["patient"] = p.as_json() if p is not None else None
    report["patient_name"] = smart.human_name(p.name[0]) if p is not None and p.name else None
    # The same token, through fhirclient's models: a search in the patient's compartment.
    obs = Observation.where(struct={"patient": smart.patient_id}).perform_resources(smart.server)
    report["observations"] = sorted(o.id for o in obs)
    return report


def backend(cfg):
    report = {"clients": []}
    conf = requests.get(cfg["base"] + "/.well-known/smart-configuration").json()
    token_url = conf["token_endpoint"]
    for c in cfg["clients"]:
        out = {"client_id": c["client_id"], "alg": c["alg"]}
        key = serialization.load_der_private_key(base64.b64decode(c["der_b64"]), password=None)
        now = int(time.time())
        assertion = jwt.encode(
            {"iss": c["client_id"], "sub": c["client_id"], "aud": token_url,
             "exp": now + 240, "iat": now, "jti": str(uuid.uuid4())},
            key, algorithm=c["alg"], headers={"kid": c["kid"], "typ": "JWT"})
        smart = client.FHIRClient(settings={
            "app_id": c["client_id"], "api_base": cfg["base"], "jwt_token": assertion,
            "scope": cfg["scope"]})
        smart.wants_patient = False
        smart.prepare()  # reads /metadata: token endpoint from the oauth-uris extension
        smart.authorize()  # client_credentials with the assertion
        ctx = smart.launch_context or {}
        out["token"] = ctx
        out["has_refresh_token"] = smart.server.auth.refresh_token is not None
        # fhirclient turns expires_in into expires_at (and drops it from the context)
        exp_at = smart.server.auth.expires_at
        out["expires_in"] = round((exp_at - datetime.now()).total_seconds()) if exp_at else None
        access = smart.server.auth.access_token
        out["access_token_header"] = jwt.get_unverified_header(access)
        p = Patient.read(cfg["read_patient"], smart.server)
        out["patient_family"] = p.name[0].family if p.name else None
        # replayed assertion (same jti) must be refused
        r = requests.post(token_url, data={
            "grant_type": "client_credentials", "scope": cfg["scope"],
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion})
        out["replay_status"] = r.status_code
        out["replay_error"] = (r.json() if r.headers.get("content-type", "").startswith("application/json") else {}).get("error")
        # and the system token works without the client library too
        r = requests.get(cfg["base"] + "/Patient", headers={"Authorization": "Bearer " + access,
                                                             "Accept": "application/fhir+json"})
        out["patient_search_status"] = r.status_code
        out["patient_search_total"] = len(r.json().get("entry", [])) if r.status_code == 200 else None
        report["clients"].append(out)
    return report


def main():
    mode, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        cfg = json.load(f)
    try:
        result = standalone(cfg) if mode == "standalone" else backend(cfg)
        result["ok"] = True
    except Exception as e:  # reported to the Rust test, which fails with it
        import traceback
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
