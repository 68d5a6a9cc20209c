"""The tables of benchmarks/cass_vs_baselines.py: pure functions of its results.json (no torch, testable alone).

Keys of the results (``budget`` is "steps" or "time"; "-" for what no pretraining budget changes;
CASS (defaults) probes and fine-tunes once, under "steps": see ``budget_of``):

    pixels                                                  raw-pixel probes
    pretrain/<budget>/<contender>/seed<s>                   steps, machine, seconds_per_step, seconds_per_epoch, ...
    time/<machine>/<contender>/seed<s>                      steps, machine, seconds_per_step, ... (--stages time)
    probe/<budget>/<contender>/seed<s>                      {branch: {knn: {...}, linear: {...}}}
    finetune/<budget>/<contender>/<branch>/f<fraction>/seed<s>/lr<lr>   {val: {...}, test: {...}, ...}
"""

from __future__ import annotations

import math
import statistics

PRETRAINED = {"cass": ("cnn", "vit"), "cass-paper": ("cnn", "vit"), "dino-vit": ("vit",), "dino-cnn": ("cnn",)}
CONTENDERS = {**PRETRAINED, "supervised": ("cnn", "vit")}  # supervised: fine-tuned from random init
LABELS = {"cass": "CASS (defaults)", "cass-paper": "CASS (paper objective)", "dino-vit": "DINO-ViT",
          "dino-cnn": "DINO-CNN", "supervised": "supervised (random init)"}


def equal_time_steps(steps: int, cass_seconds_per_step: float, seconds_per_step: float) -> int:
    """Return the steps a method gets in the wall-clock CASS-defaults needs for ``steps`` steps."""
    return max(1, round(steps * cass_seconds_per_step / seconds_per_step))


def machine_of(record: dict) -> str:
    """Return the machine a pretraining record was timed on ("unrecorded" for records before it was kept)."""
    return record.get("machine") or "unrecorded"


def same_machine(a: dict, b: dict) -> bool:
    """Whether two pretraining records were timed on one machine, so a ratio of their times means something.

    Records without a machine (results files before 2026-12-06's evening) are taken as one machine:
    each of those files was measured on one.
    """
    return machine_of(a) == machine_of(b)


def budget_of(contender: str, budget: str) -> str:
    """Return the budget a contender's probes and fine-tunes are stored under.

    Supervised training has no pretraining budget ("-"). CASS (defaults) sets the equal wall-clock
    budget, so its equal-time run is its equal-steps run: one set of probes and fine-tunes serves both.
    """
    if contender == "supervised":
        return "-"
    return "steps" if contender == "cass" else budget


def chosen_on_val(runs: dict[str, dict]) -> tuple[str, dict] | None:
    """Return ``(setting, run)`` whose validation F1 (then AUROC) is highest, or None when there is none."""
    if not runs:
        return None
    best = max(runs, key=lambda name: (runs[name]["val"]["f1_macro"], runs[name]["val"]["auroc_macro"]))
    return best, runs[best]


def finetune_choice(results: dict, budget: str, contender: str, branch: str, fraction: float, seed: int,
                    lrs: list[float]) -> tuple[str, dict] | None:
    """Return the lr and run that seed's validation picks, once every lr of the grid is done (else None)."""
    prefix = f"finetune/{budget_of(contender, budget)}/{contender}/{branch}/f{fraction:g}/seed{seed}"
    runs = {f"lr{lr:g}": results[k] for lr in lrs if (k := f"{prefix}/lr{lr:g}") in results}
    return chosen_on_val(runs) if len(runs) == len(lrs) else None


def mean_std(values: list[float], *, scale: float = 100.0, signed: bool = False, digits: int = 1) -> str:
    """Return "mean ± std" of ``values`` times ``scale`` ("-" when empty; std 0 for one value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    sign = "+" if signed else ""
    return f"{scale * statistics.fmean(values):{sign}.{digits}f} ± {scale * std:.{digits}f}"


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    """Return the mean ± std of the per-seed differences a - b (in points) and how many seeds a wins."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "-"
    diffs = [a[s] - b[s] for s in seeds]
    return f"{mean_std(diffs, signed=True)} ({sum(d > 0 for d in diffs)}/{len(seeds)})"


