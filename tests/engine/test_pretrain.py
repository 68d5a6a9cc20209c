"""End-to-end tiny pretraining runs (CPU, timm test models, synthetic shards)."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.data import build_loader
from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine import pretrain as pretrain_module
from cass_dist.engine.pretrain import NonFiniteLossError, pretrain
from cass_dist.engine.step import count_steps, lr_factor
from cass_dist.methods import cass as cass_method_module
from cass_dist.models import load_backbone
from tests._accelerate import reset_accelerate_state
from tests._steps import overflow_at_call

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each test trains in-process


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "syn"
    build_synthetic(out, num_images=320, image_size=32, shard_size=80)
    return out


def tiny(shards, out, *extra):
    return parse_pretrain_config([
        "--data", str(shards), "--output-dir", str(out), "--cnn", "test_resnet", "--vit", "test_vit",
        "--model.vit_patch_size", "8", "--embed-dim", "32", "--image-size", "32", "--batch-size", "16",
        "--precision", "fp32", "--model.channels_last", "false", "--log-every", "2", "--warmup-steps", "2",
        "--lr-cnn", "3e-3", "--lr-vit", "3e-3", *extra])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_objective_run_end_to_end(shards, tmp_path):
    cfg = tiny(shards, tmp_path, "--max-steps", "16", "--save-every", "8", "--knn-every", "8", "--keep-last", "1")
    summary = pretrain(cfg)

    losses = [r["loss"] for r in records(tmp_path) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert summary.steps == 16 and summary.final_loss == pytest.approx(losses[-1])
    healthy_floor = 0.1 / math.sqrt(32)  # the collapse warning's threshold
    assert summary.embed_std_cnn > healthy_floor and summary.embed_std_vit > healthy_floor
    assert summary.images_per_sec > 0 and summary.nonfinite_steps == 0

    last = [r for r in records(tmp_path) if "loss" in r][-1]
    for key in ("lr_cnn", "lr_vit", "images_per_sec", "data_wait_frac", "skipped_samples",
                "embed_std_cnn", "embed_eff_rank_vit"):
        assert key in last, key
    assert 0 <= last["data_wait_frac"] <= 1
    knn = [r for r in records(tmp_path) if "knn_acc_cnn" in r]
    assert [r["step"] for r in knn] == [8, 16] and all(0 <= r["knn_acc_vit"] <= 1 for r in knn)
    # warmup + cosine by global step, per branch
    lr_at = {r["step"]: r["lr_cnn"] for r in records(tmp_path) if "lr_cnn" in r}
    assert lr_at[8] == pytest.approx(3e-3 * lr_factor(7, 16, 2))

    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "summary.json").is_file()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000016"]  # keep-last 1
    assert summary.checkpoint.endswith("step-0000016") and summary.export_dir
    saved = load_file(tmp_path / "checkpoints" / "step-0000016" / "model.safetensors")
    cnn = load_backbone(tmp_path, "cnn")
    for name, value in cnn.state_dict().items():
        assert torch.equal(value, saved[f"model.cnn.{name}"]), name

    # Launching the finished run again (the demo's `--resume auto`) reports it instead of retraining.
    reset_accelerate_state()
    assert pretrain(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume="auto"))) == summary


@pytest.mark.parametrize("views", [1, 2])
def test_with_two_views_each_branch_trains_on_its_own_augmentation(shards, tmp_path, monkeypatch, views):
    seen = {"cnn": [], "vit": []}
    real = pretrain_module.build_method

    def recording(cfg):
        model = real(cfg)
        for branch in seen:
            getattr(model.model, branch).register_forward_pre_hook(
                lambda module, args, branch=branch: seen[branch].append(args[0].detach().clone()))
        return model

    monkeypatch.setattr(pretrain_module, "build_method", recording)
    summary = pretrain(tiny(shards, tmp_path, "--max-steps", "10", "--views", str(views), "--transform", "ssl"))
    assert len(seen["cnn"]) == len(seen["vit"]) == 10 and seen["cnn"][0].shape == (16, 3, 32, 32)
    same = [torch.equal(a, b) for a, b in zip(seen["cnn"], seen["vit"])]
    assert all(same) if views == 1 else not any(same)
    losses = [r["loss"] for r in records(tmp_path) if "loss" in r]
    assert losses[-1] < losses[0] and summary.embed_std_cnn > 0.1 / math.sqrt(32)


class NaNAfter(torch.nn.Module):
    """Wraps an objective; its loss is NaN on the given forward calls."""

    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0

    def branch_parameters(self):
        return self.inner.branch_parameters()

    def forward(self, z_cnn, z_vit):
        self.calls += 1
        out = self.inner(z_cnn, z_vit)
        if self.calls in self.bad_calls:
            out["loss"] = out["loss"] * float("nan")
        return out


def with_nan_objective(monkeypatch, bad_calls):
    real = cass_method_module.build_objective
    monkeypatch.setattr(cass_method_module, "build_objective", lambda *a, **k: NaNAfter(real(*a, **k), bad_calls))


def test_a_non_finite_step_is_skipped_and_counted(shards, tmp_path, monkeypatch):
    with_nan_objective(monkeypatch, bad_calls={3})
    summary = pretrain(tiny(shards, tmp_path, "--max-steps", "6"))
    assert summary.steps == 6 and summary.nonfinite_steps == 1 and math.isfinite(summary.final_loss)
    weights = load_file(tmp_path / "checkpoints" / "step-0000006" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    with_nan_objective(monkeypatch, bad_calls=range(6, 100))
    cfg = tiny(shards, tmp_path, "--max-steps", "20", "--save-every", "4", "--run.max_nonfinite_steps", "3")
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row.*step-0000004"):
        pretrain(cfg)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000004"]
    assert not (tmp_path / "export" / "model.json").exists()


@pytest.mark.slow
def test_gradient_accumulation_equals_the_big_batch(shards, tmp_path):
    # Valid comparison: per-sample loss (paper), no BatchNorm (convnext uses LayerNorm, linear heads instead
    # of the BatchNorm projectors), no random augmentation.
    # A large Adam eps: the ViT's key bias has an exactly-zero true gradient, and Adam would blow its
    # rounding noise (different summation orders) up to full-size steps.
    common = ["--cnn", "test_convnext", "--objective", "paper", "--head", "linear", "--data.transform", "eval",
              "--max-steps", "3",
              "--optim.eps", "1e-4"]
    small = build_loader(shards, "train", batch_size=8, train=True, transform="eval")
    big = build_loader(shards, "train", batch_size=16, train=True, transform="eval")
    small_keys = [k for b, _ in zip(small, range(2)) for k in b["key"]]
    assert small_keys == next(iter(big))["key"]  # the premise: the same samples in the same order

    pretrain(tiny(shards, tmp_path / "accum", *common, "--batch-size", "8", "--grad-accum-steps", "2"))
    reset_accelerate_state()
    pretrain(tiny(shards, tmp_path / "big", *common, "--batch-size", "16"))
    a = load_file(tmp_path / "accum" / "checkpoints" / "step-0000003" / "model.safetensors")
    b = load_file(tmp_path / "big" / "checkpoints" / "step-0000003" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    decay = [lr_factor(s, 10, 4, 0.1) for s in range(4, 11)]
    assert decay[0] == 1.0 and decay[-1] == pytest.approx(0.1)
    assert all(x > y for x, y in zip(decay, decay[1:]))


def test_step_count_follows_max_steps_or_epochs_and_names_the_batch_size_when_too_small():
    assert count_steps(10, grad_accum_steps=2, max_steps=0, epochs=3, split="train") == (15, 5)
    assert count_steps(10, grad_accum_steps=2, max_steps=7, epochs=3, split="train") == (7, 5)
    # min_steps floors the epochs' count only: max_steps still wins, and longer epochs are left as they are
    assert count_steps(10, grad_accum_steps=2, max_steps=0, epochs=3, split="train", min_steps=40) == (40, 5)
    assert count_steps(10, grad_accum_steps=2, max_steps=7, epochs=3, split="train", min_steps=40) == (7, 5)
    assert count_steps(10, grad_accum_steps=2, max_steps=0, epochs=3, split="train", min_steps=12) == (15, 5)
    with pytest.raises(ValueError, match=r"data\.batch_size: split 'train' gives 1 batches.*grad_accum_steps=2"):
        count_steps(1, grad_accum_steps=2, max_steps=0, epochs=3, split="train")


def test_a_skipped_step_leaves_batchnorm_running_statistics_as_they_were(shards, tmp_path, monkeypatch):
    # A NaN reaching the activations (an fp16 overflow, a corrupt image) also reaches BatchNorm's running
    # statistics in the forward; the skip must undo that, or every later eval forward is NaN.
    real, calls = pretrain_module.build_method, []

    def nan_images_on_call_3(module, args):
        calls.append(1)
        return ([view * float("nan") for view in args[0]],) if len(calls) == 3 else None

    def build_method(cfg):
        model = real(cfg)
        model.register_forward_pre_hook(nan_images_on_call_3)
        return model

    monkeypatch.setattr(pretrain_module, "build_method", build_method)
    summary = pretrain(tiny(shards, tmp_path, "--max-steps", "6", "--knn-every", "6"))  # the defaults' BatchNorm
    assert summary.steps == 6 and summary.nonfinite_steps == 1 and math.isfinite(summary.final_loss)
    state = load_file(tmp_path / "checkpoints" / "step-0000006" / "model.safetensors")
    running = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
    assert running and all(torch.isfinite(v).all() for v in running.values())
    knn = [r for r in records(tmp_path) if "knn_acc_cnn" in r]
    assert knn and all(math.isfinite(r["knn_acc_cnn"]) and r["knn_acc_cnn"] > 0 for r in knn)


def test_loss_scaler_skips_are_counted_apart_from_non_finite_steps(shards, tmp_path, monkeypatch):
    # CPU runs have no GradScaler, so the step reports the scaler's skip here; that optimizer_step reads
    # it from a real GradScaler is shown in tests/distributed/test_nonfinite_guard.py (fp16 case).
    monkeypatch.setattr(pretrain_module, "optimizer_step", overflow_at_call(pretrain_module.optimizer_step, 2))
    summary = pretrain(tiny(shards, tmp_path, "--max-steps", "4"))
    assert summary.overflow_steps == 1 and summary.nonfinite_steps == 0
    assert [r["overflow_steps"] for r in records(tmp_path) if "loss" in r] == [1, 1]
    assert "1 fp16 overflow" in summary.describe()
