"""Settings: defaults that work on a developer machine, clear errors naming the variable."""

import subprocess
import sys

import pytest

from lib.config import ConfigError, Settings, get_settings, redacted_url


def test_defaults_point_at_local_services(monkeypatch):
    """With nothing set, the app talks to PostgreSQL and Redis on loopback."""
    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(_env_file=None)
    assert s.database_url.endswith("@127.0.0.1:5432/indostar")
    assert s.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DATABASE_URL", "mysql://root@localhost/shop", "DATABASE_URL"),
        ("DATABASE_URL", "not a url", "DATABASE_URL"),
        ("REDIS_URL", "http://127.0.0.1:6379", "REDIS_URL"),
        ("SMTP_PORT", "99999", "SMTP_PORT"),
        ("RETRY_ATTEMPTS", "-1", "RETRY_ATTEMPTS"),
    ],
)
def test_bad_setting_names_the_variable(monkeypatch, name, value, expected):
    """A malformed setting raises ConfigError whose message names the variable."""
    monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match=expected):
            get_settings()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_secrets_never_print(monkeypatch):
    """Secrets are SecretStr: the settings' repr and a redacted DSN hide them."""
    monkeypatch.setenv("SMTP_PASSWORD", "hunter2-smtp")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:pg-pass-123@db:5432/shop")
    s = Settings(_env_file=None)
    assert "hunter2-smtp" not in repr(s)
    assert "pg-pass-123" not in redacted_url(s.database_url)
    assert s.smtp_password.get_secret_value() == "hunter2-smtp"


def _cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_unreachable_database_gives_one_line_error(tmp_path):
    """migrate against a closed port exits 2 with the setting and address, no traceback."""
    import os

    env = {**os.environ, "DATABASE_URL": "postgresql+psycopg2://postgres:sekret@127.0.0.1:1/indostar"}
    r = _cli("migrate", env=env)
    assert r.returncode == 2
    assert "DATABASE_URL" in r.stderr and "127.0.0.1:1" in r.stderr
    assert "Traceback" not in r.stderr and "sekret" not in r.stderr


def test_malformed_database_url_is_rejected(tmp_path):
    """A non-PostgreSQL URL is refused before anything connects."""
    import os

    r = _cli("migrate", env={**os.environ, "DATABASE_URL": "sqlite:///x.db"})
    assert r.returncode == 2
    assert "DATABASE_URL" in r.stderr and "Traceback" not in r.stderr
