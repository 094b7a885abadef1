"""Is a Prefect API answering, and where: the one check every command and start-up sequence uses.

``prefect_api_url`` is what an operator command calls before it talks to the API (one line
saying what to do when nothing answers); ``wait_for_api`` is the one wait for a server just
started, by ``make up`` or by the production topology (devtools).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from lib.errors import ServiceUnavailableError

DEFAULT_API = "http://127.0.0.1:4200/api"


def api_healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:  # noqa: S310
            return bool(r.status == 200)
    except OSError:
        return False


def prefect_api_url() -> str:
    """PREFECT_API_URL as Prefect reads it; ServiceUnavailableError unless a server answers there."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ServiceUnavailableError(
            "PREFECT_API_URL is not set; point it at your Prefect server (e.g. export "
            f"PREFECT_API_URL={DEFAULT_API}) or start one with `make up`"
        )
    if not api_healthy(url, timeout=3.0):
        raise ServiceUnavailableError(
            f"the Prefect API does not answer at {url} (PREFECT_API_URL); start one with `make up` or "
            "`prefect server start`, or fix PREFECT_API_URL"
        )
    return str(url)


def wait_for_api(api_url: str, wait: float, check_alive: Callable[[], None], log: str) -> None:
    """Return once the API at ``api_url`` answers; ``check_alive`` raises if the server process died.

    ServiceUnavailableError naming ``log`` when it has not answered within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while not api_healthy(api_url):
        check_alive()
        if time.monotonic() > deadline:
            raise ServiceUnavailableError(f"the Prefect API did not answer at {api_url} within {wait:.0f} s; see {log}")
        time.sleep(0.5)
    check_alive()
