"""The four cleanup flows end to end under the Prefect harness, on the real PostgreSQL and Redis."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from flows.cleanup import (
    cleanup_abandoned_sessions,
    cleanup_expired_carts,
    cleanup_expired_tokens,
    cleanup_old_audit_logs,
)
from lib import tokens
from lib.config import get_settings
from tests.builders import count_rows, make_audit_log, make_cart, make_user_session


def _run_artifact(key: str, state) -> list[dict]:
    """The rows of artifact ``key`` published by the flow run of ``state`` (not merely the newest under the key)."""
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
            )
        )
    assert len(found) == 1, f"{len(found)} artifacts {key} for run {run_id}"
    return found[0].data if isinstance(found[0].data, list) else json.loads(found[0].data)


def test_cart_flow_removes_stale_carts_once_and_publishes_its_summary(pg):
    """29-day-old carts stay, 31-day-old carts go with their items; a second run removes nothing."""
    make_cart(pg, age_days=29, items=1)
    make_cart(pg, age_days=31)
    make_cart(pg, age_days=31, items=2)
    first = cleanup_expired_carts(batch_size=1)
    assert first["removed"] == {"empty_carts": 1, "carts_with_items": 1, "cart_items": 2}
    assert first["batches"] >= 2 and first["age_histogram"] == {31: 2}
    assert count_rows(pg, "carts") == 1 and count_rows(pg, "cart_items") == 1
    second_state = cleanup_expired_carts(batch_size=1, return_state=True)
    second = second_state.result()
    assert sum(second["removed"].values()) == 0
    rows = _run_artifact("cleanup-expired-carts-summary", second_state)
    assert {r["kind"]: r["removed"] for r in rows} == {"empty_carts": 0, "carts_with_items": 0, "cart_items": 0}
    hist = _run_artifact("cleanup-expired-carts-age-histogram", second_state)
    assert [r["age_days"] for r in hist][:2] == ["0-29", "30-44"]


def test_cart_flow_stopping_early_has_removed_the_empty_carts_first(pg):
    """With max_batches=1 the run stops early, says so, and the stale empty carts are the ones gone."""
    make_cart(pg, age_days=60, items=1)
    for _ in range(3):
        make_cart(pg, age_days=60)
    out = cleanup_expired_carts(batch_size=5, max_batches=1)
    assert out["stopped_early"] and out["removed"]["empty_carts"] == 3
    assert count_rows(pg, "carts") == 1 and count_rows(pg, "cart_items") == 1


def test_cart_flow_soft_limit_stops_claiming_batches(pg):
    """A soft limit already spent stops the run before its first batch and reports stopped_early."""
    make_cart(pg, age_days=60)
    out = cleanup_expired_carts(soft_limit_seconds=1e-9)
    assert out["stopped_early"] and out["batches"] == 0
    assert count_rows(pg, "carts") == 1


def test_cart_flow_dry_run_deletes_nothing(pg):
    """dry_run=True reports the stale carts and leaves them in place."""
    make_cart(pg, age_days=45, items=1)
    out = cleanup_expired_carts(dry_run=True)
    assert out["removed"]["carts_with_items"] == 1 and out["dry_run"]
    assert count_rows(pg, "carts") == 1 and count_rows(pg, "cart_items") == 1


@pytest.mark.parametrize(
    ("flow_fn", "params", "word"),
    [
        (cleanup_expired_carts, {"days_old": 0}, "days_old"),
        (cleanup_expired_carts, {"batch_size": -1}, "batch_size"),
        (cleanup_old_audit_logs, {"days": -3}, "days"),
        (cleanup_old_audit_logs, {"batch_size": 0}, "batch_size"),
        (cleanup_abandoned_sessions, {"inactive_days": 0}, "inactive_days"),
    ],
)
def test_flows_reject_non_positive_days_and_batch_sizes_before_deleting(pg, flow_fn, params, word):
    """A day count or batch size <= 0 fails the run with a message naming it, and every row is still there.

    The typed parameters (PositiveInt) let Prefect refuse them before the run starts, as the UI form does.
    """
    from prefect.exceptions import ParameterTypeError

    make_cart(pg, age_days=400)
    make_audit_log(pg, age_days=400)
    make_user_session(pg, inactive_days=400)
    with pytest.raises(ParameterTypeError, match=rf"{word}: Input should be greater than 0"):
        flow_fn(**params)
    assert (count_rows(pg, "carts"), count_rows(pg, "audit_logs"), count_rows(pg, "user_sessions")) == (1, 1, 1)


def test_audit_log_and_session_flows_remove_old_rows_once(pg):
    """Old audit logs and idle sessions go in batches; recent ones stay; a second run removes nothing."""
    make_audit_log(pg, age_days=89)
    for _ in range(3):
        make_audit_log(pg, age_days=91)
    make_user_session(pg, inactive_days=29)
    make_user_session(pg, inactive_days=31)
    assert cleanup_old_audit_logs(batch_size=2)["removed"] == {"audit_logs": 3}
    assert cleanup_abandoned_sessions(inactive_days=30)["removed"] == {"user_sessions": 1}
    audit_again = cleanup_old_audit_logs(return_state=True)
    assert audit_again.result()["removed"] == {"audit_logs": 0}
    assert cleanup_abandoned_sessions(inactive_days=30)["removed"] == {"user_sessions": 0}
    assert count_rows(pg, "audit_logs") == 1 and count_rows(pg, "user_sessions") == 1
    rows = _run_artifact("cleanup-old-audit-logs-summary", audit_again)
    assert rows[0]["kind"] == "audit_logs" and "longest_batch_ms" in rows[0]


def test_token_flow_cleans_up_per_kind_and_a_second_run_removes_nothing(redis_client):
    """Expired and TTL-lost tokens are counted per kind and removed; live ones verify; the rerun is a no-op."""
    live = tokens.issue("password_reset", 1, 60)
    dead = tokens.issue("otp", 2, 60)
    key = f"{get_settings().redis_key_prefix}tok:otp:2"
    redis_client.persist(key)
    redis_client.hset(key, "e", 1)
    first = cleanup_expired_tokens()
    assert first["by_kind"]["otp"]["keys_removed"] == 1
    assert first["by_kind"]["password_reset"]["keys_removed"] == 0
    assert tokens.verify("password_reset", live) == "1"
    assert tokens.verify_otp(2, dead) == tokens.OtpResult.MISSING
    second_state = cleanup_expired_tokens(return_state=True)
    second = second_state.result()
    assert all(v == 0 for k, v in second["removed"].items() if not k.endswith("_kept"))
    rows = _run_artifact("cleanup-expired-tokens-summary", second_state)
    assert [r["kind"] for r in rows] == list(tokens.KINDS)


@contextmanager
def _redis_url(monkeypatch, url: str):
    """REDIS_URL set to ``url`` inside the block, with the settings and client caches cleared around it."""
    monkeypatch.setenv("REDIS_URL", url)
    get_settings.cache_clear()
    tokens.get_redis.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        tokens.get_redis.cache_clear()


@pytest.fixture
def dead_redis(monkeypatch):
    """REDIS_URL pointing at a closed loopback port, with the settings and client caches cleared around it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with _redis_url(monkeypatch, f"redis://127.0.0.1:{port}/0"):
        yield port


