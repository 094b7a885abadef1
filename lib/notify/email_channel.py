"""Email over SMTP: build a MIME message, and send many over one session.

``SmtpSession`` opens one connection (socket timeout, STARTTLS or SSL, login when
credentials are set) and sends message after message on it; bulk sends open one per
batch. Errors are classified for the retry policy: connection refused, timeouts,
a dropped connection and SMTP 4xx are ``TransientError``; SMTP 5xx (e.g. 550
recipient rejected) is ``PermanentError`` and concerns that one message only.
"""

from __future__ import annotations

import io
import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.charset import QP, Charset
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from functools import lru_cache
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from lib.errors import PermanentError, TransientError
from lib.notify.address import mask_email

if TYPE_CHECKING:
    from lib.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmtpConfig:
    """How to reach the SMTP server (the SMTP_* settings); ``verify_tls`` off only for test servers."""

    host: str
    port: int
    security: Literal["none", "starttls", "ssl"] = "none"
    timeout: float = 10.0
    username: str | None = None
    password: str | None = None
    sender: str = "IndoStar Naturals <orders@indostar.example>"
    verify_tls: bool = True

    def __repr__(self) -> str:  # never print the password
        return f"SmtpConfig({self.host}:{self.port}, security={self.security}, user={self.username!r})"

    @classmethod
    def from_settings(cls, s: Settings) -> SmtpConfig:
        return cls(
            **s.group("smtp_", "host", "port", "security", "timeout", "username"),
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            sender=s.smtp_from,
        )


def new_message_id(sender: str | None = None) -> str:
    """A unique Message-ID in the sender's domain (SMTP_FROM's unless given)."""
    if sender is None:
        from lib.config import get_settings

        sender = get_settings().smtp_from
    return make_msgid(domain=_sender(sender)[2])


@lru_cache(maxsize=16)
def _sender(sender: str) -> tuple[str, str, str]:
    """The From header, the envelope address and the Message-ID domain of a sender (parsed once, not per message)."""
    name, addr = parseaddr(sender)
    header = formataddr((name, addr), charset="utf-8") if name else addr
    return header, addr, addr.rpartition("@")[2] or "indostar.example"


class _Wire(Compat32):
    """compat32 with a shortcut for the short ASCII headers our messages are made of.

    compat32 folds every header through ``email.header.Header``, a fifth of the client's
    time per message; a header that fits on one line comes out of it unchanged, so those
    are written directly (the unit tests compare the bytes with smtplib's own flattening).
    """

    def fold_binary(self, name: str, value: Any) -> bytes:
        if isinstance(value, str) and value.isascii() and len(name) + len(value) < 76 and value.isprintable():
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_WIRE = _Wire(linesep="\r\n")


_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # readable in a raw mail source, unlike base64


