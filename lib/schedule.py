"""Delivery-date arithmetic: the next date in a subscription's cadence.

Monthly and quarterly dates come from the stored anchor day, never from the
previous date, so a month end survives short months: Jan 31 -> Feb 28 (29 in a
leap year) -> Mar 31 -> Apr 30. Weekly and biweekly are plain day steps.
"""

from __future__ import annotations

import calendar
import datetime as dt

from lib.errors import InvalidInputError

DAY_STEPS = {"weekly": 7, "biweekly": 14}
MONTH_STEPS = {"monthly": 1, "quarterly": 3}


def anchored(year: int, month: int, anchor_day: int) -> dt.date:
    """The anchor day in that month, or the month's last day when it is shorter."""
    return dt.date(year, month, min(anchor_day, calendar.monthrange(year, month)[1]))


def add_months(d: dt.date, months: int, anchor_day: int) -> dt.date:
    index = d.year * 12 + (d.month - 1) + months
    return anchored(index // 12, index % 12 + 1, anchor_day)


def _check(frequency: str, anchor_day: int) -> None:
    if frequency not in DAY_STEPS and frequency not in MONTH_STEPS:
        raise InvalidInputError(f"unknown frequency {frequency!r}; expected weekly, biweekly, monthly or quarterly")
    if not 1 <= anchor_day <= 31:
        raise InvalidInputError(f"anchor day {anchor_day} is not between 1 and 31")


def next_delivery(current: dt.date, frequency: str, anchor_day: int) -> dt.date:
    """The delivery after ``current`` in this cadence."""
    _check(frequency, anchor_day)
    if frequency in DAY_STEPS:
        return current + dt.timedelta(days=DAY_STEPS[frequency])
    return add_months(current, MONTH_STEPS[frequency], anchor_day)


def next_after(current: dt.date, frequency: str, anchor_day: int, run_date: dt.date) -> dt.date:
    """The first date of the cadence that starts at ``current`` falling after ``run_date``.

    A subscription missed for several cycles gets one order and moves straight past
    the run date, instead of one order per missed cycle.
    """
    _check(frequency, anchor_day)
    if frequency in DAY_STEPS:
        step = DAY_STEPS[frequency]
        gap = (run_date - current).days
        cycles = gap // step + 1 if gap >= 0 else 1
        return current + dt.timedelta(days=step * cycles)
    step = MONTH_STEPS[frequency]
    months_gap = (run_date.year - current.year) * 12 + run_date.month - current.month
    cycles = max(1, months_gap // step)
    candidate = add_months(current, step * cycles, anchor_day)
    while candidate <= run_date:
        cycles += 1
        candidate = add_months(current, step * cycles, anchor_day)
    return candidate


MAX_DAYS_AHEAD = 1
MAX_DAYS_BEHIND = 35


def check_run_date(run_date: dt.date, today: dt.date, *, allow_any_date: bool = False) -> dt.date:
    """The run date, if it lies within [today - 35 days, today + 1 day]; InvalidInputError otherwise.

    A run orders every subscription due on or before its date, so a typo such as 2999-12-31
    would order everything and move every date past it. ``allow_any_date`` is the
    operator's explicit "I mean it".
    """
    if allow_any_date:
        return run_date
    if run_date > today + dt.timedelta(days=MAX_DAYS_AHEAD):
        raise InvalidInputError(
            f"run_date {run_date} is more than {MAX_DAYS_AHEAD} day after today ({today}, UTC); nothing was "
            "written. Pass allow_any_date=true if you mean it"
        )
    if run_date < today - dt.timedelta(days=MAX_DAYS_BEHIND):
        raise InvalidInputError(
            f"run_date {run_date} is more than {MAX_DAYS_BEHIND} days before today ({today}, UTC); nothing was "
            "written. Pass allow_any_date=true if you mean it"
        )
    return run_date
