"""Flow tests run against one session-wide Prefect test harness."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _prefect(prefect_harness):
    yield


@pytest.fixture
def sentry_server(monkeypatch):
    """A loopback server accepting Sentry envelopes, with SENTRY_DSN pointing at it and the SDK started."""
    from lib import sentry
    from lib.config import get_settings
    from tests.servers import start_sentry

    server, received = start_sentry()
    monkeypatch.setenv("SENTRY_DSN", f"http://public@127.0.0.1:{server.server_address[1]}/1")
    monkeypatch.setenv("SENTRY_ENVIRONMENT", "test")
    get_settings.cache_clear()
    assert sentry.init(force=True)
    try:
        yield received
    finally:
        sentry.shutdown()
        monkeypatch.undo()
        get_settings.cache_clear()
        server.shutdown()
