"""Kill and resume: SIGKILL mid-run + ``--resume auto`` ends where a straight run ends; SIGTERM checkpoints."""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine.checkpoint import list_checkpoints, read_train_state
from tests._accelerate import reset_accelerate_state

pytestmark = pytest.mark.slow  # trains in subprocesses (still CPU, tiny models)
REPO = Path(__file__).resolve().parents[2]

# Runs the real CLI, but sends itself `signal` while fetching micro-batch number `after`: a kill at a
# known point of the run, independent of machine speed.
SELF_SIGNAL = """
import signal, sys
from cass_dist.engine import pretrain as p
from tests._signals import signals_itself
p.build_train_loader = signals_itself(p.build_train_loader, getattr(signal, sys.argv[1]), int(sys.argv[2]))
p.pretrain.__kwdefaults__["make_loader"] = p.build_train_loader
sys.path.insert(0, "launch")
import pretrain as entry
sys.exit(entry.main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "syn"
    build_synthetic(out, num_images=320, image_size=32, shard_size=80)
    return out


def args(shards, out, *extra):
    # 224 train samples / 32 = 7 batches per epoch: 10 steps cross an epoch boundary.
    return ["--data", str(shards), "--output-dir", str(out), "--cnn", "test_resnet", "--vit", "test_vit",
            "--model.vit_patch_size", "8", "--embed-dim", "32", "--image-size", "32", "--batch-size", "32",
            "--precision", "fp32", "--model.channels_last", "false", "--log-every", "1", "--warmup-steps", "2",
            "--max-steps", "10", "--save-every", "3", *extra]


def run(argv, *, self_signal=None, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if self_signal:
        argv = [sys.executable, "-c", SELF_SIGNAL, *self_signal, *argv]
    else:
        argv = [sys.executable, "launch/pretrain.py", *argv]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def final_weights(out):
    return load_file(Path(out) / "checkpoints" / "step-0000010" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    done = run(args(shards, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return final_weights(out)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs from the straight run"


def test_sigkill_then_resume_auto_equals_a_straight_run(shards, straight, tmp_path):
    killed = run(args(shards, tmp_path), self_signal=("SIGKILL", "9"))  # dies inside step 9 (epoch 1)
    assert killed.returncode == -signal.SIGKILL
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 6]
    assert not (tmp_path / "export" / "model.json").exists()

    resumed = run(args(shards, tmp_path, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-0000006" in resumed.stderr
    assert_same_weights(final_weights(tmp_path), straight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # records of the killed steps 7-8 were dropped, none replayed twice


def test_sigterm_checkpoints_exits_cleanly_and_resumes(shards, straight, tmp_path):
    wandb_offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    stopped = run(args(shards, tmp_path, "--report-to", "wandb"), self_signal=("SIGTERM", "5"),
                  env_extra=wandb_offline)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stop requested (SIGTERM) at step 5" in stopped.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["export_dir"] == ""
    latest = list_checkpoints(tmp_path / "checkpoints")[-1][1]
    assert latest.name == "step-0000005" and read_train_state(latest).global_step == 5
    wandb_id = (tmp_path / "wandb_id").read_text()

    resumed = run(args(shards, tmp_path, "--report-to", "wandb", "--resume", "auto"), env_extra=wandb_offline)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path), straight)
    assert (tmp_path / "wandb_id").read_text() == wandb_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(wandb_id) for r in runs)  # one W&B run id across resumes


# ----------------------------------------------------------------------------- what a resume checks
# In-process runs through the launch scripts' body (run_entry), so exit codes and messages are the CLI's.
def tiny_args(shards, out, *extra):
    return ["--data", str(shards), "--output-dir", str(out), "--cnn", "test_resnet", "--vit", "test_vit",
            "--model.vit_patch_size", "8", "--embed-dim", "16", "--model.proj_hidden_dim", "32", "--image-size", "32",
            "--batch-size", "16", "--precision", "fp32", "--model.channels_last", "false", "--log-every", "1",
            "--max-steps", "2", "--save-every", "1", "--knn-every", "0", *extra]


def pretrain_cli(argv) -> int:
    from cass_dist.configs.pretrain import parse_pretrain_config
    from cass_dist.engine.entry import run_entry
    from cass_dist.engine.pretrain import pretrain

    reset_accelerate_state()
    try:
        return run_entry("launch/pretrain.py", parse_pretrain_config, pretrain, argv)
    finally:
        reset_accelerate_state()


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with its content's sha256: equal snapshots, untouched dir."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert pretrain_cli(tiny_args(shards, out)) == 0
    return out


@pytest.fixture()
def run_dir(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("launch/pretrain.py: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("other") / "syn"
    build_synthetic(out, num_images=320, image_size=32, shard_size=80, seed=1)
    return out


@pytest.mark.parametrize("change, named", [
    (["--batch-size", "8"], "global_batch 16 -> 8 (data.batch_size x processes x run.grad_accum_steps, now 8 x 1 x 1)"),
    (["--optim.optimizer", "adam"], "optim.optimizer 'adamw' -> 'adam'"),
    (["--cnn", "resnet18"], "model.cnn 'test_resnet' -> 'resnet18'"),
    (["--views", "1"], "data.views 2 -> 1"),
    ("other data", "data.manifest_digest"),
])
def test_a_changed_run_is_refused_and_nothing_in_the_run_dir_changes(shards, other_shards, run_dir, capsys,
                                                                      change, named):
    before = snapshot(run_dir)
    if change == "other data":
        argv = tiny_args(other_shards, run_dir, "--resume", "auto")
    else:
        argv = tiny_args(shards, run_dir, "--resume", "auto", *change)
    assert pretrain_cli(argv) == 2
    line = error_line(capsys)
    assert named in line and "step-0000002" in line and "--resume-force" in line
    assert snapshot(run_dir) == before


def test_forced_changes_are_accepted_and_schedule_changes_logged(shards, run_dir, caplog):
    caplog.set_level(logging.INFO, logger="cass_dist")
    argv = tiny_args(shards, run_dir, "--resume", "auto", "--batch-size", "8", "--resume-force", "global_batch",
                     "--max-steps", "3", "--lr-cnn", "0.002")
    assert pretrain_cli(argv) == 0
    assert "resume: global_batch 16 -> 8" in caplog.text and "(accepted by --resume-force)" in caplog.text
    assert "resume: run.max_steps 2 -> 3 (changed since the checkpoint)" in caplog.text
    assert "resume: optim.lr_cnn 0.001 -> 0.002" in caplog.text
    state = read_train_state(run_dir / "checkpoints" / "step-0000003")
    assert state.fingerprint["global_batch"] == 8 and state.config["data.batch_size"] == 8  # the new run's
    assert "batch_size: 8" in (run_dir / "config.yaml").read_text()  # written once the resume had loaded


def test_a_resume_that_fails_to_load_leaves_config_yaml_usable(shards, run_dir, capsys):
    # The case: --cnn resnet34 got past the checks (here: forced), then failed to load.
    before = snapshot(run_dir)
    argv = tiny_args(shards, run_dir, "--resume", "auto", "--cnn", "resnet18", "--resume-force", "model.cnn")
    assert pretrain_cli(argv) == 1
    line = error_line(capsys)
    assert "step-0000002: cannot restore the training state" in line
    assert snapshot(run_dir) == before  # config.yaml still says test_resnet, metrics.jsonl untouched
    # (--output-dir: this copy's config.yaml names the directory it was copied from)
    assert pretrain_cli(["--config", str(run_dir / "config.yaml"), "--output-dir", str(run_dir), "--resume", "auto",
                         "--max-steps", "3"]) == 0
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")][-1] == 3


@pytest.mark.parametrize("damage, named", [
    ("truncate model", "model.safetensors is damaged or was replaced"),
    ("step not a number", "train_state.json: global_step must be a non-negative integer, got 'two'"),
    ("planted file", "extra.pkl was not written by this run"),
])
def test_damaged_checkpoints_give_one_line_errors_and_change_nothing(shards, run_dir, capsys, damage, named):
    latest = run_dir / "checkpoints" / "step-0000002"
    if damage == "truncate model":
        data = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(data[:1000])
    elif damage == "step not a number":
        state = json.loads((latest / "train_state.json").read_text())
        (latest / "train_state.json").write_text(json.dumps({**state, "global_step": "two"}))
    else:
        (latest / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    before = snapshot(run_dir)
    assert pretrain_cli(tiny_args(shards, run_dir, "--resume", "auto")) == 1
    assert named in error_line(capsys)
    assert snapshot(run_dir) == before


def test_a_fine_tuning_resume_is_checked_too(shards, tmp_path, capsys):
    from cass_dist.configs.finetune import parse_finetune_config
    from cass_dist.engine.entry import run_entry
    from cass_dist.engine.finetune import finetune

    def finetune_cli(*extra):
        reset_accelerate_state()
        argv = ["--data", str(shards), "--init", "random", "--cnn", "test_resnet", "--batch-size", "16",
                "--image-size", "32", "--precision", "fp32", "--max-steps", "1", "--output-dir", str(tmp_path / "ft"),
                *extra]
        return run_entry("launch/finetune.py", parse_finetune_config, finetune, argv)

    assert finetune_cli("--label-fraction", "0.5") == 0
    before = snapshot(tmp_path / "ft")
    assert finetune_cli("--label-fraction", "0.25", "--resume", "auto", "--max-steps", "2") == 2
    assert "data.label_fraction 0.5 -> 0.25" in capsys.readouterr().err
    assert snapshot(tmp_path / "ft") == before
    assert finetune_cli("--label-fraction", "0.5", "--resume", "auto", "--max-steps", "2") == 0
