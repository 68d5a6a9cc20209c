"""An fp16 loss-scaler skip on a CPU run, where there is no GradScaler: the step says so itself."""

from __future__ import annotations

from collections.abc import Callable


def overflow_at_call(optimizer_step: Callable, call: int) -> Callable:
    """Wrap ``optimizer_step`` so that its ``call``-th call (1-based) reports ``overflow=True``.

    The step still runs; only its outcome says the scaler skipped it, which is what a loop counts.
    """
    calls = 0

    def step(*args, **kwargs):
        nonlocal calls
        calls += 1
        outcome = optimizer_step(*args, **kwargs)
        return outcome._replace(overflow=True) if calls == call else outcome

    return step
