"""The shared retry policy: bounded, capped, transient-only."""

import redis
import sqlalchemy.exc as sa_exc
from hypothesis import given
from hypothesis import strategies as st

from lib.errors import (
    ConfigError,
    InvalidInputError,
    PermanentError,
    ServiceUnavailableError,
    TransientError,
    is_transient,
)
from lib.retry import capped_delays


@given(
    attempts=st.integers(0, 12),
    base=st.floats(0, 1000),
    cap=st.floats(0, 5000),
    jitter=st.floats(0, 2),
)
def test_longest_possible_wait_stays_under_cap(attempts, base, cap, jitter):
    """Even stretched by the jitter factor, no delay exceeds the cap, and there is one per retry."""
    delays = capped_delays(attempts, base, cap, jitter)
    assert len(delays) == attempts
    assert all(d * (1 + jitter) <= cap + 0.01 for d in delays)
    assert delays == sorted(delays)


def test_defaults_grow_exponentially_then_cap():
    """10 s base doubles each time, then stops at 600/(1.5) = 400 s."""
    assert capped_delays(7, 10, 600, 0.5) == [10, 20, 40, 80, 160, 320, 400]


def test_only_transient_errors_are_retried():
    """Timeouts and TransientError retry; bad input and unknown errors do not."""
    assert is_transient(TransientError("smtp 421"))
    assert is_transient(TimeoutError())
    assert not is_transient(PermanentError("550"))
    assert not is_transient(InvalidInputError("bad id"))
    assert not is_transient(KeyError("x"))


class _ClosedError(Exception):
    """Stands in for the DBAPI error a driver raises when the server closes the connection."""


def test_connection_loss_is_transient_and_data_errors_are_not():
    """A dropped PostgreSQL or Redis connection is retried like a Redis outage; a constraint violation is not."""
    lost = sa_exc.OperationalError("UPDATE orders", {}, _ClosedError("server closed the connection unexpectedly"))
    assert is_transient(lost)
    invalidated = sa_exc.DBAPIError("SELECT 1", {}, _ClosedError("gone"), connection_invalidated=True)
    assert is_transient(invalidated)
    assert is_transient(redis.ConnectionError("Connection refused"))
    assert is_transient(ServiceUnavailableError("PostgreSQL is not reachable"))
    assert not is_transient(sa_exc.IntegrityError("INSERT", {}, _ClosedError("duplicate key")))
    assert not is_transient(sa_exc.DataError("INSERT", {}, _ClosedError("invalid input syntax")))
    assert not is_transient(ConfigError("TOKEN_SECRET too short"))
