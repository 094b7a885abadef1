"""Provider plumbing for the notification tasks: SMTP settings (or a prefect-email block) and rate limits.

Providers are throttled by Prefect global concurrency limits when an operator has
created them (``smtp-provider``: concurrent SMTP sessions; ``sms-provider``: SMS per
second, with slot decay); without them, sends are not throttled.

Prefect and prefect-email are imported inside the functions that use them: the module stays
importable without Prefect (tests/unit/test_notify_summary.py checks it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

from lib.config import get_settings
from lib.notify.email_channel import SmtpConfig
from lib.notify.sms_channel import SmsConfig

log = logging.getLogger(__name__)

SMTP_LIMIT = "smtp-provider"
SMS_LIMIT = "sms-provider"
_SECURITY: dict[str, Literal["ssl", "starttls", "none"]] = {"SSL": "ssl", "STARTTLS": "starttls"}


def smtp_config() -> SmtpConfig:
    """SMTP settings, or the prefect-email block named by SMTP_CREDENTIALS_BLOCK (loaded now)."""
    s = get_settings()
    if not s.smtp_credentials_block:
        return SmtpConfig.from_settings(s)
    from prefect_email import EmailServerCredentials

    block = EmailServerCredentials.load(s.smtp_credentials_block)
    kind = getattr(block.smtp_type, "name", str(block.smtp_type)).upper()
    default_port = getattr(block.smtp_type, "value", 465)
    return SmtpConfig(
        host=getattr(block.smtp_server, "value", block.smtp_server),
        port=block.smtp_port or default_port,
        security=_SECURITY.get(kind, "none"),
        timeout=s.smtp_timeout,
        username=block.username,
        password=block.password.get_secret_value() or None,
        sender=s.smtp_from,
        verify_tls=block.verify is not False,
    )


def sms_config() -> SmsConfig:
    return SmsConfig.from_settings(get_settings())


_limits_seen: dict[str, tuple[float, bool]] = {}
_limits_lock = threading.Lock()


API_DOWN_RECHECK_SECONDS = 10.0


def limit_exists(name: str, ttl: float = 60.0) -> bool:
    """Whether the global concurrency limit exists (checked at most once a minute per process).

    Prefect 3.9 with strict=False lets a missing limit pass, but warns on every call;
    checking once keeps the log quiet when an operator has not created the limit.
    """
    now = time.monotonic()
    with _limits_lock:
        seen = _limits_seen.get(name)
        if seen and now - seen[0] < ttl:
            return seen[1]
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
        exists = True
    except ObjectNotFound:
        exists = False
    except Exception as exc:  # noqa: BLE001 - the API is down: limits live there, messages must still go
        # A task worker keeps sending while the Prefect API is away (the outbox needs only PostgreSQL);
        # the provider's limit is not applied until the API answers again, and the log says so.
        log.warning("Prefect API unreachable (%s): sending without the %s limit for now", type(exc).__name__, name)
        exists, now = False, now - ttl + API_DOWN_RECHECK_SECONDS
    with _limits_lock:
        _limits_seen[name] = (now, exists)
    return exists


def provider_session(name: str) -> AbstractContextManager[Any]:
    """Hold one slot of the provider's concurrency limit for a session, if the limit exists."""
    from prefect.concurrency.sync import concurrency

    return concurrency(name, occupy=1, strict=False) if limit_exists(name) else nullcontext()


def provider_rate(name: str) -> Callable[[], None] | None:
    """A function waiting for one slot of the provider's rate limit (slot decay), if the limit exists."""
    if not limit_exists(name):
        return None
    from prefect.concurrency.sync import rate_limit

    return lambda: rate_limit(name, occupy=1, strict=False)
