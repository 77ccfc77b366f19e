"""Admission tokens checked by an independent JWT library (PyJWT + cryptography)
against weir's `/.well-known/jwks.json`, plus online verify, forward auth and key
rotation through the CLI (issue 3)."""

import base64
import json
import os
import subprocess
import time
from urllib.parse import parse_qs, urlparse

import jwt
import pytest
import requests

from conftest import DEADLINE_S, WEIR_BIN, uniq, wait_for

ORIGIN = "http://127.0.0.1:9/"
ADMIT_DEADLINE_S = 20.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@pytest.fixture(scope="module")
def rooms(weir):
    """Two open rooms with a high rate, so entrants are admitted almost at once."""
    ids = [uniq("tok-"), uniq("tok-other-")]
    for rid in ids:
        r = weir.admin("POST", "/api/v1/rooms", {
            "id": rid, "name": f"Room {rid}", "origin": ORIGIN, "rate_per_minute": 6000, "state": "open",
        })
        assert r.status_code == 201, f"create room {rid}: {r.status_code} {r.text}"
    return ids


def admitted_token(weir, room: str) -> str:
    """Enters `room` as a fresh visitor (own cookie jar), waits for admission, returns weir_token."""
    s = requests.Session()
    r = s.get(f"{weir.url}/r/{room}", headers={"Accept": "application/json"}, timeout=DEADLINE_S)
    assert r.status_code == 200, f"GET /r/{room}: {r.status_code} {r.text}"
    entry = r.json()
    assert entry["room"] == room and isinstance(entry["ticket"], int), entry

    def poll():
        st = s.get(f"{weir.url}/r/{room}/status", timeout=DEADLINE_S)
        assert st.status_code == 200, f"GET /r/{room}/status: {st.status_code} {st.text}"
        body = st.json()
        return body if body.get("admitted") else None

    status = wait_for(poll, f"admission to {room}", timeout=ADMIT_DEADLINE_S, interval=0.1)
    url = status["redirect_url"]
    assert url.startswith(ORIGIN.rstrip("/")), f"redirect_url {url} should go to the origin {ORIGIN}"
    tokens = parse_qs(urlparse(url).query).get("weir_token")
    assert tokens and len(tokens) == 1, f"redirect_url lacks weir_token: {url}"
    return tokens[0]


def jwks(weir) -> dict:
    r = requests.get(f"{weir.url}/.well-known/jwks.json", timeout=DEADLINE_S)
    assert r.status_code == 200, r.text
    return r.json()


def verify_offline(weir, token: str) -> dict:
    """Verifies with PyJWT only: the key comes from the JWKS by `kid`."""
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256", header
    keyset = jwt.PyJWKSet.from_dict(jwks(weir))
    key = next((k for k in keyset.keys if k.key_id == header["kid"]), None)
    assert key is not None, f"kid {header['kid']} not in JWKS {[k.key_id for k in keyset.keys]}"
    # `iss` is asserted by test_token_verifies_with_pyjwt_against_jwks with its own message,
    # so that the other cases (rotation, tampering) report on what they check.
    return jwt.decode(
        token, key=key, algorithms=["ES256"], audience=ORIGIN,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )


def verify_online(weir, token: str, room: str | None = None) -> dict:
    body = {"token": token} if room is None else {"token": token, "room": room}
    r = requests.post(f"{weir.url}/api/v1/verify", json=body, timeout=DEADLINE_S)
    assert r.status_code == 200, f"POST /api/v1/verify: {r.status_code} {r.text}"
    return r.json()


def forward_auth(weir, room: str, token: str) -> int:
    r = requests.get(f"{weir.url}/auth/{room}", headers={"Authorization": f"Bearer {token}"},
                     timeout=DEADLINE_S, allow_redirects=False)
    return r.status_code


@pytest.fixture(scope="module")
def token(weir, rooms):
    return admitted_token(weir, rooms[0])


def test_jwks_serves_ec_p256_keys(weir):
    keys = jwks(weir)["keys"]
    assert keys, "JWKS has no keys"
    for k in keys:
        assert k["kty"] == "EC" and k["crv"] == "P-256" and k.get("kid"), k
        assert "d" not in k, "the JWKS must not leak the private key"


