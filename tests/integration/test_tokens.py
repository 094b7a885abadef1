"""The Redis token store on a real Redis: layout, one-use tokens, OTP lockout, and a cleanup that spares live tokens."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from devtools import tokens as dev_tokens
from devtools.smtp_sink import free_port
from lib import token_store, tokens
from lib.config import get_settings
from lib.errors import InvalidInputError
from lib.tokens import OtpResult


def _prefix() -> str:
    return get_settings().redis_key_prefix


def _all_values(r) -> str:
    """Every key and value under our prefix, as one string (what a leaked dump would show)."""
    out = []
    for key in r.scan_iter(match=f"{_prefix()}*", count=1000):
        kind = r.type(key)
        value = {"hash": r.hgetall, "zset": lambda k: r.zrange(k, 0, -1), "set": r.smembers, "string": r.get}[kind](key)
        if isinstance(value, (set, dict)):
            value = sorted(value.items() if isinstance(value, dict) else value)
        out.append(f"{key}={value}")
    # SCAN order can change when Redis rehashes between two walks: compare as sorted.
    return "\n".join(sorted(out))


def test_issue_writes_the_documented_layout_hashed_with_a_native_ttl(redis_client):
    """A token is stored under its HMAC with a TTL, in its kind's expiry index and its user's index; never in clear."""
    token = tokens.issue("password_reset", 42, 60)
    tid = token_store.token_id("password_reset", token)
    key = f"{_prefix()}tok:password_reset:{tid}"
    assert redis_client.hget(key, "u") == "42"
    assert 59_000 < redis_client.pttl(key) <= 60_000
    assert abs(redis_client.zscore(f"{_prefix()}tokexp:password_reset", tid) - int(redis_client.hget(key, "e"))) < 1
    assert redis_client.smembers(f"{_prefix()}tokuser:42") == {f"password_reset:{tid}"}
    assert token not in _all_values(redis_client)


def test_verify_does_not_use_up_but_consume_does_once(redis_client):
    """verify leaves a token usable; consume returns the user once, then the token is dead everywhere."""
    token = tokens.issue("email_verification", "u-7", 60)
    assert tokens.verify("email_verification", token) == "u-7"
    assert tokens.verify("email_verification", token) == "u-7"
    assert tokens.consume("email_verification", token) == "u-7"
    assert tokens.consume("email_verification", token) is None
    assert tokens.verify("email_verification", token) is None
    assert tokens.verify("password_reset", token) is None  # kinds do not mix
    assert not redis_client.exists(f"{_prefix()}tokuser:u-7")


def test_concurrent_consumers_get_a_token_exactly_once(redis_client):
    """Twenty threads consuming the same token at once: exactly one gets the user id."""
    token = tokens.issue("password_reset", 5, 60)
    results: list[str | None] = []
    barrier = threading.Barrier(20)

    def grab() -> None:
        barrier.wait()
        results.append(tokens.consume("password_reset", token))

    threads = [threading.Thread(target=grab) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=str) == ["5"] + [None] * 19


def test_revoke_all_kills_every_token_of_the_user_and_only_theirs(redis_client):
    """revoke_all removes each of the user's tokens (and their index entries); other users keep theirs."""
    mine = [tokens.issue(k, 9, 60) for k in ("password_reset", "email_verification")]
    tokens.issue("otp", 9, 60)
    theirs = tokens.issue("password_reset", 10, 60)
    assert tokens.revoke_all(9) == 3
    assert tokens.verify("password_reset", mine[0]) is None
    assert tokens.verify("email_verification", mine[1]) is None
    assert tokens.verify_otp(9, "123456") == OtpResult.MISSING
    assert tokens.verify("password_reset", theirs) == "10"
    assert redis_client.zcard(f"{_prefix()}tokexp:password_reset") == 1


def test_otp_is_right_once_and_a_new_one_replaces_the_old(redis_client):
    """An OTP code works once; issuing another makes the first code useless."""
    first = tokens.issue("otp", 3, 60)
    second = tokens.issue("otp", 3, 60)
    assert len(second) == 6 and second.isdigit()
    stored = redis_client.hgetall(f"{_prefix()}tok:otp:3")
    assert set(stored) == {"u", "e", "h"} and len(stored["h"]) == 64 and second not in stored["h"]
    if first != second:
        assert tokens.verify_otp(3, first) == OtpResult.WRONG
    assert tokens.verify_otp(3, second) == OtpResult.OK
    assert tokens.verify_otp(3, second) == OtpResult.MISSING


