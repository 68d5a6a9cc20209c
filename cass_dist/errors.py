"""The project's own error classes: what the entry scripts turn into one line and an exit code.

Every error cass-dist raises on purpose derives from :class:`CassError` and keeps its builtin base
(``ValueError``, ``FileNotFoundError`` ...), so callers that catch those still work. The entry
scripts print a CassError as one line that names the file or field, with exit code
``exit_code`` (2 for a bad config, 1 for refused input). Anything else (CUDA out of memory, an NCCL
failure, a bug) is not ours to summarise and keeps its traceback.
"""

from __future__ import annotations


class CassError(Exception):
    """Base of every error cass-dist raises on purpose; ``exit_code`` is what an entry script returns."""

    exit_code = 1
