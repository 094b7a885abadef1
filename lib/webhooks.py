"""Task webhooks: a signed JSON POST to the backend when a backend-triggered task or flow run finishes.

The body is compact JSON (``id``, ``kind``, ``name``, ``state``, ``finished_at``, ``result``);
the ``X-Indostar-Signature`` header is ``sha256=<hex HMAC-SHA256 of the exact body bytes>``
under TASK_WEBHOOK_SECRET, which the receiver recomputes (as Razorpay does for us). A POST
is retried on connection errors, timeouts, 429 and 5xx, a few times within seconds: the
webhook is a notification, the run's state in Prefect stays the record.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx

log = logging.getLogger(__name__)

HEADER = "X-Indostar-Signature"
DELAYS = (0.5, 1.0, 2.0)


def body(run_id: str, kind: str, name: str, state: str, finished_at: str, result: Any) -> bytes:
    """The exact bytes that are signed and sent."""
    doc = {"id": run_id, "kind": kind, "name": name, "state": state, "finished_at": finished_at, "result": result}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str).encode()


def signature(payload: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def verify(payload: bytes, header: str | None, secret: str) -> bool:
    """What a receiver does: recompute the signature of the raw body and compare in constant time."""
    return bool(header) and hmac.compare_digest(signature(payload, secret).encode(), str(header).encode())


def summary(result: Any) -> Any:
    """What of a run's return value goes into the webhook: plain counts and strings, nothing large."""
    if isinstance(result, Mapping):
        return {str(k): v for k, v in result.items() if isinstance(v, int | float | str | bool) or v is None}
    return None if result is None else str(result)[:300]


def post(url: str, payload: bytes, secret: str, timeout: float = 5.0, delays: tuple[float, ...] = DELAYS) -> bool:
    """POST the signed payload; retry what may succeed later; True when the receiver answered 2xx."""
    headers = {"content-type": "application/json", HEADER: signature(payload, secret)}
    for attempt in range(len(delays) + 1):
        try:
            response = httpx.post(url, content=payload, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}"
        else:
            if response.status_code < 300:
                return True
            problem = f"HTTP {response.status_code}"
            if response.status_code != 429 and response.status_code < 500:
                break  # the receiver refuses it: retrying cannot help
        if attempt < len(delays):
            time.sleep(delays[attempt])
    log.warning("task webhook to %s not delivered: %s", httpx.URL(url).host, problem)
    return False
