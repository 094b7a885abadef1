"""The Redis token store: password-reset, email-verification and OTP tokens, and their expiry.

The backend issues and checks tokens through this module, so the key layout below is the
contract. ``P`` is ``settings.redis_key_prefix``; ``{kind}`` is one of ``KINDS``.

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
import enum
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import redis

from lib.cleanup import Limits, PassStats
from lib.config import get_settings
from lib.errors import InvalidInputError, ServiceUnavailableError

log = logging.getLogger(__name__)

KINDS = ("password_reset", "email_verification", "otp")
LINK_KINDS = ("password_reset", "email_verification")  # checked by token alone
OTP_MAX_FAILURES = 5
OTP_LOCKOUT_SECONDS = 15 * 60

Client = redis.Redis
UserId = int | str

REDIS_HINT = "start Redis (e.g. `redis-server --daemonize yes`) or set REDIS_URL"


class RedisUnavailableError(ServiceUnavailableError):
    """Redis does not answer; the message names REDIS_URL and the address. Retried: Redis may come back."""


class OtpResult(enum.StrEnum):
    """The outcome of checking an OTP."""

    OK = "ok"  # right code; it is now used up
    WRONG = "wrong"  # wrong code; one more failure counted
    MISSING = "missing"  # no live OTP for this user (never issued, expired or used)
    LOCKED = "locked"  # too many wrong codes; try again after the lockout window


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


def _client(client: Client | None) -> Client:
    return client if client is not None else get_redis()


def _address_of(client: Client) -> str:
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return str(kw["path"])
    return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


@contextmanager
def _answering(client: Client) -> Iterator[None]:
    """Turn "Redis does not answer" into an error that says where we looked and what to do."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailableError(
            f"Redis is not reachable at {_address_of(client)} (REDIS_URL): {exc}; {REDIS_HINT}"
        ) from exc


def ping(client: Client | None = None) -> None:
    """Fail with RedisUnavailableError naming the address when Redis does not answer."""
    r = _client(client)
    with _answering(r):
        r.ping()


# ---- layout ---------------------------------------------------------------------------


def _prefix() -> str:
    return get_settings().redis_key_prefix


def token_key(kind: str, token_id: str) -> str:
    return f"{_prefix()}tok:{kind}:{token_id}"


def index_key(kind: str) -> str:
    return f"{_prefix()}tokexp:{kind}"


def user_key(user_id: UserId) -> str:
    return f"{_prefix()}tokuser:{user_id}"


def fail_key(user_id: UserId) -> str:
    return f"{_prefix()}otpfail:{user_id}"


def _digest(message: str) -> str:
    # token_key() refuses the dev default in production: a public key would make a stored OTP hash reversible.
    return hmac.new(get_settings().token_key(), message.encode(), hashlib.sha256).hexdigest()


def token_id(kind: str, token: str) -> str:
    """The stored id of a link token: its HMAC, so a Redis dump holds no usable token."""
    return _digest(f"{kind}:{token}")


def _check_kind(kind: str, allowed: tuple[str, ...] = KINDS) -> str:
    if kind not in allowed:
        if kind == "otp":
            raise InvalidInputError("an OTP is checked per user: use verify_otp(user_id, code)")
        raise InvalidInputError(f"unknown token kind {kind!r}; expected one of {allowed}")
    return kind


def _check_user(user_id: UserId) -> str:
    uid = str(user_id)
    if not uid or len(uid) > 64 or any(c.isspace() for c in uid):
        raise InvalidInputError("user_id must be 1-64 characters without spaces")
    return uid


def _ttl_ms(ttl: float | dt.timedelta) -> int:
    seconds = ttl.total_seconds() if isinstance(ttl, dt.timedelta) else float(ttl)
    ms = round(seconds * 1000)
    if ms <= 0:
        raise InvalidInputError(f"a token TTL must be > 0, got {ttl!r}")
    return ms


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---- issue, verify, consume, revoke ------------------------------------------------------


