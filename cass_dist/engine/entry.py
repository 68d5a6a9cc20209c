"""The body of every ``launch/`` script: CPU rule, logging, config, job, exit code.

Exit codes: 0 done, 2 a bad config (``ConfigError``: the message names the field), 1 the job refused
its input (every other ``CassError``: the message names the file or field). Only the project's own
errors become one line; anything else (CUDA out of memory, an NCCL failure, a bug) keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cass_dist.engine.run import launch_on_cpu_if_no_gpu
from cass_dist.errors import CassError


def one_line(exc: BaseException) -> str:
    """Return the exception's message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(exc).split())


def run_entry(prog: str, parse: Callable[[list[str]], Any], job: Callable[[Any], Any],
              argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) with ``parse``, run ``job(config)``; return the exit code.

    A CassError from either is printed as ``prog: error: message`` and returns its ``exit_code``;
    other exceptions propagate with their traceback.
    """
    launch_on_cpu_if_no_gpu()  # before anything creates Accelerate state
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        job(parse(argv))
    except CassError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    return 0
