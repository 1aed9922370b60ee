#!/usr/bin/env python3
# Manual interop check. Needs: pip install pyjwt cryptography requests; then
#   cargo run -p kiln-smart-auth --example demo -- 8766 &   python3 smart-auth/scripts/interop_backend_services.py
# Independent client (PyJWT + cryptography) against the demo server: ES384 and RS384 backend
# services, then verify our RS256 access token with the published JWKS.
import json, time, uuid, requests, jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

B = "http://127.0.0.1:8766/fhir"
conf = requests.get(B + "/.well-known/smart-configuration").json()
tok_url = conf["token_endpoint"]
for alg, key in [("ES384", ec.generate_private_key(ec.SECP384R1())), ("RS384", rsa.generate_private_key(65537, 2048))]:
    pub = json.loads((ECAlgorithm if alg == "ES384" else RSAAlgorithm).to_jwk(key.public_key()))
    pub.update({"kid": "k-" + alg, "alg": alg})
    reg = requests.post(conf["registration_endpoint"], json={"client_name": "py", "token_endpoint_auth_method": "private_key_jwt",
        "grant_types": ["client_credentials"], "jwks": {"keys": [pub]}, "scope": "system/*.rs"})
    assert reg.status_code == 201, reg.text
    cid = reg.json()["client_id"]
    now = int(time.time())
    a = jwt.encode({"iss": cid, "sub": cid, "aud": tok_url, "exp": now + 240, "jti": str(uuid.uuid4())}, key, algorithm=alg, headers={"kid": "k-" + alg})
    r = requests.post(tok_url, data={"grant_type": "client_credentials", "scope": "system/Patient.rs",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", "client_assertion": a})
    assert r.status_code == 200, r.text
    body = r.json()
    r2 = requests.post(tok_url, data={"grant_type": "client_credentials", "scope": "system/Patient.rs",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", "client_assertion": a})
    assert r2.status_code in (400, 401) and r2.json()["error"] == "invalid_client", r2.text
    jwks = requests.get(conf["jwks_uri"]).json()
    kid = jwt.get_unverified_header(body["access_token"])["kid"]
    k = next(k for k in jwks["keys"] if k["kid"] == kid)
    claims = jwt.decode(body["access_token"], RSAAlgorithm.from_jwk(json.dumps(k)), algorithms=["RS256"], audience=B, issuer=B)
    print(alg, "ok: scope", body["scope"], "expires_in", body["expires_in"], "sub", claims["sub"], "replay refused")
