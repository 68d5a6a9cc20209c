"""``--stages time`` times every contender side by side on one machine: the paper's time claim in
minutes, and the seconds the equal wall-clock budget converts with (these timings before the
equal-steps runs', and these taken now when the equal-steps runs were timed apart)."""

from __future__ import annotations

import json

import pytest

from cass_dist.data.synthetic import build_synthetic


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("cass_vs_baselines")


def fake_timing_runs(s, seconds: dict[str, list[float]], timed: list[str]):
    """Stand in for ``pretrain_to_the_end``: write metrics.jsonl windows of the given seconds per step."""

    def run(argv):
        out = argv[argv.index("--output-dir") + 1]
        contender = next(c for c in seconds if out.endswith(f"/{c}-seed0"))
        timed.append((contender, argv[argv.index("--max-steps") + 1], argv[argv.index("--log-every") + 1]))
        records = [{"step": 10 * (i + 1), "images_per_sec": 64 / sps} for i, sps in enumerate(seconds[contender])]
        (s.work / "time" / f"{contender}-seed0").mkdir(parents=True, exist_ok=True)
        (s.work / "time" / f"{contender}-seed0" / "metrics.jsonl").write_text(
            "\n".join(json.dumps(r) for r in records) + "\n")

    s.pretrain_to_the_end = run


def test_timing_keeps_the_median_window_after_the_first_under_this_machines_name(study, tmp_path):
    s = study.Study(study.parse_args(["--work", str(tmp_path), "--time-steps", "40"]), "breastmnist")
    s.train_count = 640
    timed: list = []
    fake_timing_runs(s, {"cass": [9.0, 2.0, 2.2, 2.1], "dino-vit": [9.0, 3.0, 9.0, 3.2]}, timed)

    cass = s.timing("cass", 0)
    assert cass["seconds_per_step"] == pytest.approx(2.1)  # start-up window (9 s) dropped, then the median
    assert cass["seconds_per_epoch"] == pytest.approx(10 * 2.1) and cass["windows"] == 3
    assert cass["machine"] == study.machine()
    assert s.timing("dino-vit", 0)["seconds_per_step"] == pytest.approx(3.2)  # one slow window does not move it
    assert timed == [("cass", "40", "10"), ("dino-vit", "40", "10")]  # 4 windows of 10 steps
    assert not (tmp_path / "breastmnist" / "time" / "cass-seed0").exists()  # only the seconds are kept
    stored = json.loads((tmp_path / "breastmnist" / "results.json").read_text())
    assert stored[f"time/{study.machine().replace('/', '-')}/cass/seed0"] == cass
    s.timing("cass", 0)  # recorded: not timed again
    assert len(timed) == 2


def test_the_time_stage_times_cass_first_and_pretrains_nothing(study, tmp_path):
    s = study.Study(study.parse_args(["--work", str(tmp_path), "--seeds", "0", "--stages", "time",
                                      "--contenders", "dino-cnn", "cass-paper"]), "breastmnist")
    s.make_shards = lambda: setattr(s, "train_count", 640)
    s.pretrain = lambda *a: pytest.fail("the time stage must not pretrain")
    s.raw_pixels = lambda: pytest.fail("nor probe")
    timed: list = []
    fake_timing_runs(s, {c: [5.0, 1.0, 1.0, 1.0] for c in ("cass", "dino-cnn", "cass-paper")}, timed)
    s.run()
    assert [c for c, *_ in timed] == ["cass", "dino-cnn", "cass-paper"]


def test_the_equal_time_budget_times_both_here_when_their_runs_were_timed_on_two_machines(study, tmp_path):
    (tmp_path / "breastmnist").mkdir()
    done = {f"pretrain/steps/{c}/seed0": {"steps": 600, "seconds_per_step": sps, "machine": where}
            for c, sps, where in (("cass", 2.0, "Intel Xeon, 2 cores, 1 thread(s)"),
                                  ("dino-vit", 3.0, "AMD EPYC, 2 cores, 1 thread(s)"))}
    (tmp_path / "breastmnist" / "results.json").write_text(json.dumps(done))
    s = study.Study(study.parse_args(["--work", str(tmp_path)]), "breastmnist")
    s.train_count = 640
    timed: list = []
    fake_timing_runs(s, {"cass": [9.0, 1.0, 1.0, 1.0], "dino-vit": [9.0, 4.0, 4.0, 4.0]}, timed)

    assert s.steps_for("dino-vit", "time", 0) == 150  # 600 x 1 s / 4 s, this machine's side-by-side seconds
    assert [c for c, *_ in timed] == ["cass", "dino-vit"]  # not 600 x 2 s / 3 s from two machines
    assert s.steps_for("cass", "time", 0) == 600  # CASS sets the budget: no ratio


