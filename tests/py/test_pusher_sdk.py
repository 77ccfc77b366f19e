"""The PyPI `pusher` server SDK against weir: triggers, batch triggers, channel
queries, terminate connections, and `authenticate` / `authenticate_user`
signatures accepted by a raw WebSocket client."""

import base64
import json
import re

import nacl.secret
import pusher
import pusher.errors
import pusher.http
import pytest

from conftest import uniq, wait_for


@pytest.fixture(scope="module")
def app(weir):
    return weir.create_app(client_events=True)


@pytest.fixture(scope="module")
def sdk(weir, app):
    return weir.sdk(app)


def client(weir, app, made):
    c = weir.raw(app)
    made.append(c)
    return c


def test_connection_established_has_socket_id(weir, app, raw_clients):
    a = client(weir, app, raw_clients)
    b = client(weir, app, raw_clients)
    assert re.fullmatch(r"\d+\.\d+", a.socket_id)
    assert a.socket_id != b.socket_id
    est = a.find(lambda f: f["event"] == "pusher:connection_established")[0]
    assert isinstance(est["data"]["activity_timeout"], int) and est["data"]["activity_timeout"] > 0


def test_trigger_reaches_a_subscriber(weir, app, sdk, raw_clients):
    c = client(weir, app, raw_clients)
    ch = uniq("py-orders-")
    reply = c.subscribe(ch)
    assert reply["event"] == "pusher_internal:subscription_succeeded", reply
    sdk.trigger(ch, "created", {"id": 1, "name": "Zoë"})
    ev = c.expect(lambda f: f["event"] == "created" and f.get("channel") == ch, "created event")
    assert ev["data"] == {"id": 1, "name": "Zoë"}


def test_trigger_response_is_json(weir, app, sdk):
    # The SDK json-decodes the body of a 200; an empty body would raise.
    result = sdk.trigger(uniq("py-empty-"), "ev", {"x": 1})
    assert isinstance(result, dict)


def test_trigger_to_several_channels(weir, app, sdk, raw_clients):
    c = client(weir, app, raw_clients)
    names = [uniq("py-multi-") for _ in range(3)]
    for n in names:
        c.subscribe(n)
    sdk.trigger(names, "multi", {"n": 3})
    for n in names:
        c.expect(lambda f, n=n: f["event"] == "multi" and f.get("channel") == n, f"multi on {n}")


def test_trigger_excludes_socket_id(weir, app, sdk, raw_clients):
    a = client(weir, app, raw_clients)
    b = client(weir, app, raw_clients)
    ch = uniq("py-exclude-")
    a.subscribe(ch)
    b.subscribe(ch)
    sdk.trigger(ch, "excl", {"v": 1}, socket_id=a.socket_id)
    b.expect(lambda f: f["event"] == "excl", "excl at b")
    a.barrier(sdk, ch)
    assert a.find(lambda f: f["event"] == "excl") == []


def test_trigger_batch(weir, app, sdk, raw_clients):
    c = client(weir, app, raw_clients)
    n1, n2 = uniq("py-b1-"), uniq("py-b2-")
    c.subscribe(n1)
    c.subscribe(n2)
    sdk.trigger_batch([
        {"channel": n1, "name": "one", "data": {"i": 1}},
        {"channel": n2, "name": "two", "data": {"i": 2}},
    ])
    e1 = c.expect(lambda f: f["event"] == "one" and f.get("channel") == n1, "batch one")
    e2 = c.expect(lambda f: f["event"] == "two" and f.get("channel") == n2, "batch two")
    assert e1["data"] == {"i": 1} and e2["data"] == {"i": 2}


def test_private_channel_with_sdk_authenticate(weir, app, sdk, raw_clients):
    c = client(weir, app, raw_clients)
    ch = uniq("private-py-")
    reply = c.subscribe(ch, sdk.authenticate(channel=ch, socket_id=c.socket_id))
    assert reply["event"] == "pusher_internal:subscription_succeeded", reply
    sdk.trigger(ch, "secret", {"ok": True})
    c.expect(lambda f: f["event"] == "secret" and f.get("channel") == ch, "private event")


