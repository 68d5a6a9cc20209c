"""A pretraining run requeued on half the processes (same global batch) goes on from the same global sample.

2 gloo ranks (batch 8 each) train 3 steps and checkpoint; then 1 process (batch 16) resumes the same
run dir with ``--resume auto`` and finishes the epoch. Every consumed batch's keys are recorded (this
file, run as a script, wraps the engine's own loader): over the epoch no sample repeats and none is
missing.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.distributed._ranks import free_port

pytestmark = pytest.mark.slow  # trains in subprocesses (CPU, tiny models)
REPO = Path(__file__).resolve().parents[2]


class Recording:
    """The engine's loader, writing the keys of every batch it hands out to ``<out>/keys-<pid>.jsonl``."""

    def __init__(self, loader, out: Path):
        self.loader, self.out = loader, out

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # position(), skipped_by_shard(), ...: the real loader's
        return getattr(self.loader, name)

    def __iter__(self):
        with open(self.out / f"keys-{os.getpid()}.jsonl", "a") as fh:
            for batch in self.loader:
                fh.write(json.dumps(batch["key"]) + "\n")
                fh.flush()
                yield batch


def recording_loader(cfg, accelerator, epoch, start):
    from cass_dist.engine.pretrain import build_train_loader

    return Recording(build_train_loader(cfg, accelerator, epoch, start), Path(cfg.run.output_dir))


def args(shards, out, batch_size, max_steps):
    return ["--data", str(shards), "--output-dir", str(out), "--cnn", "test_resnet", "--vit", "test_vit",
            "--model.vit_patch_size", "8", "--embed-dim", "16", "--image-size", "32", "--batch-size", str(batch_size),
            "--precision", "fp32", "--model.channels_last", "false", "--max-steps", str(max_steps),
            "--save-every", "3", "--log-every", "3", "--resume", "auto", "--num-workers", "1"]


def test_resume_on_one_process_after_two_goes_on_from_the_same_global_sample(tmp_path):
    from cass_dist.data.synthetic import build_synthetic

    shards = tmp_path / "syn"
    build_synthetic(shards, num_images=160, image_size=32, shard_size=20)  # 112 train = 7 steps of 16
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    run = tmp_path / "run"
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), __file__, *args(shards, run, 8, 3)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    state = json.loads((run / "checkpoints" / "step-0000003" / "train_state.json").read_text())
    assert state["data_position"]["samples"] == 3 * 16  # saved in global samples

    one = subprocess.run([sys.executable, __file__, *args(shards, run, 16, 7)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    state = json.loads((run / "checkpoints" / "step-0000007" / "train_state.json").read_text())
    assert (state["epoch"], state["data_position"]) == (1, {})  # the epoch ended where it should

    batches = [json.loads(line) for path in sorted(run.glob("keys-*.jsonl")) for line in path.read_text().splitlines()]
    sizes = Counter(len(b) for b in batches)
    assert sizes == {8: 2 * 3, 16: 7 - 3}  # 3 steps on two ranks of 8, then 4 steps of 16
    seen = [k for b in batches for k in b]
    expected = json.loads((shards / "index-train.json").read_text())["keys"]
    assert max(Counter(seen).values()) == 1 and sorted(seen) == sorted(expected)  # no repeat, no gap


if __name__ == "__main__":
    from cass_dist.configs.pretrain import parse_pretrain_config
    from cass_dist.engine.pretrain import pretrain

    pretrain(parse_pretrain_config(sys.argv[1:]), make_loader=recording_loader)
