"""W&B through the Run, against a stub of the wandb module (no network, no wandb files): which run id,
which resume mode, and which steps are sent after a resume."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from cass_dist.configs.base import RunSection
from cass_dist.engine.run import Run
from tests._accelerate import reset_accelerate_state


class StubRun:
    def __init__(self, calls, starting_step=0, **kwargs):
        self.calls, self.kwargs, self.starting_step, self.logged = calls, kwargs, starting_step, []

    def log(self, values, step=None, **kwargs):
        self.logged.append(step)

    def finish(self):
        pass


@pytest.fixture()
def wandb_stub(monkeypatch):
    """A wandb module recording every init; ``stub.starting_step`` is what a resumed W&B run reports."""
    stub = types.ModuleType("wandb")
    stub.runs, stub.starting_step = [], 0
    stub.Settings = lambda **kwargs: kwargs
    stub.config = types.SimpleNamespace(update=lambda *a, **k: None)

    def init(project=None, **kwargs):
        run = StubRun(stub.runs, starting_step=stub.starting_step, project=project, **kwargs)
        stub.runs.append(run)
        return run

    stub.init = init
    monkeypatch.setitem(sys.modules, "wandb", stub)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    return stub


def start(tmp_path, resume=""):
    reset_accelerate_state()
    run = Run(RunSection(output_dir=str(tmp_path), report_to="wandb", precision="fp32", resume=resume))
    model = torch.nn.Linear(2, 2)
    run.accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    return run, run.resume()


def test_run_id_is_kept_in_the_run_dir_and_steps_are_not_sent_twice(wandb_stub, tmp_path):
    run, state = start(tmp_path)
    for step in (1, 2, 3, 4):
        run.log(step, {"loss": 1.0})
        if step == 2:
            state.global_step = 2
            run.save(state)
    run.finish()  # as if killed after logging step 4: the checkpoint is at step 2
    first = wandb_stub.runs[-1]
    assert first.logged == [1, 2, 3, 4] and first.kwargs["resume"] == "allow"
    run_id = (tmp_path / "wandb_id").read_text()
    assert first.kwargs["id"] == run_id

    run, state = start(tmp_path, resume="auto")
    assert state.global_step == 2
    for step in (3, 4, 5):
        run.log(step, {"loss": 1.0})
    run.finish()
    second = wandb_stub.runs[-1]
    assert second.kwargs["id"] == run_id
    assert second.logged == [5]  # 3 and 4 reached W&B before the restart
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # the file keeps every step once


def test_wandb_environment_wins_and_its_last_step_is_respected(wandb_stub, tmp_path, monkeypatch):
    (tmp_path / "wandb_id").write_text("old-id")
    monkeypatch.setenv("WANDB_RUN_ID", "cass-1234")
    monkeypatch.setenv("WANDB_RESUME", "must")
    wandb_stub.starting_step = 8  # W&B holds steps up to 7 of this run already
    run, _ = start(tmp_path)
    for step in (6, 7, 8):
        run.log(step, {"loss": 1.0})
    run.finish()
    init = wandb_stub.runs[-1]
    assert (init.kwargs["id"], init.kwargs["resume"]) == ("cass-1234", "must")
    assert init.logged == [8]
    assert (tmp_path / "wandb_id").read_text() == "cass-1234"  # a later start without the variable goes on there
