"""cass-report on good, damaged and odd metrics files: a table, or one line naming the file and field."""

from __future__ import annotations

import json

import pytest

from cass_dist.report import main


def write(path, data):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


GOOD = {"kind": "knn", "dataset": "breastmnist", "init": "random", "branch": "cnn", "label_fraction": 1.0,
        "seed": 0, "split": "test", "test": {"f1_macro": 0.5, "auroc_macro": None, "accuracy": 0.75}}


def test_a_good_run_makes_a_row(tmp_path, capsys):
    assert main([write(tmp_path / "a", GOOD)]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert "| knn |" in row and "| 50.0 | n/a | 75.0 |" in row


@pytest.mark.parametrize("content, named", [
    ('{"split": "test", "test": {', "not readable JSON"),
    (b"\xff\xfe\x00", "not readable JSON"),
    ("[1, 2, 3]", "expected a JSON object, got list"),
    ({"split": ["test"], "test": {}}, "expected a 'split' field"),
    ({**GOOD, "test": [0.5]}, "expected a 'split' field"),
    ({**GOOD, "test": {"f1_macro": "high"}}, "test.f1_macro must be a number or null, got 'high'"),
    ({**GOOD, "label_fraction": "all"}, "label_fraction must be a number or null"),
])
def test_damaged_or_odd_metrics_give_one_line_and_exit_1(tmp_path, capsys, content, named):
    run = tmp_path / "run"
    run.mkdir()
    if isinstance(content, bytes):
        (run / "metrics.json").write_bytes(content)
    else:
        write(run, content)
    assert main([write(tmp_path / "good", GOOD), str(run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cass-report: error: ") and named in err
    assert str(run / "metrics.json") in err


def test_missing_runs_and_unwritable_out_are_named(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 1
    assert "no metrics.json" in capsys.readouterr().err
    assert main([write(tmp_path / "a", GOOD), "--out", str(tmp_path / "no" / "such" / "t.md")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "t.md" in err
