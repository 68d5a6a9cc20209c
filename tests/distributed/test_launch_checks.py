"""What a launch may not ask for, refused before any work with the field to change: FSDP, ZeRO-3, DeepSpeed
with gradient accumulation, and DeepSpeed clipping that differs from run.clip_grad."""

from __future__ import annotations

import json

import pytest

from cass_dist.utils.deepspeed import LaunchConfigError, check_launch, load_deepspeed_config

RUN = {"batch_size": 8, "grad_accum_steps": 1, "clip_grad": 0.0}


def ds_json(tmp_path, **extra):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                                "zero_optimization": {"stage": 2}, **extra}))
    return path


@pytest.fixture
def deepspeed_launch(monkeypatch):
    """The environment ``accelerate launch`` gives a DeepSpeed job (no inline DeepSpeed values set)."""
    pytest.importorskip("deepspeed", reason='the deepspeed extra is not installed (pip install "cass-dist[deepspeed]")')
    pytest.importorskip("transformers")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for name in ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                 "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_fsdp_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LaunchConfigError, match="FSDP"):
        check_launch(**RUN)


def test_deepspeed_with_accelerate_use_cpu_is_refused(tmp_path, deepspeed_launch):
    # Accelerate would quietly drop DeepSpeed and train plain DDP (what a leaked variable once did in CI).
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json(tmp_path)))
    check_launch(**RUN)
    deepspeed_launch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(LaunchConfigError, match="ACCELERATE_USE_CPU is set.*skips DeepSpeed"):
        check_launch(**RUN)


def test_zero3_is_refused_in_the_json_and_inline(tmp_path, deepspeed_launch):
    with pytest.raises(LaunchConfigError, match="stage 3 is not supported"):
        load_deepspeed_config(ds_json(tmp_path, zero_optimization={"stage": 3}))
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    deepspeed_launch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.0")
    with pytest.raises(LaunchConfigError, match="stage 3 is not supported"):
        check_launch(**RUN)


def test_deepspeed_with_accumulation_is_refused(tmp_path, deepspeed_launch):
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json(tmp_path, gradient_accumulation_steps=2)))
    with pytest.raises(LaunchConfigError, match=r"run.grad_accum_steps: 2 under DeepSpeed.*partial gradients"):
        check_launch(**{**RUN, "grad_accum_steps": 2})


@pytest.mark.parametrize("json_value, clip_grad, ok", [
    (None, 0.0, True),     # absent: DeepSpeed does not clip, nor does the run
    (1.0, 1.0, True),
    (1.0, 0.0, False),     # the old shipped JSON with the run's default: clipping the run did not ask for
    (0.0, 3.0, False),
    ("auto", 1.0, True),   # Accelerate fills "auto" with 1.0
    ("auto", 0.0, False),
])
def test_deepspeed_clipping_must_equal_run_clip_grad(tmp_path, deepspeed_launch, json_value, clip_grad, ok):
    extra = {} if json_value is None else {"gradient_clipping": json_value}
    deepspeed_launch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json(tmp_path, **extra)))
    if ok:
        check_launch(**{**RUN, "clip_grad": clip_grad})
    else:
        with pytest.raises(LaunchConfigError, match=r"gradient_clipping is .* but run.clip_grad is"):
            check_launch(**{**RUN, "clip_grad": clip_grad})


def test_inline_deepspeed_clipping_defaults_to_accelerates_one(deepspeed_launch):
    with pytest.raises(LaunchConfigError, match=r"gradient_clipping is 1.0 but run.clip_grad is 0.0"):
        check_launch(**RUN)
    check_launch(**{**RUN, "clip_grad": 1.0})
    deepspeed_launch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    check_launch(**{**RUN, "clip_grad": 0.5})