def test_token_verifies_with_pyjwt_against_jwks(weir, rooms, token):
    claims = verify_offline(weir, token)
    assert claims["aud"] == ORIGIN
    assert claims["iss"] == weir.url, f"iss should be the server's public URL {weir.url}, got {claims['iss']}"
    assert claims["room"] == rooms[0]
    assert isinstance(claims["ticket"], int) and claims["ticket"] >= 1
    assert isinstance(claims["sub"], str) and claims["sub"]
    assert isinstance(claims["iat"], int) and isinstance(claims["exp"], int)
    assert claims["exp"] > claims["iat"]
    assert claims["exp"] > time.time(), "a freshly issued token is not expired"


def test_flipped_signature_byte_fails_pyjwt(weir, token):
    head, payload, sig = token.split(".")
    raw = bytearray(b64url_decode(sig))
    raw[len(raw) // 2] ^= 0x01
    forged = ".".join([head, payload, b64url(bytes(raw))])
    with pytest.raises(jwt.InvalidSignatureError):
        verify_offline(weir, forged)
    assert verify_online(weir, forged)["valid"] is False


def test_online_verify_accepts_the_token(weir, rooms, token):
    res = verify_online(weir, token, rooms[0])
    assert res["valid"] is True, res
    assert res["claims"]["room"] == rooms[0]
    other = verify_online(weir, token, rooms[1])
    assert other["valid"] is False, other


def alg_none_variant(token: str) -> str:
    """The same claims, re-encoded with `alg: none` and no signature."""
    head, payload, _ = token.split(".")
    header = json.loads(b64url_decode(head))
    header["alg"] = "none"
    return f"{b64url(json.dumps(header).encode())}.{payload}."


def test_alg_none_refused(weir, rooms, token):
    forged = alg_none_variant(token)
    res = verify_online(weir, forged)
    assert res["valid"] is False, res
    assert forward_auth(weir, rooms[0], forged) == 401


def test_hs256_with_public_key_refused(weir, rooms, token):
    claims = jwt.decode(token, options={"verify_signature": False})
    kid = jwt.get_unverified_header(token)["kid"]
    forged = jwt.encode(claims, "x" * 32, algorithm="HS256", headers={"kid": kid})
    assert verify_online(weir, forged)["valid"] is False
    assert forward_auth(weir, rooms[0], forged) == 401


def test_forward_auth_accepts_for_its_room_only(weir, rooms, token):
    assert forward_auth(weir, rooms[0], token) == 204
    assert forward_auth(weir, rooms[1], token) == 401
    # Without any token at all.
    r = requests.get(f"{weir.url}/auth/{rooms[0]}", timeout=DEADLINE_S, allow_redirects=False)
    assert r.status_code == 401


def test_forward_auth_reads_cookie_and_original_uri(weir, rooms, token):
    r = requests.get(f"{weir.url}/auth/{rooms[0]}", cookies={"weir_token": token}, timeout=DEADLINE_S)
    assert r.status_code == 204, r.text
    r = requests.get(f"{weir.url}/auth/{rooms[0]}", headers={"X-Original-URI": f"/shop?weir_token={token}"},
                     timeout=DEADLINE_S)
    assert r.status_code == 204, r.text
    r = requests.get(f"{weir.url}/auth/{rooms[0]}", headers={"X-Forwarded-Uri": f"/shop?a=1&weir_token={token}"},
                     timeout=DEADLINE_S)
    assert r.status_code == 204, r.text


def test_key_rotation_keeps_old_tokens_valid(weir, rooms, token):
    old_kid = jwt.get_unverified_header(token)["kid"]
    env = dict(os.environ, WEIR_ADMIN_KEY=weir.admin_key)
    done = subprocess.run([WEIR_BIN, "keys", "rotate", "--server", weir.url], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"weir keys rotate failed ({done.returncode}): {done.stdout} {done.stderr}"

    kids = {k["kid"] for k in jwks(weir)["keys"]}
    assert old_kid in kids, f"old kid {old_kid} dropped from JWKS after rotation: {kids}"
    assert len(kids) >= 2, f"JWKS after rotation should hold old and new keys: {kids}"

    # The token issued before the rotation still verifies, offline and online.
    assert verify_offline(weir, token)["room"] == rooms[0]
    assert verify_online(weir, token, rooms[0])["valid"] is True
    assert forward_auth(weir, rooms[0], token) == 204

    # A token issued after the rotation carries the new kid, also in the JWKS.
    fresh = admitted_token(weir, rooms[0])
    new_kid = jwt.get_unverified_header(fresh)["kid"]
    assert new_kid != old_kid
    assert new_kid in {k["kid"] for k in jwks(weir)["keys"]}
    assert verify_offline(weir, fresh)["room"] == rooms[0]
