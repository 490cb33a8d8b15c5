"""The client's retry schedule, public: which target each attempt of a call goes to, after what
pause and within what deadline (``RetryPlan``), and the settings it follows.

A call first tries every target once, starting at the one that answered last; further rounds
follow while its retry deadline allows, each after an exponential backoff with jitter.
``Client`` and ``AsyncClient`` follow this plan; it is public so that the schedule can be
inspected and tested on its own (a fake clock and jitter make it deterministic). The code lives
in the client's private ``_retry`` module.
"""

from gpulease.client._retry import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    MIN_ATTEMPT_S,
    NEXT_TARGET_PAUSE_S,
    Attempt,
    RetryPlan,
)

__all__ = ["BACKOFF_BASE_S", "BACKOFF_MAX_S", "MIN_ATTEMPT_S", "NEXT_TARGET_PAUSE_S", "Attempt", "RetryPlan"]
