"""Task-worker subprocesses for the e2e tests: when one listens, what its log says it sent.

The fixture that starts them, ``start_worker``, is in conftest.py.
"""

from __future__ import annotations

import re
import time


def wait_listening(proc, timeout: float = 90) -> str:
    """Wait until the worker says it listens (it imports Prefect and warms up first); its name as it logs."""
    deadline = time.monotonic() + timeout
    while True:
        if found := re.search(r"task worker (\S+) listening", proc.log.read_text(errors="replace")):
            return found.group(1)
        assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.tail()}"
        assert time.monotonic() < deadline, f"{proc.name} not listening after {timeout:.0f} s:\n{proc.tail()}"
        time.sleep(0.1)


def sent_by(proc) -> set[str]:
    """The task ids a worker's log says its batches sent."""
    lines = re.findall(r"^batch \S+ sent \d+ task\(s\) \[[^\]]*\]: (.*)$", proc.log.read_text(errors="replace"), re.M)
    return {task_id for line in lines for task_id in line.split()}


def logged(proc, task_ids: set[str], timeout: float = 10) -> set[str]:
    """Which of ``task_ids`` the worker's log names as sent, once the log has caught up with the rows."""
    deadline = time.monotonic() + timeout
    while not task_ids <= sent_by(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    return task_ids & sent_by(proc)
