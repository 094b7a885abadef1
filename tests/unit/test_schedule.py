"""Delivery-date arithmetic for every frequency, month ends and leap years."""

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lib.errors import InvalidInputError
from lib.schedule import next_after, next_delivery

dates = st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2100, 12, 31))
frequencies = st.sampled_from(["weekly", "biweekly", "monthly", "quarterly"])


def test_month_end_chain_keeps_the_anchor():
    """Jan 31 -> Feb 28 -> Mar 31 -> Apr 30, not Mar 28."""
    d, out = dt.date(2027, 1, 31), []
    for _ in range(4):
        d = next_delivery(d, "monthly", 31)
        out.append(d)
    assert out == [dt.date(2027, 2, 28), dt.date(2027, 3, 31), dt.date(2027, 4, 30), dt.date(2027, 5, 31)]


def test_leap_february():
    """In a leap year Jan 31 -> Feb 29, and Jan 30 -> Feb 29 -> Mar 30."""
    assert next_delivery(dt.date(2028, 1, 31), "monthly", 31) == dt.date(2028, 2, 29)
    assert next_delivery(dt.date(2028, 2, 29), "monthly", 30) == dt.date(2028, 3, 30)


def test_quarterly_from_november_crosses_the_year():
    """Nov 30 quarterly -> Feb 28 -> May 30."""
    assert next_delivery(dt.date(2026, 11, 30), "quarterly", 30) == dt.date(2027, 2, 28)
    assert next_delivery(dt.date(2027, 2, 28), "quarterly", 30) == dt.date(2027, 5, 30)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (("daily", 1), "unknown frequency 'daily'; expected weekly, biweekly, monthly or quarterly"),
        (("monthly", 0), "anchor day 0 is not between 1 and 31"),
        (("monthly", 32), "anchor day 32 is not between 1 and 31"),
    ],
)
def test_bad_cadence_is_rejected(bad, message):
    """An unknown frequency or an anchor outside 1..31 is refused with a clear error."""
    with pytest.raises(InvalidInputError, match=message):
        next_delivery(dt.date(2026, 1, 1), *bad)


@given(start=dates, freq=frequencies, anchor=st.integers(1, 31), gap=st.integers(-40, 400))
def test_next_after_is_the_first_cadence_date_past_the_run(start, freq, anchor, gap):
    """next_after lands after both dates, and stepping one cycle at a time reaches it first."""
    run = start + dt.timedelta(days=gap)
    got = next_after(start, freq, anchor, run)
    assert got > run and got > start
    d = next_delivery(start, freq, anchor)
    while d <= run:
        d = next_delivery(d, freq, anchor)
    assert got == d


@given(start=dates, freq=st.sampled_from(["monthly", "quarterly"]), anchor=st.integers(1, 31), gap=st.integers(0, 400))
def test_monthly_next_after_matches_repeated_steps(start, freq, anchor, gap):
    """Skipping several months at once equals stepping cycle by cycle from the anchor."""
    run = start + dt.timedelta(days=gap)
    d = start
    while d <= run:
        d = next_delivery(d, freq, anchor)
    assert next_after(start, freq, anchor, run) == d


@given(start=dates, freq=frequencies, anchor=st.integers(1, 31))
def test_one_step_moves_forward_by_the_cadence(start, freq, anchor):
    """A weekly step is 7 days, biweekly 14; monthly moves 1 month, quarterly 3, day = min(anchor, month length)."""
    nxt = next_delivery(start, freq, anchor)
    if freq == "weekly":
        assert (nxt - start).days == 7
    elif freq == "biweekly":
        assert (nxt - start).days == 14
    else:
        months = (nxt.year - start.year) * 12 + nxt.month - start.month
        assert months == (1 if freq == "monthly" else 3)
        import calendar

        assert nxt.day == min(anchor, calendar.monthrange(nxt.year, nxt.month)[1])
