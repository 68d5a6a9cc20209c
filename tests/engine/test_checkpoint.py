"""Checkpoints: atomic step dirs, keep-last-k, newest complete, resume paths, full state restored."""

import json
import pickle

import pytest
import torch
from accelerate import Accelerator

from cass_dist.engine.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainState,
    check_files,
    find_latest,
    load_checkpoint,
    read_train_state,
    resolve_resume,
    save_checkpoint,
)
from tests._accelerate import reset_accelerate_state


@pytest.fixture()
def prepared():
    reset_accelerate_state()
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    yield acc, model, opt
    reset_accelerate_state()


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


# ----------------------------------------------------------------------------- damaged and foreign files
def test_train_state_fields_are_type_checked(tmp_path):
    for data, message in (({"global_step": "abc"}, "global_step must be a non-negative integer, got 'abc'"),
                          ({"global_step": -3}, "global_step must be a non-negative integer"),
                          ({"epoch": True}, "epoch must be a non-negative integer"),
                          ({"extra": []}, "extra must be a dict"),
                          ({"global_step": 1, "stepz": 2}, "unknown fields ['stepz']"),
                          ([1, 2], "expected a JSON object, got list")):
        (tmp_path / STATE_FILE).write_text(json.dumps(data))
        with pytest.raises(CheckpointError) as info:
            read_train_state(tmp_path)
        assert str(tmp_path / STATE_FILE) in str(info.value) and message in str(info.value), info.value
    (tmp_path / STATE_FILE).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="cannot read the train state"):
        read_train_state(tmp_path)


def test_every_file_is_recorded_and_checked_before_loading(prepared, tmp_path):
    acc, model, opt = prepared
    train_steps(acc, model, opt, 1)
    path = save_checkpoint(acc, tmp_path, TrainState(global_step=1), keep_last=1)
    recorded = read_train_state(path).files
    assert set(recorded) == {p.name for p in path.iterdir()} - {STATE_FILE}
    assert "model.safetensors" in recorded and "optimizer.bin" in recorded
    assert check_files(path, recorded) == []
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    # A truncated model file: refused before anything is loaded, naming the file.
    original = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(original[: len(original) // 2])
    train_steps(acc, model, opt, 1)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model.safetensors is damaged or was replaced"):
        load_checkpoint(acc, path)
    assert all(torch.equal(moved[k], v) for k, v in model.state_dict().items())  # nothing was loaded
    # Forced past the digests, the load itself fails with a one-line error naming the checkpoint.
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(acc, path, force_files=True)
    assert str(path) in str(info.value) and "SafetensorError" in str(info.value) and "\n" not in str(info.value)
    (path / "model.safetensors").write_bytes(original)

    # A file the run did not write (e.g. a pickle dropped into the directory), and a missing one.
    (path / "custom_checkpoint_0.pkl").write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl was not written by this run"):
        load_checkpoint(acc, path)
    (path / "custom_checkpoint_0.pkl").unlink()
    (path / "random_states_0.pkl").rename(tmp_path / "elsewhere.pkl")
    with pytest.raises(CheckpointError, match="random_states_0.pkl is missing"):
        load_checkpoint(acc, path)
    (tmp_path / "elsewhere.pkl").rename(path / "random_states_0.pkl")
    assert load_checkpoint(acc, path).global_step == 1
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_accelerate_loads_its_own_pickles_weights_only(prepared, tmp_path):
    """What Accelerate 1.15 unpickles (optimizer.bin, random_states_*.pkl) goes through weights_only."""
    acc, model, opt = prepared
    path = save_checkpoint(acc, tmp_path, TrainState(global_step=1), keep_last=1)
    marker = tmp_path / "pwned"
    torch.save(_Exploit(marker), path / "optimizer.bin")  # as if the file had been replaced ...
    with pytest.raises(CheckpointError):
        load_checkpoint(acc, path)  # ... which the digests catch first,
    with pytest.raises(CheckpointError, match="UnpicklingError|Weights only load failed"):
        load_checkpoint(acc, path, force_files=True)  # and Accelerate's weights_only load refuses it too
    assert not marker.exists()


class _Exploit:
    """A pickle that runs code when loaded: creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_deepspeed_files_load_weights_only_with_only_its_own_classes(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from cass_dist.engine.checkpoint import weights_only_load

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "exp_avg": torch.ones(3)}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = weights_only_load(tmp_path / "optim_states.pt")
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Exploit(marker)}, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError):
        weights_only_load(tmp_path / "bad.pt")
    assert not marker.exists()
