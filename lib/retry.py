"""One retry policy for every task: bounded count, capped exponential delays, jitter.

Prefect's ``exponential_backoff()`` has no cap and its jitter can stretch a delay by
the jitter factor, so the delays are an explicit list kept under cap / (1 + jitter):
the longest real wait stays within the cap. Which errors are retried at all is
``lib.errors.is_transient``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.config import get_settings


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    delays: list[float]
    jitter_factor: float


def capped_delays(attempts: int, base: float, cap: float, jitter_factor: float) -> list[float]:
    """Exponential delays base * 2**i, each at most cap / (1 + jitter_factor)."""
    if attempts < 0 or base < 0 or cap < 0 or jitter_factor < 0:
        raise ValueError("retry attempts, base, cap and jitter must be >= 0")
    ceiling = cap / (1 + jitter_factor)
    return [round(min(base * 2**i, ceiling), 3) for i in range(attempts)]


def policy() -> RetryPolicy:
    s = get_settings()
    return RetryPolicy(
        attempts=s.retry_attempts,
        delays=capped_delays(s.retry_attempts, s.retry_base_seconds, s.retry_cap_seconds, s.retry_jitter_factor),
        jitter_factor=s.retry_jitter_factor,
    )


def is_final(tries: int) -> bool:
    """Whether the ``tries``-th try (1 = the first) has no retry after it."""
    return tries > policy().attempts


def delay_after(tries: int) -> float:
    """Seconds to wait after the ``tries``-th try failed for a reason that may pass: the policy's delay, jittered."""
    import random

    p = policy()
    if not p.delays:
        return 0.0
    base = p.delays[min(max(tries, 1), len(p.delays)) - 1]
    return base * (1 + random.uniform(0, p.jitter_factor))
