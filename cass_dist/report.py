"""``cass-report RUN_DIR... [--out FILE] [--mean]``: a markdown table from the runs' ``metrics.json``.

Each fine-tuning or evaluation run dir holds a ``metrics.json`` (see engine/finetune.py and
engine/probe.py). One row per run, or with ``--mean`` one row per (dataset, method, init, branch,
label fraction) with the mean +- standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cass_dist.errors import CassError

METRICS_FILE = "metrics.json"
COLUMNS = ("dataset", "method", "init", "branch", "label fraction", "F1 (macro)", "AUROC", "accuracy")
GROUP_KEYS = ("dataset", "method", "init", "branch", "label fraction")
SCORES = {"F1 (macro)": "f1_macro", "AUROC": "auroc_macro", "accuracy": "accuracy"}


class ReportError(CassError, ValueError):
    """A run dir has no readable metrics.json, or it lacks a field the table needs."""


def load_result(path: str | os.PathLike) -> dict:
    """Return the parsed metrics.json of a run dir (or the file itself); raise ReportError when unusable.

    The file must be a JSON object whose ``split`` names a mapping of that split's scores.
    """
    path = Path(path)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ReportError(f"{path}: no {METRICS_FILE} (is it a finished fine-tuning or evaluation run?)")
    try:
        result = json.loads(file.read_text())
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise ReportError(f"{file}: not readable JSON ({exc})") from exc
    if not isinstance(result, dict):
        raise ReportError(f"{file}: expected a JSON object, got {type(result).__name__}")
    split = result.get("split")
    if not isinstance(split, str) or not isinstance(result.get(split), dict):
        raise ReportError(f"{file}: expected a 'split' field naming the scored split's metrics")
    result_row(result, origin=str(file))  # every field the table reads is checked here, with the file's name
    return result


def result_row(result: dict, origin: str = METRICS_FILE) -> dict:
    """Return one table row (column name -> value; scores as floats, NaN when undefined).

    Raises ReportError naming ``origin`` and the field when a score or the label fraction is not a number.
    """
    scores = result[result["split"]]
    init = str(result.get("init", ""))
    return {
        "dataset": str(result.get("dataset", "")),
        "method": str(result.get("kind", "")),
        "init": init if init in ("random", "imagenet") else Path(init).name or init,
        "branch": str(result.get("branch", "")),
        "label fraction": _float(result.get("label_fraction", 1.0), origin, "label_fraction"),
        **{col: _float(scores.get(key), origin, f"{result['split']}.{key}") for col, key in SCORES.items()},
    }


def aggregate_rows(rows: Sequence[dict]) -> list[dict]:
    """Group rows that differ only in seed; return rows whose scores are (mean, std, n) tuples."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    out = []
    for members in groups.values():
        row = {k: members[0][k] for k in GROUP_KEYS}
        for col in SCORES:
            values = np.array([m[col] for m in members if not math.isnan(m[col])])
            row[col] = (float(values.mean()) if len(values) else math.nan,
                        float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values))
        out.append(row)
    return out


def markdown_table(rows: Sequence[dict]) -> str:
    """Return the rows as a GitHub markdown table (scores in %, one decimal)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[col]) if col in SCORES else _plain(row[col]) for col in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, tuple):
        mean, std, n = value
        return "n/a" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f} (n={n})"
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _plain(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _float(value, origin: str, name: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{origin}: {name} must be a number or null, got {value!r}")
    return float(value)


def build_report(paths: Sequence[str | os.PathLike], *, mean: bool = False) -> str:
    """Return the markdown table for the runs at ``paths``; raise ReportError for an unusable run."""
    rows = [result_row(load_result(p), origin=str(p)) for p in paths]
    rows.sort(key=lambda r: tuple(str(r[k]) for k in GROUP_KEYS))
    return markdown_table(aggregate_rows(rows) if mean else rows)


def build_parser() -> argparse.ArgumentParser:
    """Return the cass-report argument parser (each option's help states its default)."""
    parser = argparse.ArgumentParser(prog="cass-report", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run dirs (or metrics.json files) of finished fine-tuning or "
                        "evaluation runs")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file (atomically)")
    parser.add_argument("--mean", action="store_true", help="one row per configuration: mean ± std over seeds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: print the table (and write it with --out); return the exit code (1: an unusable run)."""
    args = build_parser().parse_args(argv)
    try:
        table = build_report(args.runs, mean=args.mean)
        if args.out:
            out = Path(args.out)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            try:
                tmp.write_text(table)
                os.replace(tmp, out)
            except OSError as exc:
                raise ReportError(f"--out {out}: cannot write the table ({exc})") from exc
    except CassError as exc:
        print(f"cass-report: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