def test_otp_locks_out_after_five_wrong_codes_even_for_the_right_one(redis_client):
    """Four wrong codes are answered 'wrong', the fifth locks the user out, and then even the right code fails."""
    code = tokens.issue("otp", 11, 60)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    answers = [tokens.verify_otp(11, wrong) for _ in range(5)]
    assert answers == [OtpResult.WRONG] * 4 + [OtpResult.LOCKED]
    assert tokens.verify_otp(11, code) == OtpResult.LOCKED
    fresh = tokens.issue("otp", 11, 60)  # a new code does not lift the lockout
    assert tokens.verify_otp(11, fresh) == OtpResult.LOCKED
    assert 0 < redis_client.pttl(f"{_prefix()}otpfail:11") <= tokens.OTP_LOCKOUT_SECONDS * 1000


def test_otp_lockout_ends_after_its_window(redis_client):
    """The lockout counter has a TTL: after the window, the right code works again."""
    code = tokens.issue("otp", 12, 60)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(5):
        tokens.verify_otp(12, wrong, lockout_seconds=0.05)
    time.sleep(0.08)
    code = tokens.issue("otp", 12, 60)
    assert tokens.verify_otp(12, code) == OtpResult.OK


def test_bad_kind_user_or_ttl_is_rejected(redis_client):
    """Unknown kinds, an OTP checked as a link token, empty users and TTLs <= 0 raise InvalidInputError."""
    with pytest.raises(InvalidInputError, match="unknown token kind"):
        tokens.issue("magic_link", 1, 60)
    with pytest.raises(InvalidInputError, match="verify_otp"):
        tokens.verify("otp", "123456")
    with pytest.raises(InvalidInputError, match="user_id"):
        tokens.issue("otp", "", 60)
    with pytest.raises(InvalidInputError, match="TTL"):
        tokens.issue("password_reset", 1, 0)


def test_cleanup_removes_dead_entries_and_ttl_less_expired_keys_only(redis_client):
    """Cleanup drops index and per-user entries of expired keys and TTL-less keys past expiry, and keeps the rest."""
    live = tokens.issue("password_reset", 1, 60)
    short = tokens.issue("password_reset", 2, 0.01)
    lost = tokens.issue("email_verification", 3, 60)
    lost_future = tokens.issue("email_verification", 4, 60)
    lost_key = f"{_prefix()}tok:email_verification:{token_store.token_id('email_verification', lost)}"
    future_key = f"{_prefix()}tok:email_verification:{token_store.token_id('email_verification', lost_future)}"
    redis_client.persist(lost_key)
    redis_client.hset(lost_key, "e", token_store.now_ms() - 1000)  # TTL lost and past its own expiry
    redis_client.persist(future_key)  # TTL lost but its own expiry is ahead: keep, put the TTL back
    time.sleep(0.03)
    stats = dev_tokens.cleanup_expired()
    assert stats.removed["password_reset_index"] == 1
    assert stats.removed["password_reset_user_index"] == 1
    assert stats.removed["email_verification"] == 1
    assert stats.removed["email_verification_ttl_restored"] == 1
    assert tokens.verify("password_reset", live) == "1"
    assert tokens.verify("password_reset", short) is None
    assert not redis_client.exists(lost_key) and not redis_client.exists(f"{_prefix()}tokuser:3")
    assert tokens.verify("email_verification", lost_future) == "4"
    assert 0 < redis_client.pttl(future_key) <= 60_000
    again = dev_tokens.cleanup_expired()
    assert sum(again.removed.values()) == 0


def test_dry_run_cleanup_counts_what_a_real_run_removes_and_changes_nothing(redis_client):
    """A dry run over seeded demo tokens reports the same counts as the real run that follows, changing no key."""
    dev_tokens.seed_demo_tokens(1000, random.Random(3))
    before = _all_values(redis_client)
    dry = dev_tokens.cleanup_expired(dry_run=True)
    assert _all_values(redis_client) == before
    real = dev_tokens.cleanup_expired()
    assert dry.removed == real.removed
    assert sum(v for k, v in real.removed.items() if not k.endswith("_kept")) > 150


def test_seed_demo_tokens_leaves_work_for_cleanup(redis_client):
    """Seeded demo tokens include expired ones of every kind for cleanup (speed is in bench/cleanup)."""
    assert dev_tokens.seed_demo_tokens(20_000, random.Random(1)) == 20_000
    stats = dev_tokens.cleanup_expired()
    for kind in tokens.KINDS:
        assert stats.removed[kind] > 0 and stats.removed[f"{kind}_index"] > 0