def issue(kind: str, user_id: UserId, ttl: float | dt.timedelta, *, client: Client | None = None) -> str:
    """A new token of ``kind`` for ``user_id`` living ``ttl`` (seconds or timedelta); returned once, stored hashed.

    For ``otp`` the token is a 6-digit code and replaces the user's previous OTP.
    """
    _check_kind(kind)
    uid = _check_user(user_id)
    ms = _ttl_ms(ttl)
    expires = now_ms() + ms
    if kind == "otp":
        token = f"{secrets.randbelow(10**6):06d}"
        tid, fields = uid, {"u": uid, "e": expires, "h": _digest(f"otp:{uid}:{token}")}
    else:
        token = secrets.token_urlsafe(32)
        tid, fields = token_id(kind, token), {"u": uid, "e": expires}
    key = token_key(kind, tid)
    r = _client(client)
    with _answering(r):
        pipe = r.pipeline(transaction=True)
        pipe.delete(key)  # an OTP replaces the previous one wholesale
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # values are str and int
        pipe.pexpire(key, ms)
        pipe.zadd(index_key(kind), {tid: expires})
        pipe.sadd(user_key(uid), f"{kind}:{tid}")
        pipe.execute()
    return token


def verify(kind: str, token: str, *, client: Client | None = None) -> str | None:
    """The user id a live link token belongs to, or None; does not use the token up."""
    _check_kind(kind, LINK_KINDS)
    r = _client(client)
    with _answering(r):
        user, expires = r.hmget(token_key(kind, token_id(kind, token)), ["u", "e"])
    # The key's own expiry decides even if its TTL was lost.
    if user is None or expires is None or int(expires) <= now_ms():
        return None
    return str(user)


_CONSUME = """
local v = redis.call('HMGET', KEYS[1], 'u', 'e')
local u, e = v[1], tonumber(v[2])
if not u then return false end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('SREM', ARGV[1] .. 'tokuser:' .. u, ARGV[3] .. ':' .. ARGV[2])
if (not e) or e <= tonumber(ARGV[4]) then return false end
return u
"""


def consume(kind: str, token: str, *, client: Client | None = None) -> str | None:
    """Use a link token up: the user id if it was live (exactly one caller ever gets it), else None."""
    _check_kind(kind, LINK_KINDS)
    tid = token_id(kind, token)
    r = _client(client)
    with _answering(r):
        user = r.eval(_CONSUME, 2, token_key(kind, tid), index_key(kind), _prefix(), tid, kind, now_ms())
    return None if user is None else str(user)


_REVOKE_ALL = """
local n = 0
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local kind = string.match(m, '^([^:]+):')
  local id = string.sub(m, #kind + 2)
  n = n + redis.call('DEL', ARGV[1] .. 'tok:' .. m)
  redis.call('ZREM', ARGV[1] .. 'tokexp:' .. kind, id)
end
redis.call('DEL', KEYS[1])
return n
"""


def revoke_all(user_id: UserId, *, client: Client | None = None) -> int:
    """Delete every token of a user (e.g. after a password change); returns how many were live keys."""
    uid = _check_user(user_id)
    r = _client(client)
    with _answering(r):
        return int(r.eval(_REVOKE_ALL, 1, user_key(uid), _prefix()))


_VERIFY_OTP = """
local otp, fails_key, idx, ukey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local digest, uid, now, max_fails, lockout = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local function drop()
  redis.call('DEL', otp)
  redis.call('ZREM', idx, uid)
  redis.call('SREM', ukey, 'otp:' .. uid)
end
if tonumber(redis.call('GET', fails_key) or '0') >= max_fails then return 'locked' end
local v = redis.call('HMGET', otp, 'h', 'e')
if (not v[1]) or (tonumber(v[2]) or 0) <= now then return 'missing' end
if v[1] == digest then
  drop()
  redis.call('DEL', fails_key)
  return 'ok'
end
local fails = redis.call('INCR', fails_key)
if fails == 1 then redis.call('PEXPIRE', fails_key, lockout) end
if fails >= max_fails then
  drop()
  return 'locked'
end
return 'wrong'
"""


def verify_otp(
    user_id: UserId, code: str, *, client: Client | None = None, lockout_seconds: float = OTP_LOCKOUT_SECONDS
) -> OtpResult:
    """Check a user's OTP: right once (then used up); after 5 wrong codes the user is locked out for a while."""
    uid = _check_user(user_id)
    r = _client(client)
    with _answering(r):
        out = r.eval(
            _VERIFY_OTP,
            4,
            token_key("otp", uid),
            fail_key(uid),
            index_key("otp"),
            user_key(uid),
            _digest(f"otp:{uid}:{code.strip()}"),
            uid,
            now_ms(),
            OTP_MAX_FAILURES,
            _ttl_ms(lockout_seconds),
        )
    return OtpResult(out)


