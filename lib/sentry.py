"""Error tracking in Sentry: one event per run that ends badly, cron check-ins, and nothing personal on the way out.

``init()`` is called once per process (the CLI, every flow-run process through flows.common,
the task workers) and does nothing unless SENTRY_DSN is set. Events are sent by the code
that knows a run has ended for good (flows.hooks: flow and task runs that end Failed or
Crashed after their retries, a background task that failed for good), never from log
lines: Prefect logs "Finished in state Failed" at ERROR for every attempt, and the logging
integration would turn each into an event. Log lines are breadcrumbs only.

``before_send`` is the last word on what leaves: email addresses and phone numbers masked
as in our logs, links, one-time codes and every configured secret removed, exception
frames without local variables, and of a run's parameters only the ids kept.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.logging import LoggingIntegration

from lib.config import get_settings
from lib.notify.address import mask_secrets

log = logging.getLogger(__name__)

FILTERED = "[Filtered]"
# Keys whose values are secrets or personal wherever they appear (headers, extra, request data, breadcrumbs).
_SECRET_KEY = re.compile(
    r"^(.*pass(word|wd)?|.*secret|.*token|otp|code|dsn|.*api_?key|authorization|cookie|set-cookie|signature|link|"
    r"email|to_email|phone|to|recipient|recipients|body|html_body|subject|text|context)$",
    re.IGNORECASE,
)
# Left as they are: our own tags and the run's context are ids, names of flows and a link to the UI.
_OURS = ("tags", "contexts.prefect", "contexts.monitor", "contexts.trace", "level", "event_id", "fingerprint")
_OURS_PREFIXES = tuple(f"{p}." for p in _OURS)
_ID_KEY = re.compile(r"(^|_)id$")

_dsn: str | None = None
_secret_values: list[str] = []
_sent: set[tuple[str, ...]] = set()  # fingerprints already reported by this process


def init(*, force: bool = False) -> bool:
    """Start the SDK for this process (idempotent); False when SENTRY_DSN is unset."""
    global _dsn, _secret_values
    s = get_settings()
    dsn = s.sentry_dsn.get_secret_value() if s.sentry_dsn else None
    if not dsn:
        return False
    if _dsn == dsn and not force:
        return True
    _secret_values = _secrets()
    if _dsn is not None:
        sentry_sdk.get_client().close(timeout=2)  # the previous client's transport thread goes with it
    sentry_sdk.init(
        dsn=dsn,
        environment=s.sentry_environment or s.indostar_env,
        traces_sample_rate=s.sentry_traces_sample_rate,
        send_default_pii=False,
        include_local_variables=False,
        # Jobs are not user sessions; release-health sessions would only add background sends.
        auto_session_tracking=False,
        max_request_body_size="never",
        before_send=before_send,
        before_send_transaction=before_send,
        before_breadcrumb=_breadcrumb,
        integrations=[LoggingIntegration(level=logging.INFO, event_level=None)],
    )
    _dsn = dsn
    return True


def enabled() -> bool:
    return _dsn is not None


def _secrets() -> list[str]:
    """Every configured secret (longest first, so one holding another is removed whole); read once at init."""
    s = get_settings()
    values = [s.token_secret, s.razorpay_webhook_secret, s.smtp_password, s.sms_api_key, s.task_webhook_secret]
    values.append(s.sentry_dsn)
    out = [v.get_secret_value() for v in values if v is not None]
    return sorted((v for v in out if len(v) >= 4), key=len, reverse=True)


def scrub_text(text: str) -> str:
    """A string fit to leave: configured secrets removed, links, codes, emails and phone numbers masked."""
    for secret in _secret_values:
        text = text.replace(secret, FILTERED)
    return mask_secrets(text)


def _scrub(value: Any, path: str) -> Any:
    if path in _OURS or path.startswith(_OURS_PREFIXES):
        return value
    if isinstance(value, dict):
        if path.endswith("parameters"):
            return {k: v for k, v in value.items() if _ID_KEY.search(str(k))}
        return {
            k: (FILTERED if _SECRET_KEY.search(str(k)) and not _ID_KEY.search(str(k)) else _scrub(v, f"{path}.{k}"))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, path) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


def scrub_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event with everything personal or secret masked or dropped (see the module docstring)."""
    return {k: _scrub(v, k) for k, v in event.items()}


def before_send(event: Any, hint: Any) -> Any:
    logger = str(event.get("logger") or "")
    if logger.startswith("prefect") and "Finished in state" in str(event.get("logentry") or event.get("message")):
        return None
    return scrub_event(event)


def _breadcrumb(crumb: Any, hint: Any) -> Any:
    # Per-request chatter (httpx, the Prefect client) adds nothing a failure report needs and carries URLs.
    if crumb.get("category") in ("httplib", "http", "redis", "query"):
        return None
    return crumb


def capture_failure(
    message: str, tags: dict[str, Any], fingerprint: list[str], url: str | None, exc: BaseException | None = None
) -> None:
    """One error event for a run that ended for good, grouped by ``fingerprint`` (one issue per run); a second
    call with the same fingerprint in this process (a hook run twice) sends nothing."""
    sent_as = tuple(fingerprint)
    if not enabled() or sent_as in _sent:
        return
    _sent.add(sent_as)
    with sentry_sdk.new_scope() as scope:
        for key, value in tags.items():
            if value is not None:
                scope.set_tag(key, str(value))
        scope.set_context("prefect", {"url": url, "message": scrub_text(message)})
        scope.fingerprint = fingerprint
        if exc is not None:
            sentry_sdk.capture_exception(exc)
        else:
            sentry_sdk.capture_message(message, level="error")


def check_in(
    slug: str,
    status: str,
    *,
    cron: str | None = None,
    timezone: str = "UTC",
    max_runtime: int = 60,
    check_in_id: str | None = None,
) -> str | None:
    """A cron monitor check-in (in_progress, ok, error); with ``cron`` the monitor is created or updated to it."""
    if not enabled():
        return None
    config: Any = None
    if cron:
        config = {
            "schedule": {"type": "crontab", "value": cron},
            "timezone": timezone,
            "checkin_margin": 5,
            "max_runtime": max(1, max_runtime),
        }
    from sentry_sdk.crons import capture_checkin

    return capture_checkin(monitor_slug=slug, check_in_id=check_in_id, status=status, monitor_config=config)


def flush(timeout: float = 5.0) -> None:
    if enabled():
        sentry_sdk.flush(timeout=timeout)


def shutdown() -> None:
    """Send what is queued and stop reporting (tests; a process normally keeps it till exit)."""
    global _dsn
    if _dsn is not None:
        sentry_sdk.flush(timeout=5)
        sentry_sdk.get_client().close()
        sentry_sdk.init(dsn=None)
        _dsn = None
