"""No host sync per micro-batch in the pretraining hot loop: at most ONE per optimizer step (the guard's
agreement, which also carries the stop flag) outside the logging steps, whatever the accumulation.

Counted on CPU through a TorchFunctionMode that sees every Tensor method call that would wait for the
device on CUDA: ``item``, ``bool()``, ``float()``, ``int()``, ``tolist``, ``numpy``, ``cpu``, but only
on tensors that would LIVE on the device in a GPU run: the loader's images once the engine has them,
parameters, anything with autograd history, and everything computed from those. On a CPU every
tensor is a CPU tensor, so without that tracking the count would include reads that stay on the host
on a GPU too: kornia (>= 0.9) draws augmentation parameters on the CPU and branches on them there
(ColorJitter's random order, for one), and the loader's workers and collation run on CPU tensors.
torch.optim's reads of its own step counters are left out as well (CPU tensors in a GPU run).
What this cannot see on a CPU is a blocking host-to-device copy (a stream sync on CUDA):
``benchmarks/data_gpu_check.py`` checks the device transforms under ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import sys
import traceback
from collections import defaultdict

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine import pretrain as pretrain_module

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each test trains in-process

SYNCS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}
ACCUM, STEPS, LOG_EVERY = 3, 6, 3


class HostSyncCounter(TorchFunctionMode):
    """Counts device-waiting reads of device-resident tensors per optimizer step (the caller advances ``step``)."""

    def __init__(self):
        super().__init__()
        self.step, self.in_loader = 0, False
        self.calls = defaultdict(list)
        self.on_device = WeakIdKeyDictionary()  # tensors a GPU run would hold on the GPU

    def mark(self, tensor: torch.Tensor) -> None:
        self.on_device[tensor] = True

    def _resident(self, value) -> bool:
        return isinstance(value, torch.Tensor) and (
            value in self.on_device or isinstance(value, torch.nn.Parameter) or value.requires_grad
            or value.grad_fn is not None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        inputs = [v for v in tree_flatten((args, kwargs or {}))[0] if isinstance(v, torch.Tensor)]
        resident = any(self._resident(v) for v in inputs)
        if (getattr(func, "__name__", "") in SYNCS and resident and not self.in_loader
                and not self._from_torch_optim()):
            self.calls[self.step].append("".join(traceback.format_stack(limit=6)[:-1]))
        out = func(*args, **(kwargs or {}))
        if resident:  # what is computed from device tensors is on the device too (grads of parameters included)
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor):
                    self.mark(value)
        return out

    @staticmethod
    def _from_torch_optim() -> bool:
        caller = sys._getframe(2)  # 0: this, 1: __torch_function__, 2: whoever called the Tensor method
        return "torch/optim/" in caller.f_code.co_filename


class TimedLoader:
    """Marks the time the loader spends producing a batch, so its host-side work is not counted."""

    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def __len__(self):
        return len(self.inner)

    def skipped(self):
        return self.inner.skipped() if hasattr(self.inner, "skipped") else 0

    def __iter__(self):
        batches = iter(self.inner)
        while True:
            self.counter.in_loader = True
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.counter.in_loader = False
            self.counter.mark(batch["image"])  # the engine moves it to the device next
            yield batch


@pytest.mark.parametrize("objective", ["vicreg", "paper"])
def test_at_most_one_host_sync_per_optimizer_step_outside_logging(tmp_path, monkeypatch, objective):
    build_synthetic(tmp_path / "syn", num_images=320, image_size=32, shard_size=80)
    counter = HostSyncCounter()
    real_step = pretrain_module.optimizer_step

    def counted_step(*args, **kwargs):
        counter.step += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "optimizer_step", counted_step)
    real_loader = pretrain_module.build_train_loader
    cfg = parse_pretrain_config([  # the defaults (BatchNorm projector heads, sync_bn auto) on tiny models
        "--data", str(tmp_path / "syn"), "--output-dir", str(tmp_path / "run"), "--cnn", "test_resnet",
        "--vit", "test_vit", "--model.vit_patch_size", "8", "--embed-dim", "32", "--image-size", "32",
        "--batch-size", "8", "--precision", "fp32", "--objective", objective, "--grad-accum-steps", str(ACCUM),
        "--max-steps", str(STEPS), "--log-every", str(LOG_EVERY), "--clip-grad", "1.0"])
    with counter:
        summary = pretrain_module.pretrain(cfg, make_loader=lambda *a: TimedLoader(real_loader(*a), counter))
    assert summary.steps == STEPS
    # step k's count runs from its optimizer_step to the next one: its window, bookkeeping and the next fetch;
    # the logging steps (and the last, with the final checkpoint and export) may read tensors
    hot = [k for k in range(1, STEPS + 1) if k % LOG_EVERY]
    for k in hot:
        assert len(counter.calls[k]) <= 1, f"step {k}: {len(counter.calls[k])} host syncs:\n" + \
            "\n".join(counter.calls[k])
    assert any(counter.calls[k] for k in hot)  # the counter does see the guard's one read
