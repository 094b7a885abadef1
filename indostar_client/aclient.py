"""The backend client for asyncio code: every function of indostar_client.client, awaitable.

    from indostar_client import aclient

    run_id = await aclient.send_order_confirmation(order_id)
    await aclient.handle_razorpay_event(raw_body, signature, event_id)

Same arguments, keys and behaviour as the sync functions (each is ``client.<name>.aio``).
"""

from __future__ import annotations

from typing import Any

from indostar_client import client as _client


def _awaitables() -> dict[str, Any]:
    """Each public client function with an awaitable twin, by name: the twin."""
    return {
        name: fn.aio
        for name, fn in vars(_client).items()
        if not name.startswith("_") and callable(fn) and callable(getattr(fn, "aio", None))
    }


# Built from indostar_client.client rather than listed, so a new client function is here at once.
__all__ = sorted(_awaitables())
globals().update(_awaitables())


def __getattr__(name: str) -> Any:
    """A message kind registered after import (a test's) is awaitable here too."""
    fn = getattr(_client, name)
    if not callable(getattr(fn, "aio", None)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return fn.aio