def _runs(results: dict, prefix: str, seeds: list[int]) -> list[dict]:
    return [results[f"{prefix}/seed{s}"] for s in seeds if f"{prefix}/seed{s}" in results]


def cost_table(results: dict, seeds: list[int], contenders: list[str]) -> str:
    """Time per step and epoch of each method; its ratio to DINO-ViT's only for seeds timed on one machine."""
    lines = ["| method | s / step | s / epoch | time / DINO-ViT's | steps at equal time | collapse warnings | seeds "
             "| machine |", "|---|---|---|---|---|---|---|---|"]
    dino = {s: r for s in seeds if (r := results.get(f"pretrain/steps/dino-vit/seed{s}"))}
    for contender in contenders:
        runs = {s: r for s in seeds if (r := results.get(f"pretrain/steps/{contender}/seed{s}"))}
        if not runs:
            continue
        ratio = [runs[s]["seconds_per_epoch"] / dino[s]["seconds_per_epoch"] for s in runs
                 if s in dino and same_machine(runs[s], dino[s])]
        timed = _runs(results, f"pretrain/time/{contender}", seeds)
        cells = [mean_std([r["seconds_per_step"] for r in runs.values()], scale=1, digits=3),
                 mean_std([r["seconds_per_epoch"] for r in runs.values()], scale=1),
                 mean_std(ratio, scale=1, digits=2),
                 mean_std([r["steps"] for r in timed], scale=1, digits=0),
                 str(sum(r["collapse_warnings"] for r in runs.values()))]
        machines = "; ".join(sorted({machine_of(r) for r in runs.values()}))
        lines.append(f"| {LABELS[contender]} | " + " | ".join(cells) + f" | {len(runs)} | {machines} |")
    return "\n".join(lines)