def test_private_channel_bad_signature_refused(weir, app, raw_clients):
    c = client(weir, app, raw_clients)
    ch = uniq("private-py-bad-")
    wrong = weir.sdk({**app, "secret": app["secret"] + "x"})
    reply = c.subscribe(ch, wrong.authenticate(channel=ch, socket_id=c.socket_id))
    assert reply["event"] in ("pusher:subscription_error", "pusher:error"), reply


def test_presence_channel_with_sdk_authenticate(weir, app, sdk, raw_clients):
    a = client(weir, app, raw_clients)
    b = client(weir, app, raw_clients)
    ch = uniq("presence-py-")
    ra = a.subscribe(ch, sdk.authenticate(channel=ch, socket_id=a.socket_id,
                                          custom_data={"user_id": "pa", "user_info": {"n": "A"}}))
    assert ra["event"] == "pusher_internal:subscription_succeeded", ra
    presence = ra["data"]["presence"]
    assert presence["count"] == 1 and presence["ids"] == ["pa"] and presence["hash"] == {"pa": {"n": "A"}}
    rb = b.subscribe(ch, sdk.authenticate(channel=ch, socket_id=b.socket_id,
                                          custom_data={"user_id": "pb", "user_info": {"n": "B"}}))
    assert rb["data"]["presence"]["count"] == 2
    assert sorted(rb["data"]["presence"]["ids"]) == ["pa", "pb"]
    added = a.expect(lambda f: f["event"] == "pusher_internal:member_added" and f.get("channel") == ch, "member_added")
    assert added["data"] == {"user_id": "pb", "user_info": {"n": "B"}}
    b.close()
    removed = a.expect(lambda f: f["event"] == "pusher_internal:member_removed" and f.get("channel") == ch,
                       "member_removed")
    assert removed["data"] == {"user_id": "pb"}


def test_channels_info_and_channel_info_and_users(weir, app, sdk, raw_clients):
    ch = uniq("presence-pyq-")
    subs = []
    for uid in ("q1", "q2", "q2"):
        c = client(weir, app, raw_clients)
        r = c.subscribe(ch, sdk.authenticate(channel=ch, socket_id=c.socket_id, custom_data={"user_id": uid}))
        assert r["event"] == "pusher_internal:subscription_succeeded", r
        subs.append(c)
    listing = sdk.channels_info(prefix_filter="presence-pyq-", attributes=["user_count"])
    assert listing == {"channels": {ch: {"user_count": 2}}}
    info = sdk.channel_info(ch, attributes=["user_count", "subscription_count"])
    assert info == {"occupied": True, "user_count": 2, "subscription_count": 3}
    users = sdk.users_info(ch)
    assert sorted(u["id"] for u in users["users"]) == ["q1", "q2"]
    assert sdk.channel_info(uniq("py-nobody-"))["occupied"] is False


def test_bad_secret_is_401(weir, app):
    wrong = weir.sdk({**app, "secret": app["secret"] + "x"})
    with pytest.raises(pusher.errors.PusherBadAuth):
        wrong.trigger(uniq("py-bad-"), "ev", {})


def test_signin_with_sdk_authenticate_user(weir, app, sdk, raw_clients):
    c = client(weir, app, raw_clients)
    auth = sdk.authenticate_user(c.socket_id, {"id": "py-user", "name": "P"})
    c.send("pusher:signin", {"auth": auth["auth"], "user_data": auth["user_data"]})
    ok = c.expect(lambda f: f["event"] in ("pusher:signin_success", "pusher:error"), "signin reply")
    assert ok["event"] == "pusher:signin_success", ok
    assert json.loads(ok["data"]["user_data"])["id"] == "py-user"


def test_signin_bad_signature_refused(weir, app, raw_clients):
    c = client(weir, app, raw_clients)
    wrong = weir.sdk({**app, "secret": app["secret"] + "x"})
    auth = wrong.authenticate_user(c.socket_id, {"id": "py-bad"})
    c.send("pusher:signin", {"auth": auth["auth"], "user_data": auth["user_data"]})
    wait_for(lambda: c.find(lambda f: f["event"] == "pusher:error") or c.closed.is_set(),
             "an error or a close after a bad sign-in")
    assert c.find(lambda f: f["event"] == "pusher:signin_success") == []


