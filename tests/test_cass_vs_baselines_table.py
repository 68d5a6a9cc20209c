"""The CASS-vs-baselines tables pick each seed's lr on val, pair seeds for differences, and scale time budgets."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tables(load_benchmark):
    return load_benchmark("cass_vs_baselines_tables")


def run(val_f1: float, test_f1: float, *, val_auroc: float = 0.5, test_auroc: float = 0.5) -> dict:
    metrics = {"accuracy": 0.0, "balanced_accuracy": 0.0}
    return {"val": {**metrics, "f1_macro": val_f1, "auroc_macro": val_auroc},
            "test": {**metrics, "f1_macro": test_f1, "auroc_macro": test_auroc}}


def grid(results: dict, budget: str, contender: str, branch: str, seed: int, runs: dict) -> None:
    for lr, value in runs.items():
        results[f"finetune/{budget}/{contender}/{branch}/f0.1/seed{seed}/lr{lr:g}"] = value


def test_each_seed_picks_its_lr_on_val_f1_then_auroc_never_on_test(tables):
    results: dict = {}
    grid(results, "steps", "cass", "cnn", 0, {1e-3: run(0.9, 0.70), 3e-3: run(0.8, 0.99)})
    grid(results, "steps", "cass", "cnn", 1, {1e-3: run(0.7, 0.99, val_auroc=0.6), 3e-3: run(0.7, 0.80, val_auroc=0.9)})
    grid(results, "steps", "cass", "cnn", 2, {1e-3: run(0.99, 0.99)})  # the grid is not complete: no pick
    lrs = [1e-3, 3e-3]
    assert tables.finetune_choice(results, "steps", "cass", "cnn", 0.1, 0, lrs)[0] == "lr0.001"
    assert tables.finetune_choice(results, "steps", "cass", "cnn", 0.1, 1, lrs)[0] == "lr0.003"  # tie on F1: AUROC
    assert tables.finetune_choice(results, "steps", "cass", "cnn", 0.1, 2, lrs) is None
    text = tables.finetune_table(results, "steps", [0, 1, 2], ["cass"], [0.1], lrs)
    row = next(line for line in text.splitlines() if line.startswith("| CASS (defaults) | cnn"))
    assert "| 75.0 ± 7.1 |" in row and "lr0.001/lr0.003" in row  # test F1 of the picked runs: 0.70 and 0.80


def test_paired_differences_are_per_seed_on_the_same_branch_and_supervised_ignores_the_budget(tables):
    results: dict = {}
    for seed, (cass, dino, supervised) in enumerate([(0.80, 0.70, 0.75), (0.60, 0.65, 0.50)]):
        grid(results, "steps", "cass", "vit", seed, {1e-3: run(0.5, cass)})  # CASS's time is its steps budget
        grid(results, "time", "dino-vit", "vit", seed, {1e-3: run(0.5, dino)})
        grid(results, "-", "supervised", "vit", seed, {1e-3: run(0.5, supervised)})
    text = tables.paired_table(results, "time", [0, 1], ["cass", "dino-vit"], [0.1], [1e-3])
    dino_row = next(line for line in text.splitlines() if line.startswith("| DINO-ViT | vit"))
    # differences +10 and -5 points: mean +2.5, std 10.6, CASS wins one seed of two
    assert "+2.5 ± 10.6 (1/2)" in dino_row
    supervised_row = next(line for line in text.splitlines() if line.startswith("| supervised (random init) | vit"))
    assert "+7.5 ± 3.5 (2/2)" in supervised_row
    assert not any(line.startswith("| DINO-CNN") for line in text.splitlines())  # no runs, no row


def test_equal_wall_clock_gives_each_method_the_seconds_cass_took(tables):
    assert tables.equal_time_steps(600, 1.0, 2.5) == 240
    assert tables.equal_time_steps(600, 1.0, 0.5) == 1200
    assert tables.equal_time_steps(10, 0.01, 100.0) == 1  # always at least one step
    results = {f"pretrain/steps/{c}/seed{s}": {"steps": 600, "seconds_per_step": sps, "seconds_per_epoch": spe,
                                               "collapse_warnings": 0}
               for s in (0, 1) for c, sps, spe in (("cass", 1.0, 30.0 + s), ("dino-vit", 3.0, 100.0))}
    text = tables.cost_table(results, [0, 1], ["cass", "dino-vit"])
    cass_row = next(line for line in text.splitlines() if line.startswith("| CASS (defaults)"))
    assert "| 0.30 ± 0.01 |" in cass_row  # per seed: 30/100 and 31/100 of DINO-ViT's time per epoch


def test_time_ratios_pair_only_runs_timed_on_one_machine(tables):
    """A results file extended on another machine (docs/results/ copied) holds times that no ratio may mix."""
    def timed(spe: float, where: str) -> dict:
        return {"steps": 600, "seconds_per_step": spe / 10, "seconds_per_epoch": spe, "collapse_warnings": 0,
                "machine": where}

    results = {"pretrain/steps/dino-vit/seed0": timed(100.0, "xeon"),
               "pretrain/steps/dino-vit/seed1": timed(100.0, "xeon"),
               "pretrain/steps/cass/seed0": timed(30.0, "xeon"), "pretrain/steps/cass/seed1": timed(90.0, "epyc"),
               "pretrain/steps/cass-paper/seed0": timed(50.0, "epyc")}
    text = tables.cost_table(results, [0, 1], ["cass", "cass-paper"])
    rows = {line.split(" | ")[0]: line for line in text.splitlines()}
    assert "| 0.30 ± 0.00 |" in rows["| CASS (defaults)"]  # seed 0 only: seed 1 ran elsewhere than DINO-ViT
    assert rows["| CASS (defaults)"].endswith("| 2 | epyc; xeon |")
    assert rows["| CASS (paper objective)"].split(" | ")[3] == "-"  # no DINO-ViT run on its machine
    assert tables.machine_of({"seconds_per_step": 1.0}) == "unrecorded"


def test_the_equal_steps_tables_name_the_steps_the_pretrainings_ran(tables):
    results = {f"pretrain/steps/{c}/seed0": {"steps": 300, "seconds_per_step": 1.0, "seconds_per_epoch": 10.0,
                                             "collapse_warnings": 0} for c in ("cass", "dino-vit")}
    text = tables.all_tables(results, dataset="brain_mri", seeds=[0], budgets=["steps", "time"],
                             contenders=["cass", "dino-vit"], fractions=[0.1], lrs=[1e-3])
    assert "### equal steps (300): probes on frozen features" in text
    assert "### equal wall-clock: probes on frozen features" in text
