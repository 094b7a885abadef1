"""Shared fixtures: a fresh PostgreSQL database made by the migrations, a Redis key
prefix of our own, an SMTP server and an SMS gateway on loopback, a Prefect API on a
PostgreSQL database of its own.

Environment is set here, before any lib module reads its settings, so every test in
the session talks to these services and nothing else.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import make_url

# `make test-clock` runs the calendar-sensitive tests with this process's clock moved ahead
# (INDOSTAR_TEST_CLOCK_OFFSET_DAYS), so a test that reads a literal date instead of today fails now, not on
# the day the calendar reaches it. It starts before anything imports Prefect or lib.
if os.environ.get("INDOSTAR_TEST_CLOCK_OFFSET_DAYS"):
    import tests.clock  # noqa: F401

_RUN = uuid.uuid4().hex[:8]
TEST_DB = f"indostar_test_{_RUN}"
PG_SERVER = os.environ.get("TEST_PG_SERVER", "postgresql+psycopg2://postgres@127.0.0.1:5432")
os.environ.update(
    {
        "INDOSTAR_ENV": "dev",
        "DATABASE_URL": f"{PG_SERVER}/{TEST_DB}",
        "REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "REDIS_KEY_PREFIX": f"indostar-test:{_RUN}:",
        "RAZORPAY_WEBHOOK_SECRET": "test-webhook-secret",
        # Retries stay real but take milliseconds.
        "RETRY_ATTEMPTS": "3",
        "RETRY_BASE_SECONDS": "0.05",
        "RETRY_CAP_SECONDS": "0.2",
        "RETRY_JITTER_FACTOR": "0.1",
        "SMTP_TIMEOUT": "2",
        "SMS_TIMEOUT": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
)

from devtools.smtp_sink import DevSMTPServer, free_port  # noqa: E402
from lib import db  # noqa: E402
from lib.config import get_settings  # noqa: E402
from tests.servers import start_gateway  # noqa: E402

APP_TABLES = (
    "background_tasks, webhook_events, notifications, subscription_outcomes, order_items, orders, "
    "subscriptions, cart_items, carts, audit_logs, user_sessions, products, customers"
)


@pytest.fixture(scope="session")
def migrated_database():
    """The test database, created and upgraded by the Alembic migrations; dropped at the end."""
    url = get_settings().database_url
    db.drop_database(url)
    db.migrate(url)
    yield url
    db.reset_engine()
    db.drop_database(url)


@pytest.fixture
def pg(migrated_database):
    """An empty app database for one test (tables truncated before it runs)."""
    from sqlalchemy import text

    with db.get_engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {APP_TABLES} RESTART IDENTITY CASCADE"))
    return db.get_engine()


@pytest.fixture(scope="session")
def redis_session():
    """A Redis client; every key under this session's prefix is removed at the end."""
    import redis

    client = redis.Redis.from_url(get_settings().redis_url, decode_responses=True)
    client.ping()
    yield client
    _wipe_prefix(client)
    client.close()


def _wipe_prefix(client) -> None:
    prefix = get_settings().redis_key_prefix
    batch = list(client.scan_iter(match=f"{prefix}*", count=1000))
    while batch:
        client.delete(*batch[:500])
        batch = batch[500:]


@pytest.fixture
def redis_client(redis_session):
    """Redis with this session's prefix emptied before the test."""
    _wipe_prefix(redis_session)
    return redis_session


@pytest.fixture(scope="session")
def smtp_server():
    """An aiosmtpd server on a free loopback port that records every message."""
    port = free_port()
    os.environ["SMTP_PORT"] = str(port)
    os.environ["SMTP_HOST"] = "127.0.0.1"
    get_settings.cache_clear()
    server = DevSMTPServer("127.0.0.1", port).start()
    yield server
    server.stop()


@pytest.fixture
def smtp(smtp_server):
    """The SMTP server with its inbox and faults cleared; restarted if a test stopped it."""
    smtp_server.handler.reset()
    if not smtp_server.running:
        smtp_server.start()
    yield smtp_server
    if not smtp_server.running:
        smtp_server.start()


@pytest.fixture(scope="session")
def sms_gateway_session():
    server, state = start_gateway()
    os.environ["SMS_BASE_URL"] = f"http://127.0.0.1:{server.server_address[1]}"
    os.environ["SMS_PROVIDER"] = "msg91"
    os.environ["SMS_API_KEY"] = "test-sms-key"
    get_settings.cache_clear()
    yield state
    server.shutdown()


@pytest.fixture
def sms_gateway(sms_gateway_session):
    """The loopback SMS gateway with its log and fault script cleared."""
    sms_gateway_session.reset()
    return sms_gateway_session


@pytest.fixture(scope="session")
def prefect_template(migrated_database) -> Iterator[str]:
    """A Prefect database migrated once per session; each server gets a copy (seconds saved per module)."""
    from deployments import prefect_db

    url = prefect_db.prefect_database_url(migrated_database, f"{make_url(migrated_database).database}_prefect")
    prefect_db.migrate_prefect_database(url)
    yield url
    prefect_db.drop_prefect_database(url)


@pytest.fixture(scope="session")
def prefect_database(prefect_template) -> Iterator[Callable[[str], str]]:
    """Make a fresh, migrated Prefect database (PostgreSQL) named after ``suffix``; all dropped at the end."""
    from deployments import prefect_db

    made: list[str] = []

    def make(suffix: str) -> str:
        url = prefect_db.prefect_database_url(prefect_template, f"{make_url(prefect_template).database}_{suffix}")
        prefect_db.copy_prefect_database(prefect_template, url)
        made.append(url)
        return url

    yield make
    for url in made:
        prefect_db.drop_prefect_database(url)


@pytest.fixture(scope="session")
def prefect_harness(prefect_database):
    """One temporary Prefect API on PostgreSQL for the whole session (it is slow to start)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from devtools.prefect_harness import prefect_harness as harness

    # Flows called in-process need no heartbeat (no worker to lose), and Prefect 3.9's heartbeat
    # thread sleeps in whole seconds: joining it adds up to 1 s to the end of every flow run.
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), harness(prefect_database("harness")) as url:
        yield url
        _drain_prefect_logs()


def _drain_prefect_logs() -> None:
    import contextlib

    from prefect.logging.handlers import APILogWorker

    # Teardown must stay quiet whatever state the log worker is in.
    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=5)
