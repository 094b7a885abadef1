"""Moves this process's clock ahead by INDOSTAR_TEST_CLOCK_OFFSET_DAYS (``make test-clock``).

tests/conftest.py imports it first thing. Only the test process moves: the flows it calls
in-process (their run-date bound, "today", ages they compute) read the moved clock, while the
Prefect test server, PostgreSQL's now() and Redis's TTLs keep the real one. A test compares a row
the database stamped with the database's clock (tests.builders.db_now), and takes every date it
writes from the flows' clock (tests.builders.today). Tests whose flows take their time from the
Prefect server (a run's scheduled start: cleanup ages, retention, the ops report) compare two real
clocks of one machine and have no calendar in them; `make test-clock` leaves them out.
"""

import datetime as _dt
import os as _os

_days = int(_os.environ.get("INDOSTAR_TEST_CLOCK_OFFSET_DAYS") or 0)
if _days:
    import time_machine as _time_machine

    _time_machine.travel(_dt.datetime.now(_dt.UTC) + _dt.timedelta(days=_days), tick=True).start()
    # time-machine starts ticking at the first read, not at start(): read now, so this clock is exactly
    # the real one plus the offset from here on.
    _dt.datetime.now(_dt.UTC)
