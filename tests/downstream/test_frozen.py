"""Frozen means frozen: while ``--freeze-backbone-steps`` lasts, no backward through the backbone, no
optimizer state for it and no BatchNorm update; afterwards all three resume. Also under 2-rank DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cass_dist.engine.finetune as finetune_module
from cass_dist.configs.finetune import parse_finetune_config
from cass_dist.engine.classifier import load_classifier
from cass_dist.engine.finetune import finetune
from cass_dist.models import load_backbone
from tests.distributed._ranks import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # trains


def args(shards, init, out, *extra):
    return ["--data", str(shards), "--init", str(init), "--branch", "cnn", "--batch-size", "16", "--image-size", "32",
            "--precision", "fp32", "--label-fraction", "0.5", "--lr", "0.01", "--eval-every", "1", "--log-every", "1",
            "--data.train_transform", "eval", "--output-dir", str(out), *extra]


def test_frozen_steps_have_no_backward_no_optimizer_state_and_no_batchnorm_update(syn_shards, tiny_export,
                                                                                  tmp_path, monkeypatch):
    steps = []  # per optimizer step: backward calls into the backbone, its BN buffers, its optimizer state

    real_build, real_step = finetune_module.build_classifier, finetune_module.optimizer_step

    def build_with_hooks(*a, **k):
        model = real_build(*a, **k)
        model.backward_calls = 0

        def count(module, grad_input, grad_output):
            model.backward_calls += 1
        model.backbones["cnn"].register_full_backward_hook(count)
        return model

    def recording_step(accelerator, model, optimizer, window, forward, **kw):
        result = real_step(accelerator, model, optimizer, window, forward, **kw)
        classifier = accelerator.unwrap_model(model)
        backbone = classifier.backbones["cnn"]
        bn = backbone.bn1
        steps.append({
            "backward": classifier.backward_calls, "running_mean": bn.running_mean.clone(),
            "tracked": int(bn.num_batches_tracked),
            "backbone_state": sum(1 for p in backbone.parameters() if optimizer.state.get(p)),
            "head_state": sum(1 for p in classifier.heads.parameters() if optimizer.state.get(p)),
        })
        classifier.backward_calls = 0
        return result

    monkeypatch.setattr(finetune_module, "build_classifier", build_with_hooks)
    monkeypatch.setattr(finetune_module, "optimizer_step", recording_step)
    finetune(parse_finetune_config(args(syn_shards, tiny_export, tmp_path / "ft", "--max-steps", "3",
                                        "--freeze-backbone-steps", "2")))
    exported = load_backbone(tiny_export, "cnn", num_classes=0).state_dict()
    frozen, unfrozen = steps[:2], steps[2]
    for record in frozen:
        assert record["backward"] == 0  # no backward through the backbone at all
        assert record["backbone_state"] == 0 and record["head_state"] > 0  # Adam keeps no moments for it
        assert record["tracked"] == int(exported["bn1.num_batches_tracked"])  # eval mode: no BN update
        torch.testing.assert_close(record["running_mean"], exported["bn1.running_mean"])
    assert unfrozen["backward"] > 0 and unfrozen["backbone_state"] > 0
    assert unfrozen["tracked"] == frozen[-1]["tracked"] + 1
    assert not torch.equal(unfrozen["running_mean"], exported["bn1.running_mean"])


def test_a_run_that_ends_frozen_keeps_every_backbone_weight_and_buffer(syn_shards, tiny_export, tmp_path):
    finetune(parse_finetune_config(args(syn_shards, tiny_export, tmp_path / "lp", "--max-steps", "2",
                                        "--freeze-backbone-steps", "2")))
    tuned = load_file(str(tmp_path / "lp/best/classifier.safetensors"))
    exported = load_backbone(tiny_export, "cnn", num_classes=0).state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(tuned[f"backbones.cnn.{key}"], value, msg=key)
    head = load_classifier(tmp_path / "lp").heads["cnn"][1].weight
    assert head.abs().sum() > 0


def test_two_ddp_ranks_freeze_then_unfreeze(syn_shards, tiny_export, tmp_path):
    # Frozen parameters get no gradient: DDP needs find_unused_parameters, else it fails at step 2.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launch/finetune.py"), *args(syn_shards, tiny_export, out, "--max-steps", "3",
                                                     "--freeze-backbone-steps", "2", "--batch-size", "8")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr and "step 2: backbones unfrozen" in proc.stderr
    assert (out / "metrics.json").is_file()
    last = load_file(str(out / "checkpoints/step-0000003/model.safetensors"))  # after the unfrozen step
    exported = load_backbone(tiny_export, "cnn", num_classes=0).state_dict()
    assert not torch.equal(last["backbones.cnn.conv1.weight"], exported["conv1.weight"])
