"""Flow tests run against one session-wide Prefect test harness."""

import threading

import pytest

from flows.background import TaskWorker


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


POLL = 0.2  # seconds between a test worker's polls: short, so a test waits little


@pytest.fixture
def worker(pg, smtp, sms_gateway, redis_client):
    """A task worker in a thread of this process, listening before the test starts; stopped after it."""
    started: list[tuple[TaskWorker, threading.Thread]] = []

    def start(batch_size: int = 50) -> TaskWorker:
        w = TaskWorker(batch_size=batch_size, concurrency=2, poll_seconds=POLL)
        listening = threading.Event()
        t = threading.Thread(target=w.run, kwargs={"ready": listening.set}, daemon=True)
        t.start()
        assert listening.wait(10), "the task worker did not start listening"
        started.append((w, t))
        return w

    yield start
    for w, t in started:
        w.stop()
        t.join(20)
        assert not t.is_alive(), "the task worker did not stop"
