"""No host sync per micro-batch in the pretraining hot loop: at most ONE per optimizer step (the guard's
agreement, which also carries the stop flag) outside the logging steps, whatever the accumulation.

Counted on CPU through a TorchFunctionMode that sees every Tensor method call that would wait for the
device on CUDA: ``item``, ``bool()``, ``float()``, ``int()``, ``tolist``, ``numpy``, ``cpu``. Two kinds of
call are not counted, since on CUDA they read host memory: the loader producing the next batch (workers
and collation run on CPU tensors) and torch.optim's own reads of its step counters (CPU tensors).
"""

from __future__ import annotations

import sys
import traceback
from collections import defaultdict

import pytest
from accelerate.state import AcceleratorState, GradientState
from torch.overrides import TorchFunctionMode

from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine import pretrain as pretrain_module

SYNCS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}
ACCUM, STEPS, LOG_EVERY = 3, 6, 3


class HostSyncCounter(TorchFunctionMode):
    """Counts device-waiting Tensor calls per optimizer step (``step`` is advanced by the caller)."""

    def __init__(self):
        super().__init__()
        self.step, self.in_loader = 0, False
        self.calls = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNCS and not self.in_loader and not self._from_torch_optim():
            self.calls[self.step].append("".join(traceback.format_stack(limit=6)[:-1]))
        return func(*args, **(kwargs or {}))

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
            yield batch


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


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
