"""DeepSpeed ZeRO-2 through Accelerate on CPU (gloo): the CASS model trains as one module with one
optimizer, checkpoints are DeepSpeed's sharded ones, they resume, and the exports are the usual files.

Runs only where the `deepspeed` extra is installed (pip install "cass-dist[deepspeed]").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason='the deepspeed extra is not installed (pip install "cass-dist[deepspeed]")')
pytest.importorskip("transformers", reason="Accelerate needs transformers to run DeepSpeed")

REPO_ROOT = Path(__file__).resolve().parents[2]
BATCH = 8
STEPS = 4


def _cpu_zero2_config(tmp_path: Path) -> Path:
    """The shipped ZeRO-2 config with what a CPU needs changed: fp32, this test's micro-batch, 2 processes."""
    ds = json.loads((REPO_ROOT / "launch/configs/deepspeed_zero2.json").read_text())
    ds["bf16"] = {"enabled": False}
    ds["train_micro_batch_size_per_gpu"] = BATCH
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    yaml_text = (REPO_ROOT / "launch/configs/deepspeed_zero2.yaml").read_text()
    yaml_text = yaml_text.replace("launch/configs/deepspeed_zero2.json", str(tmp_path / "ds.json"))
    yaml_text = yaml_text.replace("num_processes: 8", "num_processes: 2")
    (tmp_path / "zero2.yaml").write_text(yaml_text)
    return tmp_path / "zero2.yaml"


def _launch(config: Path, run_dir: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", "29437", str(REPO_ROOT / "launch/pretrain.py"),
           "--preset", "demo", "--data", str(shards), "--output-dir", str(run_dir), "--max-steps", str(STEPS),
           "--save-every", "2", "--batch-size", str(BATCH), "--image-size", "32", "--knn-every", "0",
           "--report-to", "none", *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_zero2_cpu_trains_checkpoints_resumes_and_exports(demo_shards: Path, tmp_path: Path) -> None:
    from cass_dist.engine.checkpoint import find_latest, read_train_state
    from cass_dist.models.export import load_backbone

    config, run_dir = _cpu_zero2_config(tmp_path), tmp_path / "run"
    first = _launch(config, run_dir, demo_shards)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    step4 = run_dir / "checkpoints" / "step-0000004"
    # DeepSpeed's own layout, with optimizer state sharded over the two ranks (ZeRO-2), not a DDP checkpoint.
    shards = sorted(p.name for p in step4.rglob("*optim_states.pt"))
    assert len(shards) == 2 and any("rank_0" in s for s in shards) and any("rank_1" in s for s in shards), \
        sorted(str(p.relative_to(step4)) for p in step4.rglob("*"))

    exported = {name: load_backbone(run_dir, name) for name in ("cnn", "vit")}
    assert all(sum(p.numel() for p in m.parameters()) > 0 for m in exported.values())

    # Resume from the step-2 checkpoint, as a requeued job would after losing the last one.
    import shutil
    shutil.rmtree(step4)
    shutil.rmtree(run_dir / "export")
    second = _launch(config, run_dir, demo_shards, "--resume", "auto")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    assert "step-0000002" in second.stdout + second.stderr  # it said where it resumed from
    assert "weights_only unpickler" in second.stdout + second.stderr  # DeepSpeed's files never fully unpickled
    assert read_train_state(find_latest(run_dir / "checkpoints")).global_step == STEPS
    assert {p.name for p in (run_dir / "export").iterdir()} >= {"cnn.safetensors", "vit.safetensors", "model.json"}