def test_token_flow_fails_naming_the_address_when_redis_is_down_and_leaves_postgres_alone(pg, dead_redis):
    """With Redis unreachable the run fails with a message naming 127.0.0.1:<port>; no PostgreSQL row changes."""
    make_cart(pg, age_days=400, items=1)
    make_audit_log(pg, age_days=400)
    make_user_session(pg, inactive_days=400)
    state = cleanup_expired_tokens(return_state=True)
    assert state.is_failed()
    with pytest.raises(tokens.RedisUnavailableError, match=rf"127\.0\.0\.1:{dead_redis}.*REDIS_URL"):
        state.result()
    assert (count_rows(pg, "carts"), count_rows(pg, "cart_items")) == (1, 1)
    assert (count_rows(pg, "audit_logs"), count_rows(pg, "user_sessions")) == (1, 1)


@pytest.mark.parametrize(
    ("flow_fn", "table", "make_old", "make_recent"),
    [
        (
            cleanup_old_audit_logs,
            "audit_logs",
            lambda pg: make_audit_log(pg, age_days=120),
            lambda pg: make_audit_log(pg, age_days=10),
        ),
        (
            cleanup_abandoned_sessions,
            "user_sessions",
            lambda pg: make_user_session(pg, inactive_days=60),
            lambda pg: make_user_session(pg, inactive_days=1),
        ),
    ],
    ids=["audit-logs", "sessions"],
)
def test_audit_and_session_cleanups_stop_at_their_limits_and_the_next_runs_finish(
    pg, flow_fn, table, make_old, make_recent
):
    """A spent soft limit removes nothing, max_batches=1 removes one batch, both say stopped_early; the next
    run removes the rest and a recent row stays throughout."""
    for _ in range(5):
        make_old(pg)
    make_recent(pg)
    spent = flow_fn(batch_size=2, soft_limit_seconds=1e-9)
    assert spent["stopped_early"] and spent["batches"] == 0 and count_rows(pg, table) == 6
    one_batch = flow_fn(batch_size=2, max_batches=1)
    assert one_batch["stopped_early"] and (one_batch["batches"], one_batch["removed"]) == (1, {table: 2})
    assert count_rows(pg, table) == 4
    rest = flow_fn(batch_size=2)
    assert not rest["stopped_early"] and rest["removed"] == {table: 3} and count_rows(pg, table) == 1
    assert flow_fn(batch_size=2)["removed"] == {table: 0}