# ---- cleanup ------------------------------------------------------------------------------

# One chunk of the expiry index, atomically: an entry whose key is gone is dropped; a key
# still counting down (PTTL > 0) is kept and its entry moved to its real expiry (the index
# was wrong); a key without TTL is deleted only when its own `e` has passed, otherwise
# its TTL is put back. Every entry handled leaves the range [-inf, now], so the loop ends.
_PURGE_INDEX = """
local p, kind, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local offset, limit, dry = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6] == '1'
local idx = KEYS[1]
local ids = redis.call('ZRANGEBYSCORE', idx, '-inf', now, 'LIMIT', offset, limit)
local gone, expired, kept, restored = 0, 0, 0, 0
for _, id in ipairs(ids) do
  local key = p .. 'tok:' .. kind .. ':' .. id
  local pttl = redis.call('PTTL', key)
  if pttl == -2 then
    gone = gone + 1
    if not dry then redis.call('ZREM', idx, id) end
  elseif pttl >= 0 then
    kept = kept + 1
    if not dry then redis.call('ZADD', idx, now + pttl + 1, id) end
  else
    local v = redis.call('HMGET', key, 'u', 'e')
    local e = tonumber(v[2])
    if e and e > now then
      restored = restored + 1
      if not dry then
        redis.call('PEXPIRE', key, e - now)  -- relative to our clock, as the index is (now + pttl)
        redis.call('ZADD', idx, e, id)
      end
    elseif e then
      expired = expired + 1
      if not dry then
        redis.call('DEL', key)
        redis.call('ZREM', idx, id)
        if v[1] then redis.call('SREM', p .. 'tokuser:' .. v[1], kind .. ':' .. id) end
      end
    else
      -- No expiry we can trust: leave the key alone, drop only the hint.
      kept = kept + 1
      if not dry then redis.call('ZREM', idx, id) end
    end
  end
end
return {#ids, gone, expired, kept, restored}
"""

# Shared ending of the scripts that tally by name: the `counts` table as a flat
# {name, n, name, n, ...} reply (Redis cannot return a Lua table with string keys).
_RETURN_COUNTS = """
local out = {}
for k, n in pairs(counts) do
  table.insert(out, k)
  table.insert(out, n)
end
return out
"""

# Per-user index entries whose token key is gone (expired natively or deleted).
_PURGE_USERS = (
    """
local p, dry = ARGV[1], ARGV[2] == '1'
local counts = {}
for _, ukey in ipairs(KEYS) do
  for _, m in ipairs(redis.call('SMEMBERS', ukey)) do
    if redis.call('EXISTS', p .. 'tok:' .. m) == 0 then
      local kind = string.match(m, '^([^:]+):') or '?'
      counts[kind] = (counts[kind] or 0) + 1
      if not dry then redis.call('SREM', ukey, m) end
    end
  end
end
"""
    + _RETURN_COUNTS
)

# Token keys found by SCAN that have no TTL: deleted once their own `e` passed, else
# their TTL is put back (and their index entry). Keys with a running TTL are skipped.
_PURGE_TTL_LOST = (
    """
local p, now, dry = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local base = #p + 5
local counts = {}
local function bump(name)
  counts[name] = (counts[name] or 0) + 1
end
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) == -1 then
    local rest = string.sub(key, base)
    local kind = string.match(rest, '^([^:]+):')
    if kind then
      local id = string.sub(rest, #kind + 2)
      local v = redis.call('HMGET', key, 'u', 'e')
      local e = tonumber(v[2])
      -- A dry run leaves keys the index pass already counted in place: skip them here.
      local score = dry and tonumber(redis.call('ZSCORE', p .. 'tokexp:' .. kind, id))
      if score and score <= now then
        e = nil
      end
      if e and e <= now then
        bump(kind .. '|expired')
        if not dry then
          redis.call('DEL', key)
          redis.call('ZREM', p .. 'tokexp:' .. kind, id)
          if v[1] then redis.call('SREM', p .. 'tokuser:' .. v[1], kind .. ':' .. id) end
        end
      elseif e then
        bump(kind .. '|restored')
        if not dry then
          redis.call('PEXPIRE', key, e - now)
          redis.call('ZADD', p .. 'tokexp:' .. kind, e, id)
        end
      end
    end
  end
end
"""
    + _RETURN_COUNTS
)


