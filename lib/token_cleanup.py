"""Token cleanup: expired keys and stale index entries in Redis, never a key whose TTL still runs.

The native TTL removes a token on time; the indexes are only hints. The passes here drop
index entries of keys already gone, per-user entries of keys already gone, and keys that
lost their TTL once their own expiry has passed (lib.token_store has the layout). Each
pass runs one Lua script per chunk, so every change is atomic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from lib.cleanup import Limits, PassStats
from lib.token_store import Client, answering, check_kind, client_or_default, index_key, key_prefix, now_ms

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
    check_kind(kind)
    r = client_or_default(client)
    limits = limits or Limits()
    at = now_ms() if now is None else now
    stats = PassStats(removed={kind: 0, f"{kind}_index": 0})
    offset = 0
    with answering(r):
        script = r.register_script(_PURGE_INDEX)
        while True:
            if limits.reached(stats.batches):
                stats.stopped_early = True
                return stats
            started = time.perf_counter()
            seen, gone, expired, kept, restored = script(
                keys=[index_key(kind)], args=[key_prefix(), kind, at, offset, chunk, int(dry_run)]
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


def scan_batches(r: Client, pattern: str, count: int, type_: str | None) -> Iterator[list[str]]:
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
    for keys in scan_batches(r, pattern, count, type_):
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
    r = client_or_default(client)
    stats = PassStats()
    with answering(r):
        passes = _script_over_scan(
            r,
            _PURGE_USERS,
            f"{key_prefix()}tokuser:*",
            "set",
            count,
            limits or Limits(),
            stats,
            [key_prefix(), int(dry_run)],
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
    r = client_or_default(client)
    at = now_ms() if now is None else now
    stats = PassStats()
    with answering(r):
        args = [key_prefix(), at, int(dry_run)]
        passes = _script_over_scan(
            r, _PURGE_TTL_LOST, f"{key_prefix()}tok:*", "hash", count, limits or Limits(), stats, args
        )
        for counts, ms in passes:
            removed: dict[str, int] = {}
            for name, n in counts.items():
                kind, what = name.split("|", 1)
                removed[kind if what == "expired" else f"{kind}_ttl_restored"] = n
            stats.add(removed, ms)
    return stats