def _signed_in_victims_and_bystander(weir, app, sdk, raw_clients, victim: str):
    victims = [client(weir, app, raw_clients) for _ in range(2)]
    bystander = client(weir, app, raw_clients)
    for c, uid in ((victims[0], victim), (victims[1], victim), (bystander, victim + "-bystander")):
        auth = sdk.authenticate_user(c.socket_id, {"id": uid})
        c.send("pusher:signin", {"auth": auth["auth"], "user_data": auth["user_data"]})
        c.expect(lambda f: f["event"] == "pusher:signin_success", f"signin of {uid}")
    ch = uniq("py-bystander-")
    bystander.subscribe(ch)
    return victims, bystander, ch


def _assert_terminated(sdk, victims, bystander, ch):
    for v in victims:
        wait_for(v.closed.is_set, "victim connection to close")
    bystander.barrier(sdk, ch)
    assert not bystander.closed.is_set()


def test_terminate_user_connections(weir, app, sdk, raw_clients):
    """`POST /apps/{id}/users/{user}/terminate_connections` as documented, signed by the SDK's
    own request machinery."""
    victims, bystander, ch = _signed_in_victims_and_bystander(weir, app, sdk, raw_clients, "py-victim")
    request = pusher.http.Request(sdk._pusher_client, pusher.http.POST,
                                  f"/apps/{app['id']}/users/py-victim/terminate_connections", {})
    assert sdk._pusher_client.http.send_request(request) == {}
    _assert_terminated(sdk, victims, bystander, ch)


def test_terminate_user_connections_sdk_method(weir, app, sdk, raw_clients):
    """The SDK method itself: pusher 3.3.4 POSTs to /users/{id}/terminate_connections (no
    /apps/{app_id} prefix); weir accepts it, identifying the app by `auth_key`."""
    victims, bystander, ch = _signed_in_victims_and_bystander(weir, app, sdk, raw_clients, "py-victim2")
    sdk.terminate_user_connections("py-victim2")
    _assert_terminated(sdk, victims, bystander, ch)


def test_encrypted_channel_relayed_as_is(weir, app, raw_clients):
    master = base64.b64encode(b"k" * 32).decode()
    enc = weir.sdk(app, encryption_master_key_base64=master)
    c = client(weir, app, raw_clients)
    ch = uniq("private-encrypted-py-")
    auth = enc.authenticate(channel=ch, socket_id=c.socket_id)
    assert "shared_secret" in auth
    reply = c.subscribe(ch, auth)
    assert reply["event"] == "pusher_internal:subscription_succeeded", reply
    enc.trigger(ch, "sealed", {"pin": "4321"})
    ev = c.expect(lambda f: f["event"] == "sealed", "encrypted event")
    payload = ev["data"]
    assert set(payload) >= {"nonce", "ciphertext"}
    assert "4321" not in json.dumps(ev)
    box = nacl.secret.SecretBox(base64.b64decode(auth["shared_secret"]))
    plain = box.decrypt(base64.b64decode(payload["ciphertext"]), base64.b64decode(payload["nonce"]))
    assert json.loads(plain) == {"pin": "4321"}


def test_client_event_on_encrypted_channel_refused(weir, app, raw_clients):
    master = base64.b64encode(b"m" * 32).decode()
    enc = weir.sdk(app, encryption_master_key_base64=master)
    a = client(weir, app, raw_clients)
    b = client(weir, app, raw_clients)
    ch = uniq("private-encrypted-pyc-")
    for c in (a, b):
        r = c.subscribe(ch, enc.authenticate(channel=ch, socket_id=c.socket_id))
        assert r["event"] == "pusher_internal:subscription_succeeded", r
    a.send("client-x", {"y": 1}, channel=ch)
    a.expect(lambda f: f["event"] == "pusher:error", "pusher:error for a client event on an encrypted channel")
    # Barrier: an encrypted marker event; its arrival means the client event would have arrived too.
    enc.trigger(ch, "weir-test-barrier", {})
    b.expect(lambda f: f["event"] == "weir-test-barrier", "barrier on the encrypted channel")
    assert b.find(lambda f: f["event"] == "client-x") == []
