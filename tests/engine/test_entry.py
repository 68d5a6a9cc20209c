"""The launch scripts' shared body: exit codes and one-line messages for the project's own errors only."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import cass_dist
from cass_dist.configs.finetune import parse_finetune_config
from cass_dist.data.manifest import ManifestError
from cass_dist.engine.checkpoint import CheckpointError
from cass_dist.engine.entry import run_entry
from cass_dist.errors import CassError


def test_exit_codes_and_messages(capsys):
    ran = []
    assert run_entry("prog.py", parse_finetune_config, ran.append, ["--data", "shards"]) == 0
    assert ran[0].data.shards == "shards"

    assert run_entry("prog.py", parse_finetune_config, ran.append, ["--data", "s", "--label-fraction", "2"]) == 2
    assert capsys.readouterr().err.startswith("prog.py: error: data.label_fraction")
    assert len(ran) == 1  # a bad config never reaches the job

    def refuses(cfg):
        raise ManifestError(f"{cfg.data.shards}/manifest.json: not found\n(create one with cass-shards)")

    assert run_entry("prog.py", parse_finetune_config, refuses, ["--data", "gone"]) == 1
    assert capsys.readouterr().err == "prog.py: error: gone/manifest.json: not found (create one with cass-shards)\n"

    def damaged(cfg):
        raise CheckpointError("runs/x/checkpoints/step-0000002: model.safetensors is damaged")

    assert run_entry("prog.py", parse_finetune_config, damaged, ["--data", "s"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("unexpected", [
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"),
    FileNotFoundError("a file the code itself should have made"),
    ValueError("a bug, not bad input"),
    KeyError("a bug"),
])
def test_errors_that_are_not_the_projects_keep_their_traceback(unexpected):
    def job(cfg):
        raise unexpected

    with pytest.raises(type(unexpected)):
        run_entry("prog.py", parse_finetune_config, job, ["--data", "s"])


def _library_exception_classes() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(cass_dist.__path__, "cass_dist."):
        module = importlib.import_module(info.name)
        found += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                  if issubclass(obj, BaseException) and obj.__module__ == module.__name__]
    return found


def test_every_library_error_class_derives_from_cass_error():
    classes = _library_exception_classes()
    assert len(classes) >= 10  # the walk found the package's errors (ConfigError, ManifestError, ...)
    assert [c.__qualname__ for c in classes if not issubclass(c, CassError)] == []
    # Each keeps a builtin base too, so callers catching ValueError / OSError ... still work.
    builtin = {ValueError, OSError, RuntimeError, ImportError, TypeError, LookupError}
    assert [c.__qualname__ for c in classes if c is not CassError and not builtin & set(c.__mro__)] == []
