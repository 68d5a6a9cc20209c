"""A kill at a known point of a run, independent of machine speed: the loader signals its own process."""

from __future__ import annotations

import os
from collections.abc import Callable


def signals_itself(make_loader: Callable, sig: int, after: int) -> Callable:
    """Wrap the loader factory ``make_loader`` so that this process sends itself ``sig`` while fetching
    micro-batch number ``after``, counted over every loader the factory makes (the whole run)."""
    fetched = 0

    class SignalsItself:
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __iter__(self):
            nonlocal fetched
            for batch in self.inner:
                fetched += 1
                if fetched == after:
                    os.kill(os.getpid(), sig)
                yield batch

    return lambda *args: SignalsItself(make_loader(*args))
