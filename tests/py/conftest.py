"""Harness for the Python real-client tests: starts the real `weir` binary on an
ephemeral port with a fresh data directory (one server per test module), and
offers admin calls, the PyPI `pusher` SDK and a raw WebSocket client.

Waits are deadlines around conditions (a frame arriving, a status flipping),
never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pusher
import pytest
import requests
import websocket

REPO = Path(__file__).resolve().parents[2]
WEIR_BIN = os.environ.get("WEIR_BIN") or str(REPO / "target" / "debug" / "weir")
READY_RE = re.compile(r"weir: listening on (http://127\.0\.0\.1:(\d+))")

#: Default deadline for anything that should happen "soon" (seconds). Generous for
#: debug builds on a 2-core CI machine; tests never wait this long on success.
DEADLINE_S = 10.0


def wait_for(cond, what: str, timeout: float = DEADLINE_S, interval: float = 0.025):
    """Polls `cond()` until it returns something truthy; returns it, or fails after the deadline."""
    end = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - report the last error on timeout
            last_exc = e
        if time.monotonic() > end:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


class Weir:
    """A running `weir serve` process."""

    def __init__(self, extra_env: dict | None = None):
        if not Path(WEIR_BIN).exists():
            pytest.fail(f"weir binary not found at {WEIR_BIN} (build it or set WEIR_BIN)")
        self.data_dir = tempfile.mkdtemp(prefix="weir-py-")
        self.admin_key = "test-admin-key-" + secrets.token_hex(16)
        self.stderr_path = os.path.join(self.data_dir, "..", os.path.basename(self.data_dir) + ".stderr")
        self._stderr = open(self.stderr_path, "wb")
        env = dict(os.environ, WEIR_ADMIN_KEY=self.admin_key, WEIR_LOG="warn", **(extra_env or {}))
        self.proc = subprocess.Popen(
            [WEIR_BIN, "serve", "--listen", "127.0.0.1:0", "--data-dir", self.data_dir],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = None
        end = time.monotonic() + 30
        seen = []
        while self.url is None:
            remaining = end - time.monotonic()
            if remaining <= 0:
                self.stop()
                pytest.fail(f"weir did not print its listening line within 30 s; stdout: {seen}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.stop()
                pytest.fail(f"weir exited before ready; stdout: {seen}; stderr: {self.stderr_text()}")
            seen.append(line)
            m = READY_RE.search(line)
            if m:
                self.url = m.group(1)
                self.port = int(m.group(2))

    def _pump(self):
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    def stderr_text(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self):
        """SIGTERM, then SIGKILL after 5 s; removes the data directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        try:
            os.unlink(self.stderr_path)
        except OSError:
            pass

    # ------------------------------------------------------------ admin API

    def admin(self, method: str, path: str, body=None) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        return requests.request(method, self.url + path, json=body, headers=headers, timeout=DEADLINE_S)

    def create_app(self, **settings) -> dict:
        body = {"client_events": True, **settings}
        r = self.admin("POST", "/api/v1/apps", body)
        assert r.status_code == 201, f"POST /api/v1/apps {body}: expected 201, got {r.status_code}: {r.text}"
        app = r.json()
        for f in ("id", "key", "secret"):
            assert isinstance(app.get(f), str) and app[f], f"app lacks string field {f}: {app}"
        assert app["id"].isdigit(), f"app id must be digits, got {app['id']!r}"
        return app

    def sdk(self, app: dict, **extra) -> pusher.Pusher:
        return pusher.Pusher(
            app_id=app["id"], key=app["key"], secret=app["secret"],
            host="127.0.0.1", port=self.port, ssl=False, **extra,
        )

    def raw(self, app: dict) -> "RawClient":
        return RawClient(f"ws://127.0.0.1:{self.port}/app/{app['key']}?protocol=7&client=python-test&version=1.0")


class RawClient:
    """A WebSocket client speaking the Pusher protocol frame by frame.

    A reader thread collects every frame (decoded JSON, with `data` decoded when it
    is a JSON string) into `frames`; the close code lands in `close_code`.
    """

    def __init__(self, url: str):
        self.ws = websocket.create_connection(url, timeout=DEADLINE_S)
        # The reader thread blocks in recv for as long as the connection lives.
        self.ws.settimeout(None)
        self.frames: list[dict] = []
        self.close_code: int | None = None
        self.closed = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        established = self.expect(lambda f: f["event"] == "pusher:connection_established", "connection_established")
        self.socket_id = established["data"]["socket_id"]

    def _read(self):
        try:
            while True:
                opcode, data = self.ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                    break
                if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                    frame = json.loads(data)
                    if isinstance(frame.get("data"), str):
                        try:
                            frame["data"] = json.loads(frame["data"])
                        except ValueError:
                            pass
                    with self._lock:
                        self.frames.append(frame)
        except Exception:  # noqa: BLE001 - any read failure means the connection is gone
            if self.close_code is None:
                self.close_code = 1006
        finally:
            self.closed.set()

    def send(self, event: str, data, channel: str | None = None):
        msg = {"event": event, "data": data}
        if channel is not None:
            msg["channel"] = channel
        self.ws.send(json.dumps(msg))

    def find(self, pred):
        with self._lock:
            return [f for f in self.frames if pred(f)]

    def expect(self, pred, what: str, timeout: float = DEADLINE_S) -> dict:
        return wait_for(lambda: (self.find(pred) or [None])[0], what, timeout)

    def subscribe(self, channel: str, auth: dict | None = None) -> dict:
        data = {"channel": channel}
        if auth:
            data["auth"] = auth["auth"]
            if "channel_data" in auth:
                data["channel_data"] = auth["channel_data"]
        self.send("pusher:subscribe", data)
        return self.expect(
            lambda f: f.get("channel") == channel and f["event"] in (
                "pusher_internal:subscription_succeeded", "pusher:subscription_error")
            or f["event"] == "pusher:error",
            f"subscription reply for {channel}",
        )

    def barrier(self, sdk: pusher.Pusher, channel: str):
        """Triggers a marker on `channel` and waits for it: anything published before it has arrived."""
        marker = secrets.token_hex(6)
        sdk.trigger(channel, "weir-test-barrier", {"marker": marker})
        self.expect(lambda f: f["event"] == "weir-test-barrier" and f.get("data", {}).get("marker") == marker,
                    f"barrier on {channel}")

    def close(self):
        """Sends a close frame and drops the TCP connection (the reader thread owns recv)."""
        try:
            self.ws.send_close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.ws.shutdown()
        except Exception:  # noqa: BLE001
            pass


@pytest.fixture(scope="module")
def weir():
    w = Weir()
    yield w
    w.stop()


@pytest.fixture
def raw_clients():
    """Collects RawClients made in a test and closes them after it."""
    made: list[RawClient] = []
    yield made
    for c in made:
        c.close()


def uniq(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"
