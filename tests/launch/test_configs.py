"""The launch configs parse as Accelerate reads them, the DeepSpeed JSON is explicit, the scripts are sound."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from cass_dist.configs.pretrain import paper
from cass_dist.utils.deepspeed import (
    INSTALL_HINT,
    DeepSpeedUnavailableError,
    check_deepspeed_matches,
    load_deepspeed_config,
    require_deepspeed,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    "accelerate_config.yaml": (DistributedType.MULTI_GPU, "bf16", 1),
    "launch/configs/cpu.yaml": (DistributedType.MULTI_GPU, "no", 1),
    "launch/configs/multinode.yaml": (DistributedType.MULTI_GPU, "bf16", 2),
    "launch/configs/deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, None, 1),
}
SCRIPTS = ["launch/slurm/pretrain.sbatch", "launch/slurm/finetune.sbatch"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_configs_parse_and_say_what_they_are(name: str) -> None:
    path = REPO_ROOT / name
    assert path.read_text().startswith("#"), f"{name} needs a comment header"
    config = load_config_from_file(str(path))
    distributed_type, precision, machines = CONFIGS[name]
    assert config.distributed_type == distributed_type
    assert config.mixed_precision == precision
    assert config.num_machines == machines
    assert config.num_processes >= 1


def test_launcher_accepts_every_config(tmp_path: Path) -> None:
    """`accelerate launch` resolves each config into launcher arguments without error."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    for name in CONFIGS:
        args = launch_command_parser().parse_args(["--config_file", str(REPO_ROOT / name), "train.py"])
        args, _, _ = _validate_launch_command(args)
        assert args.num_processes >= 1, name
    ds = launch_command_parser().parse_args(
        ["--config_file", str(REPO_ROOT / "launch/configs/deepspeed_zero2.yaml"), "train.py"])
    ds, _, _ = _validate_launch_command(ds)
    assert ds.use_deepspeed and (REPO_ROOT / ds.deepspeed_config_file).is_file()


def test_deepspeed_json_is_explicit_and_zero2() -> None:
    path = REPO_ROOT / "launch/configs/deepspeed_zero2.json"
    config = load_deepspeed_config(path)
    assert config["zero_optimization"]["stage"] == 2
    assert config["train_micro_batch_size_per_gpu"] >= 1 and config["gradient_accumulation_steps"] >= 1
    assert "auto" not in _values(config)  # no value anywhere, not only the two keys checked above
    # The one-command DeepSpeed run uses the paper preset as is.
    check_deepspeed_matches(config, batch_size=paper().data.batch_size, grad_accum_steps=paper().run.grad_accum_steps,
                            clip_grad=paper().run.clip_grad, origin=str(path))


def test_deepspeed_mismatch_names_both_fields() -> None:
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1}
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu is 16 but data.batch_size is 32"):
        check_deepspeed_matches(config, batch_size=32, grad_accum_steps=1, clip_grad=0.0, origin="ds.json")
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps is 1 but run.grad_accum_steps is 4"):
        check_deepspeed_matches(config, batch_size=16, grad_accum_steps=4, clip_grad=0.0, origin="ds.json")


def _values(tree) -> list:
    if isinstance(tree, dict):
        return [v for value in tree.values() for v in _values(value)]
    return [tree]


@pytest.mark.parametrize("bad, message", [
    ({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1}, "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 8}, "gradient_accumulation_steps"),
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 4}},
     "zero_optimization.stage"),
])
def test_bad_deepspeed_json_names_file_and_key(tmp_path: Path, bad: dict, message: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_deepspeed_config(path)
    assert str(path) in str(info.value)


def test_missing_deepspeed_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    with pytest.raises(DeepSpeedUnavailableError, match=re.escape(INSTALL_HINT)) as info:
        require_deepspeed("run.engine is deepspeed")
    assert "run.engine is deepspeed" in str(info.value)
    assert isinstance(info.value, ImportError)


def test_deepspeed_without_transformers_says_how_to_install(monkeypatch) -> None:
    """Accelerate needs transformers to select a DeepSpeed plugin; say so instead of PackageNotFoundError."""
    import importlib.metadata
    import types

    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "transformers":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(DeepSpeedUnavailableError, match="'transformers' is not") as info:
        require_deepspeed()
    assert INSTALL_HINT in str(info.value)


@pytest.mark.parametrize("name", SCRIPTS)
def test_sbatch_scripts_request_requeue_and_early_signal(name: str) -> None:
    text = (REPO_ROOT / name).read_text()
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / name)]).returncode == 0
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    for wanted in ("--requeue", "--signal=B:USR1@120", "--ntasks-per-node=1", "--open-mode=append"):
        assert wanted in directives, f"{name} lacks #SBATCH {wanted}"


def test_pretrain_sbatch_expands_machine_rank_on_each_node() -> None:
    text = (REPO_ROOT / "launch/slurm/pretrain.sbatch").read_text()
    # Inside the single-quoted `bash -c` body, so the node's own SLURM_NODEID is used, not the batch host's.
    body = re.search(r"bash -c '(.*?)'", text, flags=re.S).group(1)
    assert '--machine_rank "$SLURM_NODEID"' in body and '--num_machines "$SLURM_NNODES"' in body
    assert "--resume auto" in text and "scontrol requeue" in text and 'wait "$TRAINER_PID"' in text
