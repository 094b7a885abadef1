"""Loopback peers for integration tests: a scriptable HTTP SMS gateway and a Sentry envelope receiver.

The SMTP side is devtools.smtp_sink (real aiosmtpd); faults there are set per recipient.
The gateway answers like an MSG91/Twilio-style API and can be told to answer the
next requests with given status codes or delays, faults a real provider gives
only on a bad day.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


@dataclass
class GatewayRequest:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 200  # what the gateway answered

    def data(self) -> dict:
        ctype = self.headers.get("content-type", "")
        if "json" in ctype:
            return json.loads(self.body)
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}


@dataclass
class SMSGateway:
    requests: list[GatewayRequest] = field(default_factory=list)
    # Each entry: (status, delay_seconds) for one upcoming request; then 200.
    script: deque[tuple[int, float]] = field(default_factory=deque)
    counter: int = 0
    error_body: str | None = None  # what a non-2xx answer says (default: a short message)
    arrived: int = 0  # requests received, counted before any scripted delay
    # Request number (1-based) whose answer waits until ``release`` is set: received, not yet answered.
    hold_at: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Bumped by reset(): a request still sleeping out a delay from an earlier test is not logged
    # into the next test's list when it finally wakes.
    generation: int = 0

    def fail_next(self, *statuses: int, delay: float = 0.0) -> None:
        for status in statuses:
            self.script.append((status, delay))

    def delay_next(self, seconds: float, times: int = 1) -> None:
        for _ in range(times):
            self.script.append((200, seconds))

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.script.clear()
            self.error_body = None
            self.arrived = 0
            self.hold_at = None
            self.generation += 1
            self.release.set()
        self.release = threading.Event()

    @property
    def delivered(self) -> list[GatewayRequest]:
        """Requests the gateway accepted (answered 2xx)."""
        return [r for r in self.requests if r.status < 300]


def start_gateway(host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, SMSGateway]:
    state = SMSGateway()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            req = GatewayRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            with state.lock:
                status, delay = state.script.popleft() if state.script else (200, 0.0)
                state.counter += 1
                state.arrived += 1
                msg_id = f"gw-{state.counter}"
                held = state.hold_at is not None and state.arrived == state.hold_at
                generation = state.generation
            if held:
                state.release.wait(30)
            if delay:
                time.sleep(delay)
            req.status = status
            with state.lock:
                if generation == state.generation:
                    state.requests.append(req)
            payload = (
                {"type": "success", "message": msg_id, "sid": msg_id, "request_id": msg_id}
                if status < 300
                else {"type": "error", "message": state.error_body or f"gateway says {status}"}
            )
            # The client may have timed out first: that is the point of a delay.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                _reply_json(self, status, payload)

        def log_message(self, *args):
            pass

    return _serve(host, Handler), state


def _reply_json(handler: BaseHTTPRequestHandler, status: int, payload: object) -> None:
    raw = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(raw)))
    handler.end_headers()
    handler.wfile.write(raw)


def _serve(host: str, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """An HTTP server on a free loopback port, answering from a daemon thread."""
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class SentryEnvelope:
    """One envelope as sent by sentry-sdk: its header and its items as (item header, payload) pairs."""

    raw: bytes
    header: dict
    items: list[tuple[dict, bytes]]

    def of_type(self, kind: str) -> list[dict]:
        return [json.loads(payload) for head, payload in self.items if head.get("type") == kind]


def parse_envelope(raw: bytes) -> SentryEnvelope:
    """Sentry's envelope format: a JSON header line, then items (a JSON header line, then `length` bytes or a line)."""
    header_line, _, rest = raw.partition(b"\n")
    items: list[tuple[dict, bytes]] = []
    while rest.strip():
        item_line, _, rest = rest.partition(b"\n")
        head = json.loads(item_line)
        if "length" in head:
            payload, rest = rest[: head["length"]], rest[head["length"] :].removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((head, payload))
    return SentryEnvelope(raw, json.loads(header_line), items)


@dataclass
class SentryReceiver:
    """What reached the loopback Sentry server: every envelope, decoded."""

    envelopes: list[SentryEnvelope] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def events(self) -> list[dict]:
        with self.lock:
            return [e for env in self.envelopes for e in env.of_type("event")]

    def check_ins(self) -> list[dict]:
        with self.lock:
            return [c for env in self.envelopes for c in env.of_type("check_in")]

    def raw(self) -> bytes:
        with self.lock:
            return b"\n".join(env.raw for env in self.envelopes)

    def reset(self) -> None:
        with self.lock:
            self.envelopes.clear()


def start_sentry(host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, SentryReceiver]:
    """An HTTP server that accepts envelopes at any DSN pointing at it (POST /api/<project>/envelope/)."""
    import gzip

    state = SentryReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            encoding = (self.headers.get("content-encoding") or "").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "br":
                import brotli

                body = brotli.decompress(body)
            if self.path.rstrip("/").endswith("/envelope"):
                with state.lock:
                    state.envelopes.append(parse_envelope(body))
            _reply_json(self, 200, {})

        def log_message(self, *args):
            pass

    return _serve(host, Handler), state


def prometheus_binary(name: str = "prometheus") -> str:
    """Path of Debian's ``prometheus`` or ``promtool``; the test fails without it when CI requires it
    (INDOSTAR_REQUIRE_PROMETHEUS=1, set by .ci/run), and is skipped elsewhere."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: apt-get install prometheus"
        if os.environ.get("INDOSTAR_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path
