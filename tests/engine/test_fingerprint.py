"""The fingerprint a checkpoint records, and the comparison a resume makes with it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cass_dist.configs.base import ConfigError
from cass_dist.configs.finetune import parse_finetune_config
from cass_dist.configs.pretrain import parse_pretrain_config
from cass_dist.engine.fingerprint import (
    DATA_DIGEST,
    GLOBAL_BATCH,
    ResumeMismatchError,
    check_resume,
    config_changes,
    finetune_fingerprint,
    flatten,
    parse_force,
    pretrain_fingerprint,
)


class FakeManifest:
    def __init__(self, digest="d0"):
        self._digest = digest

    def digest(self):
        return self._digest


def pre(*argv, world=1, digest="d0"):
    cfg = parse_pretrain_config(["--preset", "demo", "--data", "shards", *argv])
    # Through JSON, as train_state.json stores it: what is compared on resume is what was read back.
    return json.loads(json.dumps(pretrain_fingerprint(cfg, FakeManifest(digest), world)))


def test_same_global_batch_on_another_number_of_processes_is_the_same_run():
    eight_by_16 = pre("--batch-size", "16", world=8)
    four_by_32 = pre("--batch-size", "32", world=4)
    two_by_16_accum_4 = pre("--batch-size", "16", "--grad-accum-steps", "4", world=2)
    assert eight_by_16 == four_by_32 == two_by_16_accum_4
    assert eight_by_16[GLOBAL_BATCH] == 128
    assert check_resume(eight_by_16, four_by_32) == []


@pytest.mark.parametrize("argv, digest, name, old, new", [
    (["--batch-size", "32"], "d0", GLOBAL_BATCH, 64, 32),
    ([], "d1", DATA_DIGEST, "d0", "d1"),  # another --data (the manifest differs)
    (["--optim.optimizer", "adam"], "d0", "optim.optimizer", "adamw", "adam"),
    (["--cnn", "resnet34"], "d0", "model.cnn", "resnet18", "resnet34"),
    (["--objective", "paper"], "d0", "objective.name", "vicreg", "paper"),
    (["--image-size", "64"], "d0", "data.image_size", 32, 64),
    (["--views", "1"], "d0", "data.views", 2, 1),
    (["--data.train_split", "val"], "d0", "data.train_split", "train", "val"),
    (["--seed", "1"], "d0", "run.seed", 0, 1),  # the seed decides which samples a saved position covers
    (["--objective.kwargs", "{var_weight: 2.0}"], "d0", "objective.kwargs", {}, {"var_weight": 2.0}),
])
def test_a_change_that_alters_what_the_position_means_is_refused(argv, digest, name, old, new):
    saved = pre()
    with pytest.raises(ResumeMismatchError) as info:
        check_resume(saved, pre(*argv, digest=digest), origin="ckpt")
    message = str(info.value)
    assert f"{name} {old!r} -> {new!r}" in message and "--resume-force " + name in message
    assert info.value.exit_code == 2 and "\n" not in message
    # Named in --resume-force, the same change is accepted and reported.
    notes = check_resume(saved, pre(*argv, digest=digest), force=parse_force(f" {name} ,"))
    assert notes == [f"resume: {name} {old!r} -> {new!r} (accepted by --resume-force)"]


def test_every_differing_field_is_named_at_once():
    with pytest.raises(ResumeMismatchError) as info:
        check_resume(pre(), pre("--batch-size", "8", "--optim.optimizer", "adam"), batch_note="8 x 1 x 1")
    assert "global_batch 64 -> 8 (8 x 1 x 1)" in str(info.value)
    assert "optim.optimizer 'adamw' -> 'adam'" in str(info.value)
    assert "--resume-force global_batch,optim.optimizer" in str(info.value)


def test_schedule_changes_are_not_part_of_the_fingerprint_and_are_listed():
    a = parse_pretrain_config(["--preset", "demo", "--data", "shards"])
    b = parse_pretrain_config(["--preset", "demo", "--data", "moved/shards", "--max-steps", "500", "--lr-cnn",
                               "0.01", "--save-every", "7", "--log-every", "3", "--num-workers", "4",
                               "--resume", "auto"])
    assert pre() == json.loads(json.dumps(pretrain_fingerprint(b, FakeManifest("d0"), 1)))
    changes = config_changes(flatten(dataclasses.asdict(a)), flatten(dataclasses.asdict(b)))
    assert changes == ["data.num_workers 'auto' -> 4", "data.shards 'shards' -> 'moved/shards'",
                       "optim.lr_cnn 0.001 -> 0.01", "run.log_every 10 -> 3", "run.max_steps 80 -> 500",
                       "run.save_every 40 -> 7"]  # run.resume is how to start, not a change


def test_unknown_force_names_are_refused_and_old_checkpoints_pass_with_a_note():
    with pytest.raises(ConfigError, match=r"run.resume_force: \['global_bacth'\] are not fingerprint fields"):
        check_resume(pre(), pre(), force={"global_bacth"})
    assert "has no fingerprint" in check_resume({}, pre())[0]
    # A field fingerprinted only since a later version cannot be compared: noted, not refused.
    older = {k: v for k, v in pre().items() if k != "data.views"}
    assert check_resume(older, pre()) == ["resume: data.views is not recorded on both sides (another cass-dist "
                                          "version): not checked"]


def test_finetune_fingerprint_covers_init_labels_and_objective():
    def ft(*argv):
        return finetune_fingerprint(parse_finetune_config(["--data", "s", *argv]), FakeManifest(), 1)

    base = ft()
    assert base[GLOBAL_BATCH] == 32 and base["model.init"] == "random"
    for argv, name in ((["--label-fraction", "0.5"], "data.label_fraction"), (["--init", "runs/x"], "model.init"),
                       (["--loss", "focal"], "loss.name"), (["--branch", "vit"], "model.branch"),
                       (["--metric", "accuracy"], "early_stop.metric"), (["--batch-size", "8"], GLOBAL_BATCH)):
        with pytest.raises(ResumeMismatchError, match=name):
            check_resume(base, ft(*argv))
    assert check_resume(base, ft("--lr", "0.1", "--max-steps", "9", "--patience", "2")) == []


def test_the_method_is_fingerprinted_and_a_dino_run_its_dino_section_field_by_field():
    cass = pre()
    assert cass["method"] == "cass" and not any(k.startswith("dino.") for k in cass)  # CASS ignores dino.*
    assert check_resume(cass, pre("--dino.out_dim", "128")) == []
    dino = pre("--method", "dino")
    assert dino["dino.out_dim"] == parse_pretrain_config(["--data", "s"]).dino.out_dim
    with pytest.raises(ResumeMismatchError, match="method 'cass' -> 'dino'"):
        check_resume(cass, dino)
    with pytest.raises(ResumeMismatchError, match="dino.out_dim"):
        check_resume(dino, pre("--method", "dino", "--dino.out_dim", "128"))
