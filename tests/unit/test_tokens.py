"""Pure parts of the token store and the cleanup summaries: hashing, validation, limits, pandas tables."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lib import cleanup, token_store
from lib.cleanup import Limits, PassStats
from lib.errors import InvalidInputError


def test_token_id_is_a_keyed_hash_that_depends_on_kind_and_hides_the_token():
    """The stored id is a 64-hex HMAC, different per kind, and never contains the token."""
    token = "s3cr3t-token-value"
    a, b = token_store.token_id("password_reset", token), token_store.token_id("email_verification", token)
    assert len(a) == 64 and int(a, 16) >= 0
    assert a != b and token not in a
    assert token_store.token_id("password_reset", token) == a


@pytest.mark.parametrize("value", [0, -1, 1.5, True, None])
def test_check_positive_rejects_non_positive_or_non_integers(value):
    """Days and batch sizes must be whole numbers above zero; the error names the parameter."""
    with pytest.raises(InvalidInputError, match="days_old"):
        cleanup.check_positive("days_old", value)


def test_cutoff_counts_back_whole_days_from_an_aware_reference():
    """The cutoff is reference minus days; a naive reference is refused."""
    ref = dt.datetime(2026, 3, 31, 2, 0, tzinfo=dt.UTC)
    assert cleanup.cutoff_for(ref, 30) == dt.datetime(2026, 3, 1, 2, 0, tzinfo=dt.UTC)
    with pytest.raises(InvalidInputError, match="timezone"):
        cleanup.cutoff_for(ref.replace(tzinfo=None), 30)


def test_limits_stop_on_batch_budget_or_deadline_and_pass_on_what_is_left():
    """A batch budget and a past deadline both stop a pass; after() hands the rest to the next pass."""
    assert Limits(max_batches=2).reached(2) and not Limits(max_batches=2).reached(1)
    assert Limits(stop_at=0.0).reached(0)
    assert Limits(max_batches=3).after(2) == Limits(None, 1)
    assert not Limits().reached(10**6)


def test_pass_stats_merge_adds_counts_and_keeps_the_longest_batch():
    """Merging passes adds removals and ages, sums batches, keeps the max batch time and any early stop."""
    a, b = PassStats(), PassStats()
    a.add({"x": 2}, 5.0, {31: 2})
    b.add({"x": 1, "y": 4}, 9.0, {31: 1, 40: 3})
    b.stopped_early = True
    m = a.merge(b)
    assert m.removed == {"x": 3, "y": 4} and m.ages == {31: 3, 40: 3}
    assert (m.batches, m.longest_batch_ms, m.stopped_early) == (2, 9.0, True)


@given(st.dictionaries(st.integers(0, 2000), st.integers(1, 10_000), max_size=50))
def test_age_histogram_lists_every_bucket_and_loses_no_row(ages):
    """Every age lands in exactly one bucket, so the histogram sums to the rows removed."""
    frame = cleanup.age_histogram(ages)
    assert list(frame["age_days"]) == ["0-29", "30-44", "45-59", "60-89", "90-179", "180-364", "365+"]
    assert int(frame["removed"].sum()) == sum(ages.values())


def test_token_summary_has_one_row_per_kind_with_json_plain_numbers():
    """The token artifact has a row per kind with keys, index and per-user removals as plain ints."""
    stats = PassStats()
    stats.add({"otp": 2, "otp_index": 3, "password_reset_user_index": 1}, 4.0)
    frame = cleanup.token_summary(stats, token_store.KINDS)
    rows = frame.set_index("kind").to_dict(orient="index")
    assert list(rows) == list(token_store.KINDS)
    assert rows["otp"]["keys_removed"] == 2 and rows["otp"]["index_entries_removed"] == 3
    assert rows["password_reset"]["user_entries_removed"] == 1
    assert rows["email_verification"]["keys_removed"] == 0


def test_summary_frame_lists_expected_kinds_even_when_nothing_was_removed():
    """A run that removed nothing still publishes a row per kind, with zeros."""
    frame = cleanup.summary_frame(PassStats(), ("empty_carts", "carts_with_items"))
    assert frame.to_dict(orient="records") == [
        {"kind": "empty_carts", "removed": 0, "batches": 0, "longest_batch_ms": 0.0, "stopped_early": False},
        {"kind": "carts_with_items", "removed": 0, "batches": 0, "longest_batch_ms": 0.0, "stopped_early": False},
    ]
