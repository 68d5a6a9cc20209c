"""DINO through the one pretraining loop: the default path end to end, exports, resume, and collapse."""

import json
import math
import signal

import pytest
import timm
import torch
from safetensors.torch import load_file

from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine.pretrain import build_train_loader, pretrain
from cass_dist.engine.step import lr_factor
from cass_dist.models import ExportError, load_backbone, read_export_info
from cass_dist.models.small_images import apply_small_stem
from tests._accelerate import reset_accelerate_state
from tests._signals import signals_itself

# trains in-process (CPU, timm test models, seconds each)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "syn"
    build_synthetic(out, num_images=640, image_size=32, shard_size=160)
    return out


def dino(shards, out, *extra):
    # Only the sizes are shrunk (test models, a small head); every DINO setting keeps its default.
    return parse_pretrain_config([
        "--data", str(shards), "--output-dir", str(out), "--method", "dino", "--cnn", "test_resnet",
        "--vit", "test_vit", "--model.vit_patch_size", "8", "--image-size", "32", "--batch-size", "16",
        "--precision", "fp32", "--model.channels_last", "false", "--log-every", "2", "--warmup-steps", "2",
        "--dino.hidden_dim", "64", "--dino.bottleneck_dim", "32", "--dino.out_dim", "256", *extra])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backbone", ["vit", "cnn"])
def test_default_dino_trains_logs_and_exports_its_teacher(shards, tmp_path, backbone):
    cfg = dino(shards, tmp_path, "--dino.backbone", backbone, "--max-steps", "6", "--knn-every", "6")
    assert cfg.dino.local_crops == 8  # the default path: multi-crop
    summary = pretrain(cfg)
    assert summary.method == "dino" and summary.steps == 6 and math.isfinite(summary.final_loss)
    other = "cnn" if backbone == "vit" else "vit"
    assert summary.embed_std_cnn > 0 if backbone == "cnn" else summary.embed_std_vit > 0
    assert math.isnan(getattr(summary, f"embed_std_{other}"))

    logged = [r for r in records(tmp_path) if "loss" in r]
    last = logged[-1]
    for key in ("teacher_temp", "teacher_momentum", "teacher_entropy", f"embed_std_{backbone}", f"lr_{backbone}"):
        assert key in last, key
    assert f"embed_std_{other}" not in last
    # DINO's linear lr rule: 5e-4 x 16 / 256 at the peak, warmup + cosine by global step
    assert {r["step"]: r[f"lr_{backbone}"] for r in logged}[4] == pytest.approx(5e-4 * 16 / 256 * lr_factor(3, 6, 2))
    assert last["teacher_momentum"] == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    knn = [r for r in records(tmp_path) if any(k.startswith("knn_acc") for k in r)]
    assert [sorted(k for k in r if k.startswith("knn")) for r in knn] == [[f"knn_acc_{backbone}"]]

    # the export is the teacher, as the branch it is, loadable by cass_dist and by plain timm
    info = read_export_info(tmp_path)
    assert info["branches"] == [backbone] and info["method"] == "dino" and info["exported"] == "teacher"
    saved = load_file(tmp_path / "checkpoints" / "step-0000006" / "model.safetensors")
    ours = load_backbone(tmp_path, backbone).eval()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, saved[f"teacher.{name}"]), name
    assert not all(torch.equal(saved[f"teacher.{n}"], saved[f"student.{n}"]) for n in ours.state_dict())
    spec, weights_file = info[backbone], tmp_path / "export" / info[backbone]["file"]
    assert spec["small_stem"] == (backbone == "cnn")  # 32 px: the CNN gets the small stem, as CASS's would
    if spec["small_stem"]:  # timm's model with its stem made stride-1 (test_resnet's is a deep stem), strict load
        plain = timm.create_model(spec["name"], **spec["timm_kwargs"])
        apply_small_stem(plain, spec["name"])
        plain.load_state_dict(load_file(weights_file))
    else:
        plain = timm.create_model(spec["name"], pretrained=True, **spec["timm_kwargs"],
                                  pretrained_cfg_overlay=dict(file=str(weights_file)))
    plain.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), ours(x))
    with pytest.raises(ExportError, match=f"holds no '{other}' branch \\(it holds \\['{backbone}'\\], method dino\\)"):
        load_backbone(tmp_path, other)


def test_stopped_and_resumed_dino_equals_a_straight_run(shards, tmp_path):
    # 448 train images / 16 = 28 steps an epoch; 2 local crops keep it short; the EMA teacher, the
    # centre, the multi-crop randomness and the schedules must all continue exactly.
    extra = ("--max-steps", "8", "--dino.local_crops", "2", "--dino.freeze_last_layer", "0.3")
    pretrain(dino(shards, tmp_path / "straight", *extra))
    reset_accelerate_state()
    stop_at_4 = signals_itself(build_train_loader, signal.SIGUSR1, 4)
    stopped = pretrain(dino(shards, tmp_path / "resumed", *extra), make_loader=stop_at_4)
    assert stopped.stopped_by == "SIGUSR1" and stopped.steps == 4
    reset_accelerate_state()
    pretrain(dino(shards, tmp_path / "resumed", *extra, "--resume", "auto"))
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step-0000008" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000008" / "model.safetensors")
    assert straight.keys() == resumed.keys() and "loss.center" in straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_without_centring_dino_collapses_and_the_monitor_says_so(shards, tmp_path):
    # The default teacher momentum (0.996) moves the teacher 0.4% a step: within a CPU-sized run it
    # neither learns nor collapses. A fast teacher (0.95) and a high lr show the mechanism in 40 steps;
    # the two runs differ only in centring. Two global crops only, for time.
    fast = ("--max-steps", "40", "--dino.local_crops", "0", "--dino.momentum_teacher", "0.95",
            "--dino.base_lr", "0", "--lr-vit", "5e-4", "--log-every", "4")
    pretrain(dino(shards, tmp_path / "off", *fast, "--dino.centering", "false"))
    reset_accelerate_state()
    pretrain(dino(shards, tmp_path / "on", *fast))
    off, on = records(tmp_path / "off"), records(tmp_path / "on")
    assert any(r.get("collapse_warning") for r in off)
    assert not any(r.get("collapse_warning") for r in on)
    final = {name: [r for r in rs if "loss" in r][-1] for name, rs in (("off", off), ("on", on))}
    # collapsing onto a few prototypes: the teacher's targets keep far less entropy than with centring
    assert final["off"]["teacher_entropy"] < 0.5 * final["on"]["teacher_entropy"]
    assert final["off"]["embed_std_vit"] < 0.1 / math.sqrt(256) < final["on"]["embed_std_vit"]
