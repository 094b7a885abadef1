"""Settings for every job, read once from the environment (and an optional .env file).

One typed ``Settings`` object; secrets are ``SecretStr`` so they never print. A wrong
value fails with a message naming the variable, not a validation traceback.

``INDOSTAR_ENV`` is ``dev`` or ``production``; unset means production. The development
defaults (the public webhook and token secrets, the ``log`` SMS provider) work only in
dev: in production the code that needs one asks through ``webhook_secret()``,
``token_key()`` or ``sms_provider_for_sending()``, which refuse them with one line naming
the variable. Settings that are fine to default anywhere are plain fields.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from lib.errors import ConfigError

DEV_TOKEN_SECRET = "dev-token-secret"  # noqa: S105 - the public dev default, refused in production
DEV_WEBHOOK_SECRET = "dev-webhook-secret"  # noqa: S105 - as above
MIN_TOKEN_SECRET_BYTES = 32


class Settings(BaseSettings):
    """Every knob of indostar-jobs; environment variable = field name in upper case."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    indostar_env: Literal["dev", "production"] = "production"

    database_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/indostar"
    database_pool_size: int = Field(default=5, ge=1)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "indostar:"
    # Key of the HMAC that stores tokens hashed; without it a leaked dump cannot even brute-force an OTP.
    token_secret: SecretStr = SecretStr(DEV_TOKEN_SECRET)
    otp_ttl_seconds: int = Field(default=600, ge=30)
    password_reset_ttl_seconds: int = Field(default=3600, ge=60)
    email_verification_ttl_seconds: int = Field(default=86_400, ge=60)
    # Where the links in token emails point; {token} is replaced by the URL-safe token.
    password_reset_url: str = "https://indostar.example/account/reset?token={token}"  # noqa: S105 - a URL
    email_verification_url: str = "https://indostar.example/account/verify?token={token}"

    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=1025, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: Literal["none", "starttls", "ssl"] = "none"
    smtp_timeout: float = Field(default=10.0, gt=0)
    smtp_from: str = "IndoStar Naturals <orders@indostar.example>"
    smtp_credentials_block: str | None = None

    sms_provider: Literal["log", "msg91", "twilio"] = "log"
    sms_base_url: str = "http://127.0.0.1:8025"
    sms_api_key: SecretStr | None = None
    sms_account_sid: str | None = None
    sms_sender_id: str = "INDSTR"
    sms_timeout: float = Field(default=10.0, gt=0)

    razorpay_webhook_secret: SecretStr = SecretStr(DEV_WEBHOOK_SECRET)

    notification_batch_size: int = Field(default=200, ge=1)
    # true: every `sent` mark waits for the disk (survives a PostgreSQL crash, costs a WAL flush per message).
    notification_durable_marks: bool = False
    # Plain and templated messages keep their text (the payload) this long, then only the row remains.
    notification_payload_retention_days: int = Field(default=7, ge=1)
    notification_retention_days: int = Field(default=180, ge=1)

    retry_attempts: int = Field(default=3, ge=0)
    retry_base_seconds: float = Field(default=10.0, ge=0)
    retry_cap_seconds: float = Field(default=600.0, ge=0)
    retry_jitter_factor: float = Field(default=0.5, ge=0)

    # Background tasks (lib/outbox.py, flows/background.py): a task worker claims up to TASK_BATCH_SIZE due
    # rows at once, sends up to TASK_WORKER_CONCURRENCY batches at a time, and looks for due retries and the
    # rows of stopped workers every TASK_POLL_SECONDS (new rows wake it at once). Finished rows, and the
    # results of backend-started flow runs, are kept TASK_STORAGE_TTL_SECONDS for their handles.
    task_storage_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    task_batch_size: int = Field(default=50, ge=1, le=1000)
    task_worker_concurrency: int = Field(default=2, ge=1, le=32)
    task_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    task_webhook_url: str | None = None
    task_webhook_secret: SecretStr | None = None

    flow_soft_limit_seconds: float = Field(default=25 * 60, gt=0)
    flow_timeout_seconds: float = Field(default=30 * 60, gt=0)

    # Error tracking (lib/sentry.py): off while SENTRY_DSN is unset. SENTRY_ENVIRONMENT defaults to INDOSTAR_ENV.
    sentry_dsn: SecretStr | None = None
    sentry_environment: str | None = None
    sentry_traces_sample_rate: float = Field(default=0.0, ge=0, le=1)

    # The metrics exporter (deployments/metrics.py) reads its sources at most every METRICS_CACHE_SECONDS and
    # counts the flow runs that finished from METRICS_LOOKBACK_SECONDS before it started.
    metrics_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    metrics_lookback_seconds: float = Field(default=3600.0, ge=0)

    ops_email: str = "ops@indostar.example"
    public_ui_url: str = "http://127.0.0.1:4200"
    # Where the weekly ops report writes its PNG chart and markdown (relative to the worker's directory).
    reports_dir: str = "reports"

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, v: str) -> str:
        try:
            url = make_url(v)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        if not url.drivername.startswith("postgresql"):
            raise ValueError(f"expected a postgresql:// URL, got {url.drivername}://")
        if not url.database:
            raise ValueError("the URL names no database")
        return v

    @field_validator("password_reset_url", "email_verification_url")
    @classmethod
    def _check_link(cls, v: str) -> str:
        if "{token}" not in v or not v.startswith(("https://", "http://")):
            raise ValueError("expected an http(s) URL containing {token}")
        return v

    @field_validator("task_webhook_url")
    @classmethod
    def _check_webhook_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("https://", "http://")):
            raise ValueError("expected an http(s) URL")
        return v or None

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://host:port/db")
        return v

    @property
    def production(self) -> bool:
        return self.indostar_env == "production"

    def group(self, prefix: str, *names: str) -> dict[str, Any]:
        """``{name: self.<prefix><name>}``: the settings of one client, under the names its config uses."""
        return {name: getattr(self, prefix + name) for name in names}

    def webhook_secret(self) -> str:
        """RAZORPAY_WEBHOOK_SECRET, refused in production while it is the public dev default."""
        secret = self.razorpay_webhook_secret.get_secret_value()
        if self.production and secret in ("", DEV_WEBHOOK_SECRET):
            raise ConfigError(
                "RAZORPAY_WEBHOOK_SECRET is the public development default; set the secret from Razorpay's "
                "dashboard (INDOSTAR_ENV is production; set INDOSTAR_ENV=dev only on a development machine)"
            )
        return secret

    def token_key(self) -> bytes:
        """TOKEN_SECRET as HMAC key, refused in production while it is the dev default or shorter than 32 bytes."""
        key = self.token_secret.get_secret_value().encode()
        if self.production and (key == DEV_TOKEN_SECRET.encode() or len(key) < MIN_TOKEN_SECRET_BYTES):
            raise ConfigError(
                f"TOKEN_SECRET must be a random value of at least {MIN_TOKEN_SECRET_BYTES} bytes in production, "
                "not the development default (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        return key

    def check_task_webhook(self) -> None:
        """A webhook URL needs a secret to sign with (and a real one in production)."""
        if not self.task_webhook_url:
            return
        secret = self.task_webhook_secret.get_secret_value() if self.task_webhook_secret else ""
        if len(secret) < (MIN_TOKEN_SECRET_BYTES if self.production else 1):
            raise ConfigError(
                "TASK_WEBHOOK_URL is set but TASK_WEBHOOK_SECRET is missing"
                + (
                    f" or shorter than {MIN_TOKEN_SECRET_BYTES} bytes (INDOSTAR_ENV is production)"
                    if self.production
                    else ""
                )
            )

    def sms_provider_for_sending(self) -> str:
        """SMS_PROVIDER, refusing the `log` provider in production (it would mark SMS sent without sending)."""
        if self.production and self.sms_provider == "log":
            raise ConfigError(
                "SMS_PROVIDER=log only writes SMS to the log; set SMS_PROVIDER=msg91 or twilio in production "
                "(INDOSTAR_ENV is production)"
            )
        return self.sms_provider


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = str(err["loc"][0]).upper() if err["loc"] else "?"
        parts.append(f"{name}: {err['msg']}")
    return "invalid setting(s): " + "; ".join(parts)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, validated on first use."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def redacted_url(url: str) -> str:
    """A DSN safe to print: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"
