"""Redis token helpers for tests, benchmarks and demo data: bulk seeding, a whole cleanup pass, wiping a prefix.

The backend and the flows never call these; they use lib.tokens directly.
"""

from __future__ import annotations

import random

from lib.cleanup import Limits, PassStats
from lib.errors import InvalidInputError
from lib.token_cleanup import purge_dangling_user_entries, purge_expired_index, purge_ttl_lost_keys, scan_batches
from lib.token_store import KINDS, Client, answering, client_or_default, key_prefix, now_ms


def cleanup_expired(*, client: Client | None = None, dry_run: bool = False, limits: Limits | None = None) -> PassStats:
    """The whole token cleanup in one call: every kind's index, the per-user index, then TTL-less keys."""
    total = PassStats()
    limits = limits or Limits()
    for kind in KINDS:
        total = total.merge(purge_expired_index(kind, client=client, dry_run=dry_run, limits=limits))
    total = total.merge(purge_dangling_user_entries(client=client, dry_run=dry_run, limits=limits))
    return total.merge(purge_ttl_lost_keys(client=client, dry_run=dry_run, limits=limits))


# Bulk loader for demo data: one script call per chunk instead of ~4 commands per token,
# because packing and parsing commands in redis-py, not Redis, is what costs.
# ARGV: prefix, now, and one string of "kind id user expiry mode\n" lines (one argument:
# encoding thousands of arguments is slow too); mode L = live with a TTL, G = gone
# (expired natively: only index entries remain), P = lost its TTL.
_SEED = """
local p, now = ARGV[1], tonumber(ARGV[2])
local n = 0
for kind, id, u, e, mode in string.gmatch(ARGV[3], '(%S+) (%S+) (%S+) (%S+) (%S+)\\n') do
  local key = p .. 'tok:' .. kind .. ':' .. id
  if mode ~= 'G' then
    redis.call('HSET', key, 'u', u, 'e', e)
    if mode == 'L' then redis.call('PEXPIRE', key, tonumber(e) - now) end
  end
  redis.call('ZADD', p .. 'tokexp:' .. kind, e, id)
  redis.call('SADD', p .. 'tokuser:' .. u, kind .. ':' .. id)
  n = n + 1
end
return n
"""


def seed_demo_tokens(n: int, rng: random.Random, *, client: Client | None = None, chunk: int = 2000) -> int:
    """Write ``n`` demo tokens of mixed kinds, a chunk per script call; about a quarter give cleanup work.

    ~75 % live (TTL 15 min to 24 h); ~15 % already expired natively (index and per-user
    entries left behind, key gone); ~10 % lost their TTL and are past expiry (key kept,
    no TTL). Ids are random: nobody needs the raw demo tokens. Returns n.
    """
    if n < 0:
        raise InvalidInputError("n must be >= 0")
    r = client_or_default(client)
    now = now_ms()
    users = max(n // 2, 2)
    written = 0
    with answering(r):
        script = r.register_script(_SEED)
        while written < n:
            size = min(chunk, n - written)
            lines = []
            for kind in rng.choices(KINDS, (45, 35, 20), k=size):
                uid = str(rng.randrange(1, users))
                roll = rng.random()
                if roll < 0.75:
                    expires, mode = now + rng.randrange(15 * 60_000, 24 * 3_600_000), "L"
                else:
                    expires, mode = now - rng.randrange(1, 7 * 24 * 3_600_000), ("P" if roll >= 0.90 else "G")
                tid = uid if kind == "otp" else rng.randbytes(16).hex()
                lines.append(f"{kind} {tid} {uid} {expires} {mode}\n")
            written += int(script(keys=[], args=[key_prefix(), now, "".join(lines)]))
    return written


def delete_prefix(prefix: str, *, client: Client | None = None, count: int = 5000) -> int:
    """UNLINK every key under ``prefix`` (benchmarks and tests); refuses an empty prefix."""
    if not prefix:
        raise InvalidInputError("refusing to delete every key: empty prefix")
    r = client_or_default(client)
    removed = 0
    with answering(r):
        for keys in scan_batches(r, f"{prefix}*", count, None):
            removed += int(r.unlink(*keys))
    return removed