def _pairs(flat: list[Any]) -> dict[str, int]:
    return {str(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def purge_expired_index(
    kind: str,
    *,
    client: Client | None = None,
    now: int | None = None,
    dry_run: bool = False,
    chunk: int = 500,
    limits: Limits | None = None,
) -> PassStats:
    """Walk the kind's expiry index up to now in chunks (one script call each); never removes a live key.

    Counts: ``{kind}`` expired keys removed (TTL lost, past expiry), ``{kind}_index`` entries
    of keys already gone dropped, ``{kind}_kept`` live keys whose entry was wrong,
    ``{kind}_ttl_restored`` keys whose lost TTL was put back.
    """
    _check_kind(kind)
    r = _client(client)
    limits = limits or Limits()
    at = now_ms() if now is None else now
    stats = PassStats(removed={kind: 0, f"{kind}_index": 0})
    offset = 0
    with _answering(r):
        script = r.register_script(_PURGE_INDEX)
        while True:
            if limits.reached(stats.batches):
                stats.stopped_early = True
                return stats
            started = time.perf_counter()
            seen, gone, expired, kept, restored = script(
                keys=[index_key(kind)], args=[_prefix(), kind, at, offset, chunk, int(dry_run)]
            )
            stats.add(
                {kind: expired, f"{kind}_index": gone, f"{kind}_kept": kept, f"{kind}_ttl_restored": restored},
                (time.perf_counter() - started) * 1000,
            )
            if seen < chunk:
                return stats
            # A real run empties the range as it goes; a dry run changes nothing, so it pages.
            if dry_run:
                offset += seen


def _scan_batches(r: Client, pattern: str, count: int, type_: str | None) -> Iterator[list[str]]:
    """SCAN (never KEYS) in pages of about ``count`` keys."""
    cursor = 0
    while True:
        cursor, keys = r.scan(cursor=cursor, match=pattern, count=count, _type=type_)
        if keys:
            yield [str(k) for k in keys]
        if int(cursor) == 0:
            return


def _script_over_scan(
    r: Client, source: str, pattern: str, type_: str, count: int, limits: Limits, stats: PassStats, args: list[Any]
) -> Iterator[tuple[dict[str, int], float]]:
    """Run a Lua script on each SCAN batch of keys; yields its counts and milliseconds until done or limits stop it."""
    script = r.register_script(source)
    for keys in _scan_batches(r, pattern, count, type_):
        if limits.reached(stats.batches):
            stats.stopped_early = True
            return
        started = time.perf_counter()
        counts = _pairs(script(keys=keys, args=args))
        yield counts, (time.perf_counter() - started) * 1000


def purge_dangling_user_entries(
    *, client: Client | None = None, dry_run: bool = False, count: int = 1000, limits: Limits | None = None
) -> PassStats:
    """Drop per-user index entries whose token key is gone; counts ``{kind}_user_index`` per kind."""
    r = _client(client)
    stats = PassStats()
    with _answering(r):
        passes = _script_over_scan(
            r, _PURGE_USERS, f"{_prefix()}tokuser:*", "set", count, limits or Limits(), stats, [_prefix(), int(dry_run)]
        )
        for counts, ms in passes:
            stats.add({f"{k}_user_index": n for k, n in counts.items()}, ms)
    return stats


def purge_ttl_lost_keys(
    *,
    client: Client | None = None,
    now: int | None = None,
    dry_run: bool = False,
    count: int = 1000,
    limits: Limits | None = None,
) -> PassStats:
    """SCAN token keys; delete those without a TTL whose own expiry passed (counted per kind), restore the rest."""
    r = _client(client)
    at = now_ms() if now is None else now
    stats = PassStats()
    with _answering(r):
        args = [_prefix(), at, int(dry_run)]
        passes = _script_over_scan(
            r, _PURGE_TTL_LOST, f"{_prefix()}tok:*", "hash", count, limits or Limits(), stats, args
        )
        for counts, ms in passes:
            removed: dict[str, int] = {}
            for name, n in counts.items():
                kind, what = name.split("|", 1)
                removed[kind if what == "expired" else f"{kind}_ttl_restored"] = n
            stats.add(removed, ms)
    return stats
