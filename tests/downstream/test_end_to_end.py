"""One tiny end-to-end run on the synthetic set: pretrain -> kNN -> fine-tune -> evaluate -> report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def launcher(name: str):
    """Import ``launch/<name>.py`` (not a package) and return its ``main``."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_pretrain_knn_finetune_report(syn_shards, binary_shards, tmp_path, capsys):
    pretrain_dir, knn_dir, ft_dir, head_dir = (tmp_path / n for n in ("pretrain", "knn", "finetune", "head"))
    common = ["--data", str(syn_shards), "--precision", "fp32"]
    assert launcher("pretrain")(["--preset", "demo", *common, "--max-steps", "2", "--batch-size", "16",
                                 "--save-every", "0", "--knn-every", "0", "--log-every", "1",
                                 "--output-dir", str(pretrain_dir)]) == 0
    assert (pretrain_dir / "export/model.json").is_file()

    evaluate, finetune = launcher("evaluate"), launcher("finetune")
    assert evaluate([*common, "--init", str(pretrain_dir), "--probe", "knn", "--branch", "both",
                     "--output-dir", str(knn_dir)]) == 0
    assert finetune([*common, "--init", str(pretrain_dir), "--branch", "vit", "--label-fraction", "0.5",
                     "--max-steps", "2", "--batch-size", "16", "--output-dir", str(ft_dir)]) == 0
    assert evaluate([*common, "--init", str(ft_dir), "--probe", "head", "--output-dir", str(head_dir)]) == 0

    knn = json.loads((knn_dir / "metrics.json").read_text())
    tuned = json.loads((ft_dir / "metrics.json").read_text())
    head = json.loads((head_dir / "metrics.json").read_text())
    assert knn["test"]["num_samples"] == tuned["test"]["num_samples"] == 48
    assert tuned["label_fraction"] == 0.5 and tuned["branch"] == "vit"
    # Re-evaluating the saved best classifier reproduces the fine-tuning run's own test metrics.
    assert head["test"]["confusion_matrix"] == tuned["test"]["confusion_matrix"]
    for name in ("f1_macro", "accuracy", "auroc_macro"):
        assert head["test"][name] == pytest.approx(tuned["test"][name])

    # The fine-tuned head refuses a dataset with other classes, with a message naming them.
    capsys.readouterr()
    assert evaluate(["--data", str(binary_shards), "--init", str(ft_dir), "--probe", "head",
                     "--output-dir", str(tmp_path / "wrong")]) == 1
    assert "pattern_2" in capsys.readouterr().err

    from cass_dist.report import main as report

    out = tmp_path / "report.md"
    assert report([str(knn_dir), str(ft_dir), str(head_dir), "--out", str(out)]) == 0
    table = out.read_text().splitlines()
    assert len(table) == 5 and table == capsys.readouterr().out.splitlines()
    assert {row.split("|")[2].strip() for row in table[2:]} == {"knn", "finetune", "head"}
    assert f"{100 * tuned['test']['f1_macro']:.1f}" in next(r for r in table if "| finetune |" in r)