def test_unreachable_redis_error_names_the_address_and_the_setting(redis_client):
    """Against a closed port every call fails with RedisUnavailableError naming REDIS_URL and host:port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    with pytest.raises(tokens.RedisUnavailableError, match=rf"127\.0\.0\.1:{port}.*REDIS_URL"):
        tokens.issue("password_reset", 1, 60, client=client)
    with pytest.raises(tokens.RedisUnavailableError, match=rf"127\.0\.0\.1:{port}"):
        dev_tokens.cleanup_expired(client=client)


# ---- the property: cleanup never removes a token whose TTL has not run out ------------


@pytest.fixture(scope="module")
def own_redis(redis_session):
    """A redis-server of this module's own on a free loopback port (the shared one if none is installed).

    The cleanup walks the keyspace with SCAN (per-user index, TTL-less keys), so its cost grows with every
    key in the Redis database, ours or not: 40 examples against a shared database holding 300,000 keys of
    other runs took 85 s, against an empty one about 1.5 s. Same Redis, same code, nobody else's keys.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        yield redis_session
        return
    port = free_port()
    args = [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, f"redis-server on port {port} did not start"
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("issue"), st.sampled_from(tokens.KINDS), st.integers(1, 4), st.sampled_from([5, 40, 60_000])),
        st.tuples(st.sampled_from(["consume", "lie_index", "persist", "persist_past", "drop_key"]), st.integers(0, 30)),
        st.tuples(st.just("sleep"), st.integers(1, 30)),
    ),
    max_size=30,
)


def test_cleanup_never_removes_a_token_whose_ttl_has_not_run_out(own_redis):
    """Whatever issue / consume / expire / index-corruption sequence ran, cleanup keeps every key still alive;
    the examples are counted, so the property is shown to have met both live and gone tokens."""
    seen: Counter[str] = Counter()

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ops=OPS)
    def prop(ops):
        r = own_redis
        dev_tokens.delete_prefix(_prefix(), client=r)
        issued: list[tuple[str, str, str]] = []  # (kind, key, token or code)
        consumed: set[str] = set()
        for op in ops:
            if op[0] == "issue":
                _, kind, user, ttl_ms = op
                token = tokens.issue(kind, user, ttl_ms / 1000, client=r)
                tid = str(user) if kind == "otp" else token_store.token_id(kind, token)
                issued.append((kind, f"{_prefix()}tok:{kind}:{tid}", token))
                continue
            if op[0] == "sleep":
                time.sleep(op[1] / 1000)
                continue
            if not issued:
                continue
            kind, key, token = issued[op[1] % len(issued)]
            tid = key.rsplit(":", 1)[1]
            if op[0] == "consume" and kind != "otp":
                tokens.consume(kind, token, client=r)
                consumed.add(key)
            elif op[0] == "lie_index":  # the index claims it expired long ago
                r.zadd(f"{_prefix()}tokexp:{kind}", {tid: 1})
            elif op[0] == "persist":  # lost its TTL; its own expiry field still says when
                r.persist(key)
            elif op[0] == "persist_past" and r.exists(key):  # lost its TTL and its expiry passed
                r.persist(key)
                r.hset(key, "e", token_store.now_ms() - 1)
            elif op[0] == "drop_key":  # as if the native TTL fired
                r.delete(key)

        started = token_store.now_ms()
        alive = {}
        for _, key, _ in issued:
            pttl, expires = r.pttl(key), r.hget(key, "e")
            # Alive: a TTL still running (with a margin for the cleanup's own duration), or no
            # TTL but its own expiry ahead.
            if pttl > 2000 or (pttl == -1 and expires and int(expires) > started + 2000):
                alive[key] = r.hgetall(key)
        dev_tokens.cleanup_expired(client=r)

        for key, fields in alive.items():
            assert r.hgetall(key) == fields, f"cleanup removed or changed live token {key}"
            assert r.pttl(key) > 0
        for kind, key, token in issued:
            if key in consumed and kind != "otp":
                assert tokens.verify(kind, token, client=r) is None
        for kind in tokens.KINDS:  # every index entry that was due has been dealt with
            assert r.zcount(f"{_prefix()}tokexp:{kind}", "-inf", started) == 0
        seen["examples"] += 1
        seen["with_live_tokens"] += bool(alive)
        seen["with_gone_tokens"] += len(alive) < len(issued)
        event(f"live tokens: {min(len(alive), 3)}+")
        target(float(len(alive)), label="live tokens")  # steer generation towards tokens cleanup must keep

    prop()
    # Not vacuous: cleanup met examples with tokens it had to keep and with tokens it could remove.
    assert seen["examples"] >= 20 and seen["with_live_tokens"] >= 1 and seen["with_gone_tokens"] >= 1, seen