def _expired_and_live_tokens(kind: str, user: int) -> str:
    """Two tokens of ``kind`` whose native TTL has fired (index and per-user entries left) and one live token."""
    for offset in (0, 1):
        tokens.issue(kind, user + offset, 0.001)
    return tokens.issue(kind, user + 2, 600)


class HoldingRedisProxy:
    """A loopback TCP proxy to the real Redis that holds the first script call (EVALSHA) until released.

    A fake for one fault only: a Redis call that is slow on demand, which the shared Redis cannot be made to
    do for our connection alone (CLIENT PAUSE or a long script would stall every client of it). Every byte
    still goes to and comes from the real Redis.
    """

    def __init__(self, host: str, port: int):
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held_at: float | None = None
        self.held, self.release = threading.Event(), threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and b"\r\nEVALSHA\r\n" in data.upper() and not self.held.is_set():
                    self.held_at = time.monotonic()
                    self.held.set()
                    self.release.wait(30)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                sock.close()

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture
def slow_redis(redis_client, monkeypatch):
    """REDIS_URL through a HoldingRedisProxy to the test Redis, settings and client caches cleared around it."""
    kw = redis_client.connection_pool.connection_kwargs
    proxy = HoldingRedisProxy(kw.get("host", "127.0.0.1"), kw.get("port", 6379))
    with _redis_url(monkeypatch, f"redis://127.0.0.1:{proxy.port}/{kw.get('db', 0)}"):
        yield proxy
        proxy.close()


def test_token_flow_stops_at_the_soft_limit_after_its_first_batch_and_the_next_run_finishes(slow_redis, redis_client):
    """A script call still running at the soft limit completes, no further batch starts (the other kinds wait),
    live tokens are untouched, and the next run cleans the rest."""
    soft_limit = 2.0
    live = {kind: _expired_and_live_tokens(kind, 10 * i) for i, kind in enumerate(tokens.KINDS)}
    time.sleep(0.02)  # the 1 ms tokens have expired natively
    index = {kind: f"{get_settings().redis_key_prefix}tokexp:{kind}" for kind in tokens.KINDS}
    assert [redis_client.zcard(index[k]) for k in tokens.KINDS] == [3, 3, 3]

    def release_after_the_soft_limit() -> None:
        # The run fixed its deadline before its first script call: past it soft_limit after the call is held.
        if slow_redis.held.wait(30):
            time.sleep(max(0.0, slow_redis.held_at + soft_limit + 0.3 - time.monotonic()))
        slow_redis.release.set()

    releaser = threading.Thread(target=release_after_the_soft_limit)
    releaser.start()
    started = time.monotonic()
    try:
        first = cleanup_expired_tokens(soft_limit_seconds=soft_limit)
    finally:
        slow_redis.release.set()
        releaser.join(60)
    assert slow_redis.held_at is not None and slow_redis.held_at - started < soft_limit, "first batch not reached"
    assert first["stopped_early"] and first["batches"] == 1
    assert first["by_kind"]["password_reset"]["index_entries_removed"] == 2
    assert first["by_kind"]["otp"]["index_entries_removed"] == 0
    assert [redis_client.zcard(index[k]) for k in tokens.KINDS] == [1, 3, 3]
    second = cleanup_expired_tokens()
    assert not second["stopped_early"]
    assert [second["by_kind"][k]["index_entries_removed"] for k in tokens.KINDS] == [0, 2, 2]
    assert [redis_client.zcard(index[k]) for k in tokens.KINDS] == [1, 1, 1]
    assert tokens.verify("password_reset", live["password_reset"]) == "2"
    assert tokens.verify("email_verification", live["email_verification"]) == "12"
    assert tokens.verify_otp(22, live["otp"]) == tokens.OtpResult.OK
