"""Moves this Python process's clock ahead by INDOSTAR_TEST_CLOCK_OFFSET_DAYS (``make test-clock``).

tests/conftest.py imports it first thing and puts this folder first on PYTHONPATH, so every
Python process the test session starts (the harness's Prefect server, task workers, flow-run
subprocesses) reads the same moved clock as the tests: each moves its own real clock by the same
number of days. PostgreSQL's now() and Redis's TTLs keep the real clock: a test compares a row
the database stamped with the database's clock, and a row it writes itself with the flows' clock.
"""

import datetime as _dt
import os as _os

_days = int(_os.environ.get("INDOSTAR_TEST_CLOCK_OFFSET_DAYS") or 0)
if _days:
    import time_machine as _time_machine

    _time_machine.travel(_dt.datetime.now(_dt.UTC) + _dt.timedelta(days=_days), tick=True).start()
    # time-machine starts ticking at the first read, not at start(): read now, or a process that reads the
    # time seconds later (a server still importing) would run that many seconds behind the others.
    _dt.datetime.now(_dt.UTC)
