"""The cass-shards CLI: sub-commands, exit codes, one-line errors, summaries."""

import csv
import json
import subprocess
import sys

import numpy as np

from cass_dist.data.__main__ import main
from cass_dist.data.manifest import load_manifest

QUIET = ["--workers", "0", "--no-progress"]


def test_synthetic_then_verify(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["synthetic", "--num-images", "60", "--image-size", "16", "--shard-size", "20", "--out", str(out)]
    assert main(args + QUIET) == 0
    printed = capsys.readouterr().out
    assert "wrote 60 images" in printed and "images/s" in printed and "across splits: none" in printed
    manifest = load_manifest(out)
    assert manifest.source["type"] == "synthetic" and manifest.source["args"]["argv"][:2] == args[:2]
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    # A finished set is left alone without --overwrite: exit 2 and a one-line message.
    assert main(args + QUIET) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert main(args + QUIET + ["--overwrite", "--format", "jpg", "--mode", "L"]) == 0
    assert load_manifest(out).image.format == "jpg"


def test_verify_reports_problems_with_exit_1(synthetic_shards, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_shards, copy)
    (copy / "val-000000.tar").write_bytes(b"")
    assert main(["verify", "--out", str(copy)]) == 1
    assert "val-000000.tar" in capsys.readouterr().err


def test_csv_subcommand_and_bad_input_exit_2(tmp_path, folder_maker, capsys):
    pixels = folder_maker(tmp_path, {"img": 12}, size=(8, 8))
    with open(tmp_path / "t.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image path", "a", "b"])
        writer.writerows([[rel, i % 2, int(i % 3 == 0)] for i, rel in enumerate(sorted(pixels))])
    out = tmp_path / "out"
    base = ["csv", str(tmp_path / "t.csv"), "--image-col", "image path", "--out", str(out)] + QUIET
    assert main(base + ["--label-cols", "a,b"]) == 0
    assert load_manifest(out).task == "multi-label"
    assert main(base + ["--label-col", "dx", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cass-shards: error: csv:") and "'dx'" in err and err.count("\n") == 1
    assert load_manifest(out).task == "multi-label"  # the failed run did not touch the finished set


def test_folder_and_medmnist_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "d" / "a").mkdir(parents=True)
    assert main(["folder", str(tmp_path / "d"), "--out", str(tmp_path / "o")] + QUIET) == 2
    assert "without any image" in capsys.readouterr().err
    np.savez(tmp_path / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    assert main(["medmnist", "breastmnist", "--root", str(tmp_path), "--out", str(tmp_path / "m")] + QUIET) == 2
    assert "lacks keys" in capsys.readouterr().err
    assert main(["medmnist"]) == 2  # argparse usage error, returned rather than raised


def test_module_entry_point_runs(tmp_path):
    out = tmp_path / "m"
    result = subprocess.run([sys.executable, "-m", "cass_dist.data", "synthetic", "--num-images", "30",
                             "--image-size", "8", "--out", str(out)] + QUIET,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 24


def test_exact_size_raw_shards_and_adopt_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "raw"
    args = ["synthetic", "--num-images", "30", "--image-size", "20", "--shard-size", "10", "--out", str(out)]
    assert main(args + QUIET + ["--format", "npy", "--resize", "12x16"]) == 0
    manifest = load_manifest(out)
    assert (manifest.image.format, manifest.image.size) == ("npy", [12, 16])
    assert main(["verify", str(out)]) == 0
    for bad in ("0x3", "12x", "big"):
        assert main(args + QUIET + ["--resize", bad]) == 2
        assert "--resize" in capsys.readouterr().err
    assert main(["adopt", str(tmp_path / "nowhere"), "--split", "train=*.tar", "--classes", "a,b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no shard matches" in err
    assert main(["adopt", str(out), "--split", "train", "--classes", "a,b"]) == 2
    assert "NAME=GLOB" in capsys.readouterr().err
