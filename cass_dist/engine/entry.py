"""The body of every ``launch/`` script: CPU rule, logging, config, job, exit code.

Exit codes: 0 done, 2 a bad config (the message names the field), 1 the job refused its input
(library errors name the field or the file). Nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cass_dist.configs.base import ConfigError
from cass_dist.engine.run import launch_on_cpu_if_no_gpu


def run_entry(prog: str, parse: Callable[[list[str]], Any], job: Callable[[Any], Any],
              argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) with ``parse``, run ``job(config)``; return the exit code."""
    launch_on_cpu_if_no_gpu()  # before anything creates Accelerate state
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = parse(argv)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        job(cfg)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0
