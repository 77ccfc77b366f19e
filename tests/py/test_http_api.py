"""The Pusher HTTP API's signature rules and limits, with requests signed here by
hand (exactly as the Pusher docs describe) so each part can be broken on purpose,
and the app's sign-in deadline seen from a raw WebSocket client."""

import hashlib
import hmac
import json
import time

import pytest
import requests

from conftest import DEADLINE_S, uniq, wait_for


def signed(weir, app, method: str, path: str, body: bytes | None = None, *, secret=None, key=None,
           timestamp=None, body_md5=None, extra=None):
    """Sends a request signed as Pusher's HTTP API requires:
    HMAC-SHA256(secret, "METHOD\\n/path\\nsorted&query") over auth_key, auth_timestamp,
    auth_version and (with a body) body_md5."""
    params = {
        "auth_key": key or app["key"],
        "auth_timestamp": str(int(time.time()) if timestamp is None else timestamp),
        "auth_version": "1.0",
        **(extra or {}),
    }
    if body is not None:
        params["body_md5"] = body_md5 or hashlib.md5(body).hexdigest()
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    to_sign = f"{method}\n{path}\n{query}"
    sig = hmac.new((secret or app["secret"]).encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    url = f"{weir.url}{path}?{query}&auth_signature={sig}"
    return requests.request(method, url, data=body, timeout=DEADLINE_S,
                            headers={"Content-Type": "application/json"} if body is not None else {})


def event_body(**overrides) -> bytes:
    ev = {"name": "ev", "channels": [uniq("http-")], "data": json.dumps({"x": 1})}
    ev.update(overrides)
    return json.dumps(ev).encode()


@pytest.fixture(scope="module")
def app(weir):
    return weir.create_app()


def test_hand_signed_request_is_accepted(weir, app):
    r = signed(weir, app, "POST", f"/apps/{app['id']}/events", event_body())
    assert r.status_code == 200, r.text
    assert r.json() == {}


def test_error_bodies_say_what_failed(weir, app):
    r = signed(weir, app, "POST", f"/apps/{app['id']}/events", event_body(), secret=app["secret"] + "x")
    assert r.status_code == 401
    assert r.text.strip(), "a 401 says which part of the signature failed"


def test_wrong_body_md5_is_401(weir, app):
    r = signed(weir, app, "POST", f"/apps/{app['id']}/events", event_body(), body_md5="0" * 32)
    assert r.status_code == 401, r.text


def test_stale_timestamp_is_401(weir, app):
    r = signed(weir, app, "POST", f"/apps/{app['id']}/events", event_body(), timestamp=int(time.time()) - 3600)
    assert r.status_code == 401, r.text


def test_timestamp_within_600s_is_accepted(weir, app):
    r = signed(weir, app, "POST", f"/apps/{app['id']}/events", event_body(), timestamp=int(time.time()) - 300)
    assert r.status_code == 200, r.text


def test_missing_signature_is_401(weir, app):
    r = requests.post(f"{weir.url}/apps/{app['id']}/events", data=event_body(), timeout=DEADLINE_S,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 401, r.text


def test_unknown_app_is_404(weir, app):
    r = signed(weir, app, "POST", "/apps/999999999/events", event_body())
    assert r.status_code == 404, r.text


def test_get_with_empty_body_md5_is_tolerated(weir, app):
    # The Python SDK adds body_md5 (of the empty body) to GETs; the signature covers it.
    r = signed(weir, app, "GET", f"/apps/{app['id']}/channels", body=None,
               extra={"body_md5": hashlib.md5(b"").hexdigest()})
    assert r.status_code == 200, r.text
    assert "channels" in r.json()


def test_more_than_100_channels_is_400(weir, app):
    body = event_body(channels=[f"c-{i}" for i in range(101)])
    r = signed(weir, app, "POST", f"/apps/{app['id']}/events", body)
    assert r.status_code == 400, r.text


def test_more_than_10_batch_events_is_400(weir, app):
    batch = {"batch": [{"channel": f"b-{i}", "name": "ev", "data": "{}"} for i in range(11)]}
    r = signed(weir, app, "POST", f"/apps/{app['id']}/batch_events", json.dumps(batch).encode())
    assert r.status_code == 400, r.text


def test_invalid_json_is_400(weir, app):
    r = signed(weir, app, "POST", f"/apps/{app['id']}/events", b"{not json")
    assert r.status_code == 400, r.text


def test_invalid_channel_name_is_400(weir, app):
    r = signed(weir, app, "POST", f"/apps/{app['id']}/events", event_body(channels=["bad channel name!"]))
    assert r.status_code == 400, r.text


def test_data_over_10kb_is_413(weir, app):
    r = signed(weir, app, "POST", f"/apps/{app['id']}/events", event_body(data="x" * (10 * 1024 + 1)))
    assert r.status_code == 413, r.text


def test_signin_deadline_closes_unsigned_connections(weir, raw_clients):
    """An app with signin_within_s closes a connection that has not signed in (4009),
    and keeps one that has."""
    app = weir.create_app(signin_within_s=1)
    sdk = weir.sdk(app)
    signed_in = weir.raw(app)
    raw_clients.append(signed_in)
    auth = sdk.authenticate_user(signed_in.socket_id, {"id": "deadline-user"})
    signed_in.send("pusher:signin", {"auth": auth["auth"], "user_data": auth["user_data"]})
    signed_in.expect(lambda f: f["event"] == "pusher:signin_success", "signin_success")

    lazy = weir.raw(app)  # connected after signed_in, never signs in
    raw_clients.append(lazy)
    wait_for(lazy.closed.is_set, "the unsigned connection to be closed", timeout=DEADLINE_S + 5)
    assert lazy.close_code == 4009, f"close code {lazy.close_code}, frames {lazy.frames}"
    # The signed-in connection is older than the closed one, yet still open.
    ch = uniq("deadline-")
    signed_in.subscribe(ch)
    signed_in.barrier(sdk, ch)
    assert not signed_in.closed.is_set()
