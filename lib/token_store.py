"""The Redis token store's connection and key layout: the contract the backend and the flows share.

The backend issues and checks tokens through lib.tokens (which writes this layout) and
cleanup goes through lib.token_cleanup. ``P`` is ``settings.redis_key_prefix``; ``{kind}``
is one of ``KINDS``.

    P tok:{kind}:{id}   hash  u = user id, e = expiry (epoch ms), h = code HMAC (OTP only)
                        with a native TTL (PEXPIRE). For password_reset and
                        email_verification, id = HMAC-SHA256(TOKEN_SECRET, "kind:token")
                        in hex; the token itself is never stored. For otp, id = user id
                        (one live OTP per user; a new one replaces the old) and
                        h = HMAC-SHA256(TOKEN_SECRET, "otp:user:code").
    P tokexp:{kind}     sorted set  member = id, score = expiry (epoch ms): the expiry index
    P tokuser:{user}    set         members "{kind}:{id}": the per-user index (revoke_all)
    P otpfail:{user}    string      wrong OTP guesses; TTL = lockout window; locks at 5

A token is alive while its key exists and its ``e`` has not passed; the native TTL
removes the key on time, the indexes are only hints. Cleanup therefore never deletes a
key whose PTTL is still running, whatever the index says: it drops index entries of
keys already gone, per-user entries of keys already gone, and keys that lost their TTL
(PTTL = -1, e.g. after a PERSIST or a restore) once their own ``e`` has passed.

Every multi-key change is atomic (MULTI or a Lua script). Scripts build key names from
the prefix, which is fine on the single Redis the shop runs; Redis Cluster would need
hash tags. Functions take an optional ``client``; without it they use ``get_redis()``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import redis

from lib.config import get_settings
from lib.errors import InvalidInputError, ServiceUnavailableError

KINDS = ("password_reset", "email_verification", "otp")
LINK_KINDS = ("password_reset", "email_verification")  # checked by token alone

Client = redis.Redis
UserId = int | str

REDIS_HINT = "start Redis (e.g. `redis-server --daemonize yes`) or set REDIS_URL"


class RedisUnavailableError(ServiceUnavailableError):
    """Redis does not answer; the message names REDIS_URL and the address. Retried: Redis may come back."""


@lru_cache(maxsize=1)
def get_redis() -> Client:
    """The process-wide Redis client from REDIS_URL (strings in, strings out); connects on first use."""
    return redis.Redis.from_url(
        get_settings().redis_url,
        decode_responses=True,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=30,
    )


def client_or_default(client: Client | None) -> Client:
    """The given client, or the process-wide one."""
    return client if client is not None else get_redis()


def _address_of(client: Client) -> str:
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return str(kw["path"])
    return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


@contextmanager
def answering(client: Client) -> Iterator[None]:
    """Turn "Redis does not answer" into an error that says where we looked and what to do."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailableError(
            f"Redis is not reachable at {_address_of(client)} (REDIS_URL): {exc}; {REDIS_HINT}"
        ) from exc


def ping(client: Client | None = None) -> None:
    """Fail with RedisUnavailableError naming the address when Redis does not answer."""
    r = client_or_default(client)
    with answering(r):
        r.ping()


def key_prefix() -> str:
    return get_settings().redis_key_prefix


def token_key(kind: str, token_id: str) -> str:
    return f"{key_prefix()}tok:{kind}:{token_id}"


def index_key(kind: str) -> str:
    return f"{key_prefix()}tokexp:{kind}"


def user_key(user_id: UserId) -> str:
    return f"{key_prefix()}tokuser:{user_id}"


def fail_key(user_id: UserId) -> str:
    return f"{key_prefix()}otpfail:{user_id}"


def digest(message: str) -> str:
    # token_key() refuses the dev default in production: a public key would make a stored OTP hash reversible.
    return hmac.new(get_settings().token_key(), message.encode(), hashlib.sha256).hexdigest()


def token_id(kind: str, token: str) -> str:
    """The stored id of a link token: its HMAC, so a Redis dump holds no usable token."""
    return digest(f"{kind}:{token}")


def check_kind(kind: str, allowed: tuple[str, ...] = KINDS) -> str:
    if kind not in allowed:
        if kind == "otp":
            raise InvalidInputError("an OTP is checked per user: use verify_otp(user_id, code)")
        raise InvalidInputError(f"unknown token kind {kind!r}; expected one of {allowed}")
    return kind


def check_user(user_id: UserId) -> str:
    uid = str(user_id)
    if not uid or len(uid) > 64 or any(c.isspace() for c in uid):
        raise InvalidInputError("user_id must be 1-64 characters without spaces")
    return uid


def ttl_ms(ttl: float | dt.timedelta) -> int:
    seconds = ttl.total_seconds() if isinstance(ttl, dt.timedelta) else float(ttl)
    ms = round(seconds * 1000)
    if ms <= 0:
        raise InvalidInputError(f"a token TTL must be > 0, got {ttl!r}")
    return ms


def now_ms() -> int:
    return time.time_ns() // 1_000_000
