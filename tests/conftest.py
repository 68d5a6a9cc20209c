"""Shared fixtures. Tests run on CPU with tiny models; real datasets come from ../shared/data when present."""

import importlib.util
import os
from pathlib import Path

import pytest

# Two cores in CI: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
BENCHMARKS = REPO_ROOT / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """Load ``benchmarks/<name>.py`` as a module: the benchmarks are scripts, not a package."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test on a clone without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real datasets live beside the repo only on the dev machines)")
    return SHARED_DATA


# The environment as the session found it. Restoring to a copy taken per test is not enough: module-
# and session-scoped fixtures run before a test's own fixtures, so what they set would be copied back.
PRISTINE_ENVIRON = dict(os.environ)


@pytest.fixture(autouse=True)
def restore_environ():
    """Entry points called in-process (also from module fixtures) set variables such as ACCELERATE_USE_CPU,
    which would turn a later ``accelerate launch`` of DeepSpeed into plain DDP; keep them out of later tests."""
    yield
    for name in set(os.environ) - set(PRISTINE_ENVIRON) - {"PYTEST_CURRENT_TEST"}:  # pytest's own, it removes it
        del os.environ[name]
    os.environ.update(PRISTINE_ENVIRON)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's singletons reset before and after the test (modules that train in-process use it)."""
    from tests._accelerate import (
        reset_accelerate_state,  # here: torch loads only after the thread settings above
    )

    reset_accelerate_state()
    yield
    reset_accelerate_state()
