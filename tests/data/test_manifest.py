"""Damaged manifests and indexes: one ManifestError naming the file and the field, in the loader and in verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cass_dist.data import ManifestError, build_loader, load_manifest
from cass_dist.data.__main__ import main
from cass_dist.data.verify import verify_shards


@pytest.fixture
def shard_copy(synthetic_shards, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(synthetic_shards, out)
    return out


def edit_manifest(shards: Path, edit) -> None:
    path = shards / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


@pytest.mark.parametrize("content", ["[1, 2]", '"a string"', "3", "null"])
def test_valid_json_that_is_not_an_object_is_one_clear_error(shard_copy, content, capsys):
    (shard_copy / "manifest.json").write_text(content)
    with pytest.raises(ManifestError, match=r"manifest.json: expected a JSON object"):
        load_manifest(shard_copy)
    with pytest.raises(ManifestError, match="expected a JSON object"):
        build_loader(shard_copy, "train", batch_size=4, train=False)
    [problem] = verify_shards(shard_copy)
    assert "manifest.json: expected a JSON object" in problem
    assert main(["verify", str(shard_copy)]) == 1
    err = capsys.readouterr().err
    assert "manifest.json: expected a JSON object" in err and "Traceback" not in err


def _set(path: str, value):
    def edit(data):
        *parents, leaf = path.split(".")
        target = data
        for name in parents:
            target = target[int(name)] if isinstance(target, list) else target[name]
        target[leaf] = value
        return data
    return edit


@pytest.mark.parametrize("field,value,named", [
    ("splits", [1, 2], "splits must be an object"),
    ("splits.train", "x", "splits.train must be an object"),
    ("splits.train.shards", {"a": 1}, "splits.train.shards must be a list"),
    ("splits.train.count", "168", "splits.train.count must be an integer"),
    ("image", [], "image must be an object"),
    ("image.size", [32], "image.size must be"),
    ("image.format", "gif", "image.format must be one of"),
    ("class_names", "abc", "class_names must be a list"),
    ("task", 3, "task must be a string"),
])
def test_malformed_fields_are_named(shard_copy, field, value, named):
    edit_manifest(shard_copy, _set(field, value))
    with pytest.raises(ManifestError, match=named):
        load_manifest(shard_copy)
    assert named in verify_shards(shard_copy)[0]


def test_malformed_shard_entries_and_paths_outside_the_set_are_refused(synthetic_shards, shard_copy):
    edit_manifest(shard_copy, lambda d: (d["splits"]["val"]["shards"][0].pop("sha256"), d)[1])
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(shard_copy)
    shutil.copy(synthetic_shards / "manifest.json", shard_copy / "manifest.json")
    outside = {"name": "../elsewhere.tar", "count": 24, "bytes": 1, "sha256": "0"}
    edit_manifest(shard_copy, _set("splits.val.shards", [outside]))
    with pytest.raises(ManifestError, match="a path inside the shard directory"):
        load_manifest(shard_copy)


@pytest.mark.parametrize("content", ["[]", '{"keys": "abc", "labels": []}', '{"keys": [1, 2], "labels": [0, 0]}'])
def test_a_malformed_index_is_refused_by_the_loader_and_reported_by_verify(shard_copy, content):
    (shard_copy / "index-test.json").write_text(content)
    with pytest.raises(ManifestError, match="index-test.json"):
        build_loader(shard_copy, "test", batch_size=4, train=False)
    assert any("index-test.json" in p for p in verify_shards(shard_copy))
