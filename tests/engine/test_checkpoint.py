"""Checkpoints: atomic step dirs, keep-last-k, newest complete, resume paths, full state restored."""

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from cass_dist.engine.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainState,
    find_latest,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


@pytest.fixture()
def prepared():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    yield acc, model, opt
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_steps(acc, model, opt, n):
    for _ in range(n):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad()


def test_save_is_complete_and_keeps_the_last_k(prepared, tmp_path):
    acc, model, opt = prepared
    for step in (2, 4, 6):
        train_steps(acc, model, opt, 2)
        path = save_checkpoint(acc, tmp_path, TrainState(global_step=step, epoch=1, batch_in_epoch=3), keep_last=2)
        assert path.name == f"step-{step:07d}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004", "step-0000006"]
    assert json.loads((tmp_path / "step-0000006" / STATE_FILE).read_text())["batch_in_epoch"] == 3
    assert find_latest(tmp_path).name == "step-0000006"


def test_half_written_checkpoints_are_ignored_and_cleared(prepared, tmp_path):
    acc, model, opt = prepared
    save_checkpoint(acc, tmp_path, TrainState(global_step=1), keep_last=3)
    (tmp_path / ".tmp-step-0000009").mkdir()  # a save killed half-way
    (tmp_path / "step-0000008").mkdir()  # no train_state.json: not ours, not complete
    assert find_latest(tmp_path).name == "step-0000001"
    assert resolve_resume("auto", tmp_path).name == "step-0000001"
    save_checkpoint(acc, tmp_path, TrainState(global_step=2), keep_last=3)
    assert not (tmp_path / ".tmp-step-0000009").exists()


def test_resume_arguments(tmp_path):
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "nothing-yet") is None  # first start of a requeued job
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "step-0000003").mkdir()
    with pytest.raises(CheckpointError, match=STATE_FILE):
        resolve_resume(str(tmp_path / "step-0000003"), tmp_path)


def test_load_restores_model_optimizer_and_rng(prepared, tmp_path):
    acc, model, opt = prepared
    train_steps(acc, model, opt, 3)
    path = save_checkpoint(acc, tmp_path, TrainState(global_step=3, epoch=2, batch_in_epoch=5), keep_last=1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    expected_draw = torch.rand(3)
    train_steps(acc, model, opt, 2)  # drift away from the checkpoint
    state = load_checkpoint(acc, path)
    assert (state.global_step, state.epoch, state.batch_in_epoch) == (3, 2, 5)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the moment of saving


def test_resaving_a_step_replaces_it(prepared, tmp_path):
    acc, model, opt = prepared
    save_checkpoint(acc, tmp_path, TrainState(global_step=5, nonfinite_steps=0), keep_last=2)
    save_checkpoint(acc, tmp_path, TrainState(global_step=5, nonfinite_steps=1), keep_last=2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000005"]
    assert json.loads((tmp_path / "step-0000005" / STATE_FILE).read_text())["nonfinite_steps"] == 1


def test_a_fresh_run_refuses_a_directory_with_checkpoints(prepared, tmp_path):
    from cass_dist.configs.base import RunSection
    from cass_dist.engine.run import Run

    acc, _, _ = prepared
    save_checkpoint(acc, tmp_path / "checkpoints", TrainState(global_step=4), keep_last=1)
    with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume auto"):
        Run(RunSection(output_dir=str(tmp_path)), accelerator=acc)
    run = Run(RunSection(output_dir=str(tmp_path), resume="auto"), accelerator=acc)
    try:
        assert run.resume().global_step == 4
    finally:
        run.finish()
