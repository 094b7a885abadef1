"""SMS over HTTP through one pooled httpx client: MSG91-style, Twilio-style, or ``log``.

- ``msg91``: JSON POST to {base}/api/v2/sendsms with an ``authkey`` header, the sender
  id, route 4 (transactional) and the DLT template id Indian operators require.
- ``twilio``: form POST to {base}/2010-04-01/Accounts/{sid}/Messages.json with HTTP
  basic auth (account sid, API key).
- ``log``: development only (refused when INDOSTAR_ENV is production): writes the
  masked recipient and the text, codes and links masked, to the log.

HTTP 429 and 5xx, timeouts and connection errors are ``TransientError``; any other
4xx is ``PermanentError``. The API key never appears in a message or a log line, and
a provider's response body is cut short and scrubbed (credentials, codes, links,
addresses) before it becomes an error we store.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx

from lib.errors import ConfigError, PermanentError, TransientError
from lib.notify.address import mask_phone, mask_secrets

if TYPE_CHECKING:
    from lib.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmsConfig:
    """Which gateway and how to call it (the SMS_* settings); ``production`` refuses the ``log`` provider."""

    provider: Literal["log", "msg91", "twilio"]
    base_url: str
    api_key: str | None = None
    account_sid: str | None = None
    sender_id: str = "INDSTR"
    timeout: float = 10.0
    production: bool = True

    def __repr__(self) -> str:  # never print the key
        return f"SmsConfig({self.provider} at {self.base_url}, sender={self.sender_id})"

    @classmethod
    def from_settings(cls, s: Settings) -> SmsConfig:
        return cls(
            **s.group("sms_", "provider", "account_sid", "sender_id", "timeout"),
            base_url=s.sms_base_url.rstrip("/"),
            api_key=s.sms_api_key.get_secret_value() if s.sms_api_key else None,
            production=s.production,
        )

    def check_usable(self) -> None:
        """ConfigError (one line, naming the variable) when this configuration cannot send for real."""
        if self.provider == "log" and self.production:
            raise ConfigError(
                "SMS_PROVIDER=log only writes SMS to the log; set SMS_PROVIDER=msg91 or twilio "
                "(INDOSTAR_ENV is production)"
            )
        if self.provider == "msg91" and not self.api_key:
            raise ConfigError("SMS_PROVIDER=msg91 needs SMS_API_KEY")
        if self.provider == "twilio" and not (self.api_key and self.account_sid):
            raise ConfigError("SMS_PROVIDER=twilio needs SMS_ACCOUNT_SID and SMS_API_KEY")


def make_client(config: SmsConfig, max_connections: int = 20) -> httpx.Client:
    """One pooled client for a batch: connect/read/write timeouts from SMS_TIMEOUT."""
    config.check_usable()
    return httpx.Client(
        base_url=config.base_url,
        timeout=httpx.Timeout(config.timeout),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        headers={"user-agent": "indostar-jobs"},
    )


def _request(config: SmsConfig, phone: str, text: str, dlt_template_id: str | None) -> tuple[str, dict[str, Any]]:
    if config.provider == "msg91":
        body: dict[str, Any] = {"sender": config.sender_id, "route": "4", "country": "91"}
        if dlt_template_id:  # Indian routes need it; free text (send-sms) goes without, and may be refused
            body["DLT_TE_ID"] = dlt_template_id
        body["sms"] = [{"message": text, "to": [phone.lstrip("+")]}]
        return "/api/v2/sendsms", {"json": body, "headers": {"authkey": config.api_key or ""}}
    body = {"To": phone, "From": config.sender_id, "Body": text}
    path = f"/2010-04-01/Accounts/{config.account_sid}/Messages.json"
    return path, {"data": body, "auth": (config.account_sid or "", config.api_key or "")}


def _provider_id(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return f"http-{response.status_code}"
    if isinstance(data, dict):
        for key in ("sid", "request_id", "message"):
            if data.get(key):
                return str(data[key])[:200]
    return f"http-{response.status_code}"


def send_sms(client: httpx.Client | None, config: SmsConfig, phone: str, text: str, dlt_template_id: str | None) -> str:
    """Send one SMS; returns the provider's message id. Raises TransientError or PermanentError."""
    if config.provider == "log":
        digest = hashlib.sha256(f"{phone}\n{text}".encode()).hexdigest()[:16]
        config.check_usable()
        log.info("SMS (log provider) to %s [DLT %s]: %s", mask_phone(phone), dlt_template_id, mask_secrets(text))
        return f"log-{digest}"
    if client is None:
        raise RuntimeError("an httpx client is needed for SMS provider " + config.provider)
    path, kwargs = _request(config, phone, text, dlt_template_id)
    where = f"SMS {config.provider} {config.base_url} to {mask_phone(phone)}"
    try:
        response = client.post(path, **kwargs)
    except httpx.TimeoutException as exc:
        raise TransientError(f"{where}: timed out after {config.timeout:g} s (SMS_TIMEOUT)") from exc
    except httpx.TransportError as exc:
        raise TransientError(f"{where}: {type(exc).__name__}: {exc}") from exc
    status = response.status_code
    if status < 300:
        return _provider_id(response)
    detail = provider_detail(response.text, config)
    if status == 429 or status >= 500:
        raise TransientError(f"{where}: HTTP {status} {detail}")
    raise PermanentError(f"{where}: HTTP {status} {detail}")


def provider_detail(body: str, config: SmsConfig, limit: int = 160) -> str:
    """A provider's response body fit to store: one line, credentials and secrets removed, cut short."""
    text = " ".join(body[:2000].split())
    for secret in (config.api_key, config.account_sid):
        if secret:
            text = text.replace(secret, "***")
    text = mask_secrets(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