def build_message(
    sender: str, to: str, subject: str, text: str, html: str | None = None, message_id: str | None = None
) -> Message:
    """A MIME message: plain text, plus an HTML alternative when given; always a Message-ID.

    Built with the compat32 ``email.mime`` classes: the same bytes on the wire as
    ``EmailMessage`` for these simple messages, about four times cheaper to build (it
    matters in bulk: building, not sending, is where a client's time goes).
    """
    for header, value in (("From", sender), ("To", to), ("Subject", subject)):
        if any(c in value for c in "\r\n\x00"):
            # Refused here, as permanent: smtplib would fail at send time with an error that looks transient.
            raise PermanentError(f"the {header} header contains a line break or NUL character")
    # typeshed says charset is a str; email.mime accepts a Charset, which is how we ask for quoted-printable.
    text_part = MIMEText(text, "plain", _UTF8_QP)  # type: ignore[arg-type]
    if html:
        html_part = MIMEText(html, "html", _UTF8_QP)  # type: ignore[arg-type]
        msg: Message = MIMEMultipart("alternative", _subparts=[text_part, html_part])
    else:
        msg = text_part
    msg["From"] = _sender(sender)[0]
    msg["To"] = to
    msg["Subject"] = subject if subject.isascii() else Header(subject, "utf-8")  # type: ignore[assignment]
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = message_id or new_message_id(sender)
    return msg


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        detail = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        return f"SMTP {exc.smtp_code} {detail}".strip()
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def classify(exc: BaseException, where: str) -> TransientError | PermanentError:
    """Our error for an smtplib/socket error: 5xx permanent, everything else transient."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        detail = "; ".join(
            f"{code} {msg.decode(errors='replace') if isinstance(msg, bytes) else msg}"
            for code, msg in exc.recipients.values()
        )
        err_cls = PermanentError if codes and all(500 <= c < 600 for c in codes) else TransientError
        return err_cls(f"{where}: recipient refused: SMTP {detail}")
    if isinstance(exc, smtplib.SMTPResponseException):
        err_cls = PermanentError if 500 <= exc.smtp_code < 600 else TransientError
        if exc.smtp_code in (530, 534, 535):  # auth: a config problem, but not one retrying fixes
            err_cls = PermanentError
        return err_cls(f"{where}: {_describe(exc)}")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return PermanentError(f"{where}: {_describe(exc)}")
    # Refused, reset, timed out, dropped mid-session, TLS trouble: may work later.
    return TransientError(f"{where}: {_describe(exc)}")


def wire_bytes(msg: Message) -> bytes:
    """The message as sent on the wire: CRLF line ends, as smtplib's send_message writes it."""
    out = io.BytesIO()
    BytesGenerator(out, policy=_WIRE).flatten(msg)
    return out.getvalue()


class SmtpSession:
    """One SMTP connection, used as a context manager; ``send`` may be called many times."""

    def __init__(self, config: SmtpConfig):
        self.config = config
        self._smtp: smtplib.SMTP | None = None
        self._envelope_from = _sender(config.sender)[1]  # MAIL FROM of every message of the session

    @property
    def where(self) -> str:
        return f"SMTP {self.config.host}:{self.config.port}"

    def open(self) -> SmtpSession:
        c = self.config
        context = self._tls_context() if c.security != "none" else None
        try:
            if c.security == "ssl":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(c.host, c.port, timeout=c.timeout, context=context)
            else:
                smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout)
            try:
                if c.security == "starttls":
                    smtp.starttls(context=context)
                if c.username:
                    smtp.login(c.username, c.password or "")
            except BaseException:
                smtp.close()
                raise
        except (smtplib.SMTPException, OSError) as exc:
            raise classify(exc, f"{self.where} (SMTP_HOST/SMTP_PORT, security {c.security})") from exc
        self._smtp = smtp
        return self

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self.config.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def send(self, msg: Message) -> str:
        """Send one message; returns its Message-ID. Raises TransientError or PermanentError."""
        if self._smtp is None:
            raise RuntimeError("SMTP session is not open")
        to = msg["To"]
        sender = self._envelope_from
        try:
            # sendmail with our own flattening: send_message copies the message and re-scans every
            # header for Resent-* and Bcc fields ours never carry, a third of the client's time per
            # message. Addresses are ASCII (lib.notify.address), so no SMTPUTF8 is ever needed.
            refused = self._smtp.sendmail(sender, [to], wire_bytes(msg))
        except smtplib.SMTPRecipientsRefused as exc:
            raise classify(exc, f"{self.where} to {mask_email(to)}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            err = classify(exc, f"{self.where} to {mask_email(to)}")
            if isinstance(err, TransientError):
                self._drop()  # the connection is in an unknown state; do not reuse it
            raise err from exc
        if refused:  # a single To is either refused as a whole (above) or accepted
            raise PermanentError(f"{self.where}: recipient refused: {refused}")
        return str(msg["Message-ID"])

    def _drop(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.close()
            finally:
                self._smtp = None

    @property
    def usable(self) -> bool:
        return self._smtp is not None

    def close(self) -> None:
        if self._smtp is None:
            return
        try:
            self._smtp.quit()
        except (TimeoutError, smtplib.SMTPException, OSError):
            log.debug("SMTP QUIT failed; closing the socket", exc_info=True)
        finally:
            self._drop()

    def __enter__(self) -> SmtpSession:
        return self.open()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
