"""How long a study waits before its next delivery round after a failed one."""

from __future__ import annotations

import random

# Delivery waits are shortened by up to this fraction at random, so that the studies held up
# by one PACS outage do not all retry in the same second once it is back.
DELIVERY_JITTER = 0.2


def delivery_backoff(
    failed_attempts: int, *, base: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after the ``failed_attempts``-th failed round: ``base`` doubled each
    round, capped at ``maximum``, then shortened by up to ``DELIVERY_JITTER`` at random.

    Jitter only shortens, so the cap is a promise: a recovered PACS waits at most ``maximum``.
    """
    if failed_attempts < 1:
        return 0.0
    exponent = min(failed_attempts - 1, 62)  # 2**62 x base is past any cap; avoids overflow
    delay = min(maximum, base * 2.0**exponent)
    return delay * (1.0 - DELIVERY_JITTER * (rng or random).random())
