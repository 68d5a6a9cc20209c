"""cass_dist.utils.distributed on 2 gloo ranks: the gather's values and gradient scale, the flag agreement,
and which modules the SyncBatchNorm conversion touches (and why CPU runs skip it)."""

from __future__ import annotations

import pytest
import torch

from cass_dist.losses import build_objective
from cass_dist.models import CASS, CASSPretrainer
from cass_dist.utils.distributed import SyncBatchNormError, batchnorm_modules, sync_batchnorm
from tests.distributed import _workers as workers
from tests.distributed._ranks import run_ranks


@pytest.fixture(scope="module")
def ranks():
    """One 2-rank gloo run (process start-up dominates on 2 cores) feeding every collective test below."""
    return run_ranks(workers.utilities)


def test_gather_with_grad_concatenates_in_rank_order_and_sums_the_gradient_over_ranks(ranks):
    everything = torch.cat([workers.rank_rows(0), workers.rank_rows(1)])
    for rank, result in enumerate(ranks):
        assert torch.equal(result["gathered"], everything)
        # every rank's loss is the same function of all rows: the backward sums its 2 copies of d/dx_rank,
        # and DDP's average (1/2) then gives exactly the single-process gradient
        expected = 2 * 2 * workers.rank_rows(rank) * torch.tensor([1.0, 3.0])
        torch.testing.assert_close(result["grad"], expected)


def test_any_rank_ors_every_flag_over_ranks_and_leaves_the_input_alone(ranks):
    for result in ranks:
        assert result["agreed"].tolist() == [1.0, 1.0, 0.0]
        assert result["mine"].sum() == 1  # not reduced in place
        assert result["one_said_yes"] is True and result["none_said_yes"] is False


def test_torch_syncbatchnorm_still_refuses_cpu_tensors(ranks):
    """Why CPU runs keep per-process BatchNorm (and the DDP test avoids BatchNorm): if this starts failing,
    torch syncs BatchNorm on gloo, and sync_bn's CPU rule and tests/engine/test_ddp.py should change."""
    assert all("expected input tensor to be on GPU" in result["cpu_syncbn"] for result in ranks)


def test_ddp_all_reduces_inside_no_sync_after_a_skipped_backward(ranks):
    """What the guard relies on (engine/step.py): a rank that skips the backward of a synced forward leaves
    DDP's reducer expecting one, so its next no_sync backward all-reduces after all. Hence every rank runs
    every backward, and only the optimizer step is skipped."""
    assert all(result["reductions_after_a_skipped_backward"] == 1 for result in ranks)


def pretrainer(objective: str = "simsiam") -> CASSPretrainer:
    model = CASS("test_resnet", "test_vit", embed_dim=16, head="mlp", proj_hidden_dim=32, img_size=32,
                 vit_patch_size=8)
    return CASSPretrainer(model, build_objective(objective, embed_dim=16))


def test_sync_bn_converts_every_batchnorm_of_the_pretrainer_on_several_cuda_processes():
    model = pretrainer()
    before = batchnorm_modules(model)
    # CNN, both projector heads and both SimSiam predictors hold BatchNorm; the ViT holds none
    assert {name.split(".")[1] for name in before} == {"cnn", "cnn_head", "vit_head", "predictor_cnn", "predictor_vit"}
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())

    converted, why = sync_batchnorm(model, "auto", num_processes=2, device=torch.device("cuda"))
    syncs = [n for n, m in converted.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert syncs == before and "synced across 2 processes" in why
    assert not [n for n, m in converted.named_modules()
                if type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)]
    # parameters are reused (an optimizer built before stays valid) and checkpoints/exports keep their keys
    assert all(p is params[name] for name, p in converted.named_parameters())
    assert list(converted.state_dict()) == keys
    assert sync_batchnorm(pretrainer(), True, num_processes=8, device=torch.device("cuda"))[1].startswith("sync_bn:")


@pytest.mark.parametrize("mode, processes, device, reason", [
    ("auto", 2, "cpu", "sync_bn auto: not on cpu"),  # the default on a CPU cluster: per-process statistics
    ("auto", 1, "cuda", "one process"),
    (False, 8, "cuda", "sync_bn off"),
    (True, 1, "cpu", "one process"),
])
def test_sync_bn_leaves_the_model_alone_where_it_cannot_or_need_not_sync(mode, processes, device, reason):
    model = pretrainer()
    same, why = sync_batchnorm(model, mode, num_processes=processes, device=torch.device(device))
    assert same is model and reason in why
    assert not [n for n, m in same.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]


def test_sync_bn_true_refuses_several_cpu_processes_and_unknown_modes():
    with pytest.raises(SyncBatchNormError, match="model.sync_bn: true needs CUDA"):
        sync_batchnorm(pretrainer(), True, num_processes=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="model.sync_bn"):
        sync_batchnorm(pretrainer(), "sometimes", num_processes=2, device=torch.device("cuda"))
