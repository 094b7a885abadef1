"""The notification block our alerting automations send through: plain SMTP, our settings.

Prefect's SendNotification action needs a block with a ``notify`` capability, and the
*server* runs it. Core Prefect has no SMTP notification block (prefect-email's
``EmailServerCredentials`` is credentials only), so this is a small one built on the
same SMTP session the shop's mail uses. It is registered as a ``prefect.collections``
entry point (pyproject.toml), so a Prefect server started from this project's
environment can load it; a server elsewhere needs this package installed.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from prefect.blocks.abstract import NotificationBlock, NotificationError
from pydantic import Field, SecretStr

BLOCK_NAME = "indostar-ops-email"
# The block's fields that are SmtpConfig's under another name (the password is a SecretStr here).
_CONFIG_FIELDS = {
    "smtp_host": "host",
    "smtp_port": "port",
    "security": "security",
    "timeout": "timeout",
    "username": "username",
    "sender": "sender",
}


class IndostarOpsEmail(NotificationBlock):
    """Send a plain-text email to the operations address over SMTP (one session per message)."""

    _block_type_name = "IndoStar Ops Email"
    _block_type_slug = "indostar-ops-email"
    _description = "Alert emails of indostar-jobs: SMTP settings and the operations address."

    smtp_host: str = Field(default="127.0.0.1")
    smtp_port: int = Field(default=1025, ge=1, le=65535)
    security: Literal["none", "starttls", "ssl"] = "none"
    timeout: float = Field(default=10.0, gt=0)
    username: str | None = None
    password: SecretStr | None = None
    sender: str = "IndoStar Naturals <orders@indostar.example>"
    to: list[str] = Field(default_factory=list, description="Recipients, usually the OPS_EMAIL address.")

    @classmethod
    def from_settings(cls) -> IndostarOpsEmail:
        """The block as lib.config settings describe it (SMTP_* and OPS_EMAIL)."""
        from lib.config import get_settings
        from lib.notify.email_channel import SmtpConfig

        s = get_settings()
        config = SmtpConfig.from_settings(s)
        fields = {ours: getattr(config, theirs) for ours, theirs in _CONFIG_FIELDS.items()}
        return cls(**fields, password=SecretStr(config.password) if config.password else None, to=[s.ops_email])

    def _send(self, body: str, subject: str | None) -> None:
        from lib.notify.email_channel import SmtpConfig, SmtpSession, build_message

        password = self.password.get_secret_value() if self.password else None
        config = SmtpConfig(
            **{theirs: getattr(self, ours) for ours, theirs in _CONFIG_FIELDS.items()}, password=password
        )
        with SmtpSession(config) as smtp:
            for to in self.to:
                smtp.send(build_message(config.sender, to, subject or "indostar-jobs alert", body))

    async def notify(self, body: str, subject: str | None = None) -> None:  # the server awaits this
        """Send ``body`` to every recipient; raises NotificationError when the server asks it to."""
        try:
            await asyncio.to_thread(self._send, body, subject)
        except Exception as exc:  # reported to the automation's action log, or logged
            if self._raise_on_failure:
                raise NotificationError(log=f"{type(exc).__name__}: {exc}") from exc
            self.logger.exception("ops email failed")