def time_table(results: dict, seeds: list[int], contenders: list[str]) -> str:
    """Seconds per step of each contender timed side by side (``--stages time``), per machine.

    "CASS's time / its" is CASS (defaults)' seconds over the method's, per seed on one machine: the
    paper's "69% less time than DINO" reads 0.31 in a DINO row.
    """
    timed: dict[str, dict[str, dict[int, dict]]] = {}  # machine -> contender -> seed -> record
    for key, record in results.items():
        if key.startswith("time/"):
            *_, contender, seed = key.split("/")
            timed.setdefault(machine_of(record), {}).setdefault(contender, {})[int(seed.removeprefix("seed"))] = record
    lines = ["| machine | method | s / step | s / epoch | CASS's time / its | seeds |", "|---|---|---|---|---|---|"]
    for where, by_contender in sorted(timed.items()):
        cass = by_contender.get("cass", {})
        for contender in dict.fromkeys(["cass", *contenders]):
            runs = {s: r for s, r in by_contender.get(contender, {}).items() if s in seeds}
            if not runs:
                continue
            ratio = [cass[s]["seconds_per_step"] / r["seconds_per_step"] for s, r in runs.items() if s in cass]
            cells = [mean_std([r["seconds_per_step"] for r in runs.values()], scale=1, digits=3),
                     mean_std([r["seconds_per_epoch"] for r in runs.values()], scale=1),
                     mean_std(ratio, scale=1, digits=2)]
            lines.append(f"| {where} | {LABELS[contender]} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def probe_table(results: dict, budget: str, seeds: list[int], contenders: list[str]) -> str:
    lines = ["| features | branch | kNN acc | kNN F1 | linear acc | linear F1 | linear AUROC | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    if "pixels" in results:
        p = results["pixels"]
        cells = [p["knn"]["accuracy"], p["knn"]["f1_macro"], p["linear"]["accuracy"], p["linear"]["f1_macro"],
                 p["linear"]["auroc_macro"]]
        lines.append("| raw pixels | - | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " | - |")
    for contender in ["supervised", *contenders]:
        runs = _runs(results, f"probe/{budget_of(contender, budget)}/{contender}", seeds)
        label = "random init" if contender == "supervised" else LABELS[contender]
        for branch in CONTENDERS[contender] if runs else ():
            cells = [mean_std([r[branch][probe][m] for r in runs]) for probe, m in
                     (("knn", "accuracy"), ("knn", "f1_macro"), ("linear", "accuracy"), ("linear", "f1_macro"),
                      ("linear", "auroc_macro"))]
            lines.append(f"| {label} | {branch} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def finetune_table(results: dict, budget: str, seeds: list[int], contenders: list[str], fractions: list[float],
                   lrs: list[float]) -> str:
    head = " | ".join(f"F1 {f:g} | AUROC {f:g}" for f in fractions)
    lines = [f"| init | branch | {head} | lrs picked on val |", "|---|---|" + "---|---|" * len(fractions) + "---|"]
    for contender in ["supervised", *contenders]:
        for branch in CONTENDERS[contender]:
            cells, picked = [], []
            for fraction in fractions:
                chosen = [c for s in seeds if (c := finetune_choice(results, budget, contender, branch, fraction, s, lrs))]
                cells += [mean_std([r["test"]["f1_macro"] for _, r in chosen]),
                          mean_std([r["test"]["auroc_macro"] for _, r in chosen])]
                picked.append("/".join(lr for lr, _ in chosen) or "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {LABELS[contender]} | {branch} | " + " | ".join(cells) + f" | {'; '.join(picked)} |")
    return "\n".join(lines)


def paired_table(results: dict, budget: str, seeds: list[int], contenders: list[str], fractions: list[float],
                 lrs: list[float]) -> str:
    """CASS (defaults) minus each other contender, per seed, on the same branch: points (seeds CASS wins)."""
    head = " | ".join(f"ΔF1 {f:g} | ΔAUROC {f:g}" for f in fractions)
    lines = [f"| CASS minus | branch | Δ kNN F1 | Δ linear F1 | {head} |",
             "|---|---|---|---|" + "---|---|" * len(fractions)]

    def probe_scores(contender, branch, probe):
        prefix = f"probe/{budget_of(contender, budget)}/{contender}"
        return {s: results[f"{prefix}/seed{s}"][branch][probe]["f1_macro"] for s in seeds
                if f"{prefix}/seed{s}" in results}

    def finetune_scores(contender, branch, fraction, metric):
        return {s: c[1]["test"][metric] for s in seeds
                if (c := finetune_choice(results, budget, contender, branch, fraction, s, lrs))}

    for other in [c for c in [*contenders, "supervised"] if c != "cass"]:
        for branch in CONTENDERS[other]:
            cells = [paired(probe_scores("cass", branch, p), probe_scores(other, branch, p)) for p in ("knn", "linear")]
            for fraction in fractions:
                cells += [paired(finetune_scores("cass", branch, fraction, m), finetune_scores(other, branch, fraction, m))
                          for m in ("f1_macro", "auroc_macro")]
            if any(c != "-" for c in cells):
                lines.append(f"| {LABELS[other]} | {branch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_tables(results: dict, *, dataset: str, seeds: list[int], budgets: list[str], contenders: list[str],
               fractions: list[float], lrs: list[float]) -> str:
    """Return every table of one dataset as markdown: cost, then probes, fine-tuning and paired differences per budget."""
    parts = [f"## {dataset}", "",
             "Pretraining cost at equal steps (training only; a ratio only between runs on one machine):", "",
             cost_table(results, seeds, contenders)]
    if any(key.startswith("time/") for key in results):
        parts += ["", "Time per step side by side (`--stages time`: one process times each method in turn):", "",
                  time_table(results, seeds, contenders)]
    counts = sorted({r["steps"] for c in contenders for s in seeds if (r := results.get(f"pretrain/steps/{c}/seed{s}"))})
    for budget in budgets:  # the step count is in no key: a study run at --steps 300 must say so
        title = "equal wall-clock" if budget == "time" else f"equal steps ({' / '.join(map(str, counts)) or '-'})"
        parts += ["", f"### {title}: probes on frozen features (test %, mean ± std over seeds)", "",
                  probe_table(results, budget, seeds, contenders),
                  "", f"### {title}: fine-tuning, test macro F1 / AUROC (%) at each label fraction, lr chosen on val",
                  "", finetune_table(results, budget, seeds, contenders, fractions, lrs),
                  "", f"### {title}: paired differences, CASS (defaults) minus each, points (seeds CASS wins)", "",
                  paired_table(results, budget, seeds, contenders, fractions, lrs)]
    return "\n".join(parts) + "\n"
