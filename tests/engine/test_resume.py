"""Kill and resume: SIGKILL mid-run + ``--resume auto`` ends where a straight run ends; SIGTERM checkpoints."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine.checkpoint import list_checkpoints, read_train_state

pytestmark = pytest.mark.slow  # trains in subprocesses (still CPU, tiny models)
REPO = Path(__file__).resolve().parents[2]

# Runs the real CLI, but sends itself `signal` while fetching micro-batch number `after`: a kill at a
# known point of the run, independent of machine speed.
SELF_SIGNAL = """
import os, signal, sys
from cass_dist.engine import pretrain as p
sig, after = getattr(signal, sys.argv[1]), int(sys.argv[2])
fetched = 0

class SignalsItself:
    def __init__(self, inner):
        self.inner = inner
    def __len__(self):
        return len(self.inner)
    def __iter__(self):
        global fetched
        for batch in self.inner:
            fetched += 1
            if fetched == after:
                os.kill(os.getpid(), sig)
            yield batch

build = p.build_train_loader
p.build_train_loader = lambda *a: SignalsItself(build(*a))
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
