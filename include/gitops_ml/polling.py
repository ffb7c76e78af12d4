"""Waiting for an observed state: one poll loop (``tenacity``) for the deploy controller and the registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay, wait_fixed

__all__ = ["poll"]

T = TypeVar("T")


def poll(observe: Callable[[], T], done: Callable[[T], bool], seconds: float, every: float) -> tuple[T, bool]:
    """Call ``observe`` every ``every`` s until ``done(result)`` or ``seconds`` have passed.

    Returns the last result and whether it was done.  An exception of ``observe`` is
    not retried: it propagates at once.
    """
    result = Retrying(
        stop=stop_after_delay(seconds),
        wait=wait_fixed(every),
        retry=retry_if_result(lambda observed: not done(observed)),
        retry_error_callback=_last_result,
    )(observe)
    return result, done(result)


def _last_result(state: RetryCallState):
    """When time is up, the last observation (instead of tenacity's ``RetryError``)."""
    assert state.outcome is not None  # called after an attempt
    return state.outcome.result()