def test_the_equal_time_budget_prefers_side_by_side_timings_recorded_here(study, tmp_path):
    here = study.Study.timing_key
    done = {here("cass", 0): {"seconds_per_step": 3.0}, here("dino-cnn", 0): {"seconds_per_step": 9.0},
            # equal-steps runs on this machine at another load, and no dino-cnn run at all for seed 1
            "pretrain/steps/cass/seed0": {"steps": 600, "seconds_per_step": 2.0, "machine": study.machine()},
            "pretrain/steps/dino-cnn/seed0": {"steps": 600, "seconds_per_step": 9.0, "machine": study.machine()},
            here("cass", 1): {"seconds_per_step": 3.0}, here("dino-cnn", 1): {"seconds_per_step": 6.0}}
    (tmp_path / "breastmnist").mkdir()
    (tmp_path / "breastmnist" / "results.json").write_text(json.dumps(done))
    s = study.Study(study.parse_args(["--work", str(tmp_path)]), "breastmnist")

    def must_not_run(argv):
        raise AssertionError(f"ran {argv}")

    s.pretrain_to_the_end = must_not_run
    assert s.steps_for("dino-cnn", "time", 0) == 200  # 600 x 3 s / 9 s side by side, not 600 x 2 s / 9 s
    assert s.steps_for("dino-cnn", "time", 1) == 300  # needs no equal-steps run of its own


def test_too_few_time_steps_for_four_windows_is_refused_by_name(study, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--time-steps", "3"])
    assert "--time-steps must be at least 4" in capsys.readouterr().err


def test_time_table_ratios_pair_seeds_on_one_machine(load_benchmark):
    tables = load_benchmark("cass_vs_baselines_tables")

    def timed(where, sps):
        return {"machine": where, "seconds_per_step": sps, "seconds_per_epoch": 10 * sps, "steps": 40}

    results = {"time/EPYC/cass/seed0": timed("EPYC", 1.0), "time/EPYC/dino-cnn/seed0": timed("EPYC", 4.0),
               "time/EPYC/cass/seed1": timed("EPYC", 1.0), "time/EPYC/dino-cnn/seed1": timed("EPYC", 2.0),
               "time/Xeon/dino-cnn/seed0": timed("Xeon", 100.0)}  # no CASS on the Xeon: no ratio there
    rows = tables.time_table(results, [0, 1], ["dino-cnn"]).splitlines()
    assert "| EPYC | DINO-CNN | 3.000 ± 1.414 | 30.0 ± 14.1 | 0.38 ± 0.18 | 2 |" in rows  # 1/4 and 1/2, per seed
    assert "| EPYC | CASS (defaults) | 1.000 ± 0.000 | 10.0 ± 0.0 | 1.00 ± 0.00 | 2 |" in rows
    assert "| Xeon | DINO-CNN | 100.000 ± 0.000 | 1000.0 ± 0.0 | - | 1 |" in rows
    text = tables.all_tables(results, dataset="d", seeds=[0, 1], budgets=["steps"], contenders=["dino-cnn"],
                             fractions=[0.1], lrs=[1e-3])
    assert "Time per step side by side" in text


@pytest.mark.slow
def test_a_real_timing_run_records_its_windows_and_leaves_no_run_dir(study, tmp_path, fresh_accelerate_state):
    s = study.Study(study.parse_args(["--work", str(tmp_path / "work"), "--time-steps", "4", "--batch-size", "16"]),
                    "breastmnist")
    s.cnn, s.vit = "test_resnet", "test_vit"  # only the models shrink, for time
    s.shards = tmp_path / "shards"
    build_synthetic(s.shards, num_images=160, image_size=28, shard_size=80)
    s.train_count = 128
    for contender in ("cass", "dino-cnn"):  # the default contender, and DINO's multi-crop through the same loop
        record = s.timing(contender, 0)
        assert record["windows"] == 3 and record["steps"] == 4 and record["seconds_per_step"] > 0
        assert record["seconds_per_epoch"] == pytest.approx(8 * record["seconds_per_step"])
        assert not (tmp_path / "work" / "breastmnist" / "time" / f"{contender}-seed0").exists()
