"""Where a shard set lands: the output directory, swapped in whole, and the cleanup after interrupted runs.

A new set is built beside the output (``.<out>.new-<pid>``) and swapped in once complete: on Linux
with one atomic ``renameat2(RENAME_EXCHANGE)``, elsewhere with two renames (``<out>`` ->
``.<out>.old-<pid>``, the new set -> ``<out>``). A kill at any moment leaves the old set or the new one
complete: at ``<out>``, or, between the two fallback renames, beside it, where ``recover_output`` (run
first by every write) moves it in. Files in ``<out>`` that are not part of a shard set move over.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from cass_dist.data.manifest import MANIFEST_NAME
from cass_dist.errors import CassError

SHARD_PATTERN = re.compile(r"^(train|val|test)-\d{6}\.tar$")
INDEX_PATTERN = re.compile(r"^index-(train|val|test)\.json$")


class OutputExistsError(CassError, FileExistsError):
    """The output directory already holds a finished shard set (and overwrite was not asked for)."""


def _ours(name: str) -> bool:
    return bool(SHARD_PATTERN.match(name) or INDEX_PATTERN.match(name)) or name == MANIFEST_NAME or \
        (name.startswith(".") and ".tmp-" in name)


def _siblings(out: Path) -> list[Path]:
    """Sets that a write of ``out`` built or moved aside: new ones first, then old ones, each oldest first."""
    found = []
    for kind in ("new", "old"):
        found += sorted(out.parent.glob(f".{out.name}.{kind}-*"), key=lambda p: p.stat().st_mtime)
    return [p for p in found if p.is_dir()]


def _move_foreign(source: Path, out: Path) -> None:
    """Move the entries of ``source`` that are not shard-set files into ``out`` (unless taken there)."""
    for entry in source.iterdir():
        if not _ours(entry.name) and not (out / entry.name).exists():
            os.replace(entry, out / entry.name)


def recover_output(out: str | os.PathLike) -> None:
    """Undo or finish what an interrupted write of ``out`` left behind; leave ``out`` a complete set or as it was.

    An ``out`` that is missing (killed between the two renames of a swap) gets the complete new set
    beside it, else the complete old one. Every other set beside ``out`` is then removed (their
    non-shard files moved into ``out`` first), and so are temp files inside ``out``.
    """
    out = Path(out)
    siblings = _siblings(out)
    if not out.exists():
        complete = [p for p in siblings if (p / MANIFEST_NAME).is_file()]
        if complete:
            os.replace(complete[0], out)
            siblings.remove(complete[0])
    for sibling in siblings:
        if out.is_dir():
            _move_foreign(sibling, out)
        shutil.rmtree(sibling, ignore_errors=True)
    if out.is_dir():
        for path in out.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name and path.is_file():
                path.unlink()
    _fsync_dir(out.parent)


def prepare_output(out: Path, overwrite: bool) -> None:
    """Clean up after interrupted runs (``recover_output``) and check that ``out`` may be written.

    Raises OutputExistsError when ``out`` holds a finished set and overwrite is false, and
    NotADirectoryError when ``out`` is a file. A finished set is only replaced once the new one is
    complete, so a failed ``--overwrite`` run leaves the old set intact.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_output(out)
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise OutputExistsError(f"{out} already holds a finished shard set ({out / MANIFEST_NAME}); "
                                f"pass --overwrite to replace it")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # a file system (NFS, some FUSE) or kernel without it: two renames instead
    raise OSError(err, os.strerror(err), str(b))


def swap_in(staging: Path, out: Path, stage: Callable[[str], None]) -> None:
    """Make the complete set at ``staging`` the one at ``out`` (see the module docstring); ``stage`` is a test hook."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if not out.exists():
        os.replace(staging, out)
    elif _exchange(staging, out):
        os.replace(staging, old)  # the old set, now at the staging name
    else:
        os.replace(out, old)
        stage("old-moved")
        os.replace(staging, out)
    stage("swapped")
    if old.exists():
        _move_foreign(old, out)
        shutil.rmtree(old)
    _fsync_dir(out.parent)
    stage("done")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the renames are still ordered
    finally:
        os.close(fd)
