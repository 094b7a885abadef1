"""A local catch-all SMTP server for development and tests (aiosmtpd on loopback).

It accepts every message and keeps it in memory (and logs a one-line summary), so
`make up` can send real SMTP without a provider. Tests script the faults real providers
produce: a reply per recipient (550), replies for the next DATA commands (421), a
held reply (the message is received but the client waits, to kill it mid-send), and
AUTH with one accepted login (535 otherwise).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import socket
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

log = logging.getLogger(__name__)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class RecordingHandler:
    """Stores every accepted message; faults are scripted per recipient, per DATA, or by holding a reply."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    # Replies for the next DATA commands, one each (e.g. "421 4.3.2 try later"); then 250.
    data_replies: deque[str] = field(default_factory=deque)
    # Message number (1-based) whose 250 waits until ``release`` is set: received, not yet acknowledged.
    hold_at: int | None = None
    # RCPT number (1-based) that waits until ``release``: the conversation is on the wire, nothing accepted yet.
    hold_rcpt_at: int | None = None
    rcpt_seen: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.messages.clear()
            self.rcpt_replies.clear()
            self.data_replies.clear()
            self.hold_at = self.hold_rcpt_at = None
            self.rcpt_seen = 0
            self.release.set()
        self.release = threading.Event()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        with self.lock:
            self.rcpt_seen += 1
            held = self.hold_rcpt_at is not None and self.rcpt_seen == self.hold_rcpt_at
        if held:
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        reply = self.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        with self.lock:
            reply = self.data_replies.popleft() if self.data_replies else None
        if reply:
            return reply
        msg = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), msg))
            held = self.hold_at is not None and len(self.messages) == self.hold_at
        log.info("dev SMTP received %r for %d recipient(s)", msg.get("Subject"), len(envelope.rcpt_tos))
        if held:
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
        return "250 Message accepted for delivery"


def _authenticator(login: tuple[str, str]) -> Any:
    def check(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login.decode(), auth_data.password.decode()) == login
        return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd sends the 235 or 535 itself

    return check


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class DevSMTPServer:
    """Start/stop wrapper around an aiosmtpd Controller on a fixed loopback port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1025,
        handler: RecordingHandler | None = None,
        login: tuple[str, str] | None = None,
    ):
        self.host, self.port, self.login = host, port, login
        self.handler = handler or RecordingHandler()
        self._controller: Controller | None = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def start(self) -> DevSMTPServer:
        auth: dict[str, Any] = {}
        if self.login is not None:  # AUTH over plain loopback: tests only, never a real server
            auth = {"authenticator": _authenticator(self.login), "auth_required": True, "auth_require_tls": False}
        self._controller = Controller(self.handler, hostname=self.host, port=self.port, **auth)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "AUTH without TLS": intended, loopback tests only
            self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None
