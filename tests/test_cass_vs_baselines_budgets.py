"""CASS (defaults) sets the equal wall-clock budget, so the study probes and fine-tunes it once: its
equal-time results are its equal-steps ones, in the study and in the tables alike."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("cass_vs_baselines")


def scored(f1: float) -> dict:
    metrics = {"accuracy": f1, "f1_macro": f1, "auroc_macro": f1, "balanced_accuracy": f1}
    return {"val": metrics, "test": metrics}


def test_cass_at_equal_time_reuses_its_equal_steps_runs_and_dino_does_not(study, tmp_path):
    (tmp_path / "breastmnist").mkdir()
    done = {"finetune/steps/cass/cnn/f0.1/seed0/lr0.001": scored(0.7),
            "probe/steps/cass/seed0": {"cnn": {}, "vit": {}}}
    (tmp_path / "breastmnist" / "results.json").write_text(json.dumps(done))
    s = study.Study(study.parse_args(["--work", str(tmp_path)]), "breastmnist")
    pretrained = []

    def pretrain(contender, budget, seed):  # stands in for a pretraining run: records it, then stops the caller
        pretrained.append((contender, budget))
        raise RuntimeError("would pretrain")

    s.pretrain = pretrain

    s.finetune_run("cass", "time", "cnn", 0.1, 0, 1e-3)  # found under "steps": nothing runs
    s.probes("cass", "time", 0)
    assert pretrained == []
    with pytest.raises(RuntimeError, match="would pretrain"):  # DINO's equal-time run is its own: it must pretrain
        s.finetune_run("dino-vit", "time", "vit", 0.1, 0, 1e-3)
    assert pretrained == [("dino-vit", "time")]


def test_the_equal_time_tables_pair_cass_steps_runs_with_the_others_time_runs(load_benchmark):
    tables = load_benchmark("cass_vs_baselines_tables")
    results = {"finetune/steps/cass/vit/f0.1/seed0/lr0.001": scored(0.8),
               "finetune/time/dino-vit/vit/f0.1/seed0/lr0.001": scored(0.6),
               "finetune/steps/dino-vit/vit/f0.1/seed0/lr0.001": scored(0.1)}  # the other budget: ignored
    text = tables.paired_table(results, "time", [0], ["cass", "dino-vit"], [0.1], [1e-3])
    row = next(line for line in text.splitlines() if line.startswith("| DINO-ViT | vit"))
    assert "| +20.0 ± 0.0 (1/1) | +20.0 ± 0.0 (1/1) |" in row  # CASS 80 (its only run) minus DINO-ViT at equal time 60
    assert tables.budget_of("cass", "time") == "steps" and tables.budget_of("dino-vit", "time") == "time"
    assert tables.budget_of("supervised", "time") == "-"


def test_a_copied_results_file_adds_work_without_its_runs_and_names_a_missing_export(study, tmp_path):
    """docs/results/ holds results.json alone: its recorded pretrainings still set the equal-time budget,
    and work that needs one of their exports stops with the key and the path, not a finetune traceback."""
    (tmp_path / "breastmnist").mkdir()
    done = {f"pretrain/steps/{c}/seed0": {"steps": 600, "seconds_per_step": sps}
            for c, sps in (("cass", 2.0), ("dino-vit", 3.0))}
    (tmp_path / "breastmnist" / "results.json").write_text(json.dumps(done))
    s = study.Study(study.parse_args(["--work", str(tmp_path)]), "breastmnist")

    assert s.steps_for("dino-vit", "time", 0) == 400  # from the records: no run dir needed
    with pytest.raises(SystemExit, match=r"pretrain/steps/cass/seed0 is recorded .* export .*cass-seed0-600steps"):
        s.finetune_run("cass", "steps", "cnn", 0.01, 0, 1e-3)


def test_a_study_recorded_at_other_steps_stops_instead_of_passing_for_these(study, tmp_path):
    """The keys hold no step count: probing a 300-step run under --steps 600 would report it as 600."""
    (tmp_path / "brain_mri").mkdir()
    done = {"pretrain/steps/cass/seed0": {"steps": 300, "seconds_per_step": 13.0}}
    (tmp_path / "brain_mri" / "results.json").write_text(json.dumps(done))

    s = study.Study(study.parse_args(["--work", str(tmp_path)]), "brain_mri")
    with pytest.raises(SystemExit, match=r"pretrain/steps/cass/seed0 .* ran 300 steps, not --steps 600: pass --steps 300"):
        s.probes("cass", "steps", 0)
    s = study.Study(study.parse_args(["--work", str(tmp_path), "--steps", "300"]), "brain_mri")
    with pytest.raises(SystemExit, match=r"export .*cass-seed0-300steps"):  # the same steps: on to its export
        s.probes("cass", "steps", 0)
