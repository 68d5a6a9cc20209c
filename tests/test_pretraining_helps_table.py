"""The benchmark's table picks each seed's fine-tuning setting (lr, layer decay) on val, never on test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("pretraining_helps")


def scores(value: float) -> dict:
    return {"accuracy": value, "f1_macro": value, "auroc_macro": value, "balanced_accuracy": value}


def run(val_f1: float, test_acc: float) -> dict:
    metrics = scores(test_acc)
    return {"val": {**metrics, "f1_macro": val_f1, "auroc_macro": 0.5}, "test": metrics, "best_step": 1, "steps": 2}


def test_setting_is_chosen_per_seed_on_val_f1(bench):
    results = {  # the setting with the best test score is never the one val picks
        "finetune/cass/cnn/seed0/lr0.001": run(val_f1=0.9, test_acc=0.80),
        "finetune/cass/cnn/seed0/lr0.003": run(val_f1=0.8, test_acc=0.99),
        "finetune/cass/cnn/seed0/lr0.003-ld0.75": run(val_f1=0.6, test_acc=0.99),
        "finetune/cass/cnn/seed1/lr0.001": run(val_f1=0.7, test_acc=0.99),
        "finetune/cass/cnn/seed1/lr0.003": run(val_f1=0.8, test_acc=0.99),
        "finetune/cass/cnn/seed1/lr0.003-ld0.75": run(val_f1=0.85, test_acc=0.90),
    }
    settings = [bench._setting_name(1e-3, 1.0), bench._setting_name(3e-3, 1.0), bench._setting_name(3e-3, 0.75)]
    assert settings == ["lr0.001", "lr0.003", "lr0.003-ld0.75"]  # layer decay 1 keeps the plain name
    lines = bench.table(results, [0, 1], 0.1, settings, ["cnn"]).splitlines()
    chosen = [line for line in lines if "chosen on val" in line]
    assert len(chosen) == 1
    assert "(lr0.001, lr0.003-ld0.75)" in chosen[0]
    assert "| 85.0 ± 7.1 |" in chosen[0]  # test accuracy of the picked runs: 0.80 and 0.90
    per_setting = [line for line in lines if line.startswith("| CASS (default objective) | cnn | lr")]
    assert [line.split(" | ")[3] for line in per_setting] == ["89.5 ± 13.4", "99.0 ± 0.0", "94.5 ± 6.4"]


def test_settings_cross_lrs_with_layer_decays(bench):
    args = bench.parse_args(["--ft-lrs", "1e-3", "3e-3", "--ft-layer-decays", "1", "0.75"])
    assert bench._settings(args) == [(1e-3, 1.0), (3e-3, 1.0), (1e-3, 0.75), (3e-3, 0.75)]


def probes(cnn_knn: float, vit_knn: float) -> dict:
    return {"cnn": {"knn": scores(cnn_knn), "linear": scores(0.5)}, "vit": {"knn": scores(vit_knn), "linear": scores(0.5)}}


def test_paired_differences_pair_seeds_and_use_the_setting_val_picks(bench):
    settings = ["lr0.001", "lr0.003"]
    results = {
        "probe/cass/seed0": probes(0.85, 0.90), "probe/random/seed0": probes(0.80, 0.70),
        "probe/cass/seed1": probes(0.80, 0.90), "probe/random/seed1": probes(0.82, 0.70),
        "probe/cass/seed2": probes(0.99, 0.99),  # no random init at seed 2: not paired
        # per seed, val picks one lr; the other has the better test score
        "finetune/cass/cnn/seed0/lr0.001": run(val_f1=0.9, test_acc=0.80),
        "finetune/cass/cnn/seed0/lr0.003": run(val_f1=0.8, test_acc=0.99),
        "finetune/cass/cnn/seed1/lr0.001": run(val_f1=0.7, test_acc=0.99),
        "finetune/cass/cnn/seed1/lr0.003": run(val_f1=0.8, test_acc=0.90),
        "finetune/random/cnn/seed0/lr0.001": run(val_f1=0.5, test_acc=0.99),
        "finetune/random/cnn/seed0/lr0.003": run(val_f1=0.6, test_acc=0.75),
        "finetune/random/cnn/seed1/lr0.001": run(val_f1=0.9, test_acc=0.95),
        "finetune/random/cnn/seed1/lr0.003": run(val_f1=0.1, test_acc=0.10),
        "finetune/random/cnn/seed2/lr0.001": run(val_f1=0.9, test_acc=0.10),  # grid incomplete: not chosen
    }
    lines = bench.table(results, [0, 1, 2], 0.1, settings, ["cnn", "vit"]).splitlines()
    cnn = next(line for line in lines if line.startswith("| CASS (default objective) minus random init | cnn | "))
    vit = next(line for line in lines if line.startswith("| CASS (default objective) minus random init | vit | "))
    # kNN: +5 and -2 points; linear: level; fine-tuned (acc, F1, AUROC): 0.80 - 0.75 and 0.90 - 0.95
    assert cnn.split(" | ")[2:] == ["+1.5 ± 4.9 (1/2)", "+0.0 ± 0.0 (0/2)"] + ["+0.0 ± 7.1 (1/2)"] * 2 + ["+0.0 ± 7.1 (1/2) |"]
    assert vit.split(" | ")[2:4] == ["+20.0 ± 0.0 (2/2)", "+0.0 ± 0.0 (0/2)"]
    assert vit.endswith("| - | - | - |")  # no ViT fine-tuning recorded
    assert not any(line.startswith("| CASS (paper objective) minus") for line in lines)  # nothing recorded for it
