"""Issuing, checking, using up and revoking tokens: password-reset, email-verification and OTP.

The key layout these functions write and read is lib.token_store's; cleanup of expired
tokens is lib.token_cleanup. Every multi-key change is atomic (MULTI or a Lua script).
Functions take an optional ``client``; without it they use ``get_redis()``.
"""

from __future__ import annotations

import datetime as dt
import enum
import secrets

# The `X as X` imports are re-exported: callers reach the store's connection and kinds through lib.tokens.
from lib.token_store import KINDS as KINDS
from lib.token_store import (
    LINK_KINDS,
    UserId,
    answering,
    check_kind,
    check_user,
    client_or_default,
    digest,
    fail_key,
    index_key,
    key_prefix,
    now_ms,
    token_id,
    token_key,
    ttl_ms,
    user_key,
)
from lib.token_store import Client as Client
from lib.token_store import RedisUnavailableError as RedisUnavailableError
from lib.token_store import get_redis as get_redis
from lib.token_store import ping as ping

OTP_MAX_FAILURES = 5
OTP_LOCKOUT_SECONDS = 15 * 60


class OtpResult(enum.StrEnum):
    """The outcome of checking an OTP."""

    OK = "ok"  # right code; it is now used up
    WRONG = "wrong"  # wrong code; one more failure counted
    MISSING = "missing"  # no live OTP for this user (never issued, expired or used)
    LOCKED = "locked"  # too many wrong codes; try again after the lockout window


def issue(kind: str, user_id: UserId, ttl: float | dt.timedelta, *, client: Client | None = None) -> str:
    """A new token of ``kind`` for ``user_id`` living ``ttl`` (seconds or timedelta); returned once, stored hashed.

    For ``otp`` the token is a 6-digit code and replaces the user's previous OTP.
    """
    check_kind(kind)
    uid = check_user(user_id)
    ms = ttl_ms(ttl)
    expires = now_ms() + ms
    if kind == "otp":
        token = f"{secrets.randbelow(10**6):06d}"
        tid, fields = uid, {"u": uid, "e": expires, "h": digest(f"otp:{uid}:{token}")}
    else:
        token = secrets.token_urlsafe(32)
        tid, fields = token_id(kind, token), {"u": uid, "e": expires}
    key = token_key(kind, tid)
    r = client_or_default(client)
    with answering(r):
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
    check_kind(kind, LINK_KINDS)
    r = client_or_default(client)
    with answering(r):
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
    check_kind(kind, LINK_KINDS)
    tid = token_id(kind, token)
    r = client_or_default(client)
    with answering(r):
        user = r.eval(_CONSUME, 2, token_key(kind, tid), index_key(kind), key_prefix(), tid, kind, now_ms())
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
    uid = check_user(user_id)
    r = client_or_default(client)
    with answering(r):
        return int(r.eval(_REVOKE_ALL, 1, user_key(uid), key_prefix()))


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
    uid = check_user(user_id)
    r = client_or_default(client)
    with answering(r):
        out = r.eval(
            _VERIFY_OTP,
            4,
            token_key("otp", uid),
            fail_key(uid),
            index_key("otp"),
            user_key(uid),
            digest(f"otp:{uid}:{code.strip()}"),
            uid,
            now_ms(),
            OTP_MAX_FAILURES,
            ttl_ms(lockout_seconds),
        )
    return OtpResult(out)
