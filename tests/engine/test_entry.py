"""The launch scripts' shared body: exit codes and error messages."""

from __future__ import annotations

import pytest

from cass_dist.configs.finetune import parse_finetune_config
from cass_dist.engine.entry import run_entry


def test_exit_codes_and_messages(capsys):
    ran = []
    assert run_entry("prog.py", parse_finetune_config, ran.append, ["--data", "shards"]) == 0
    assert ran[0].data.shards == "shards"

    assert run_entry("prog.py", parse_finetune_config, ran.append, ["--data", "s", "--label-fraction", "2"]) == 2
    assert capsys.readouterr().err.startswith("prog.py: error: data.label_fraction")
    assert len(ran) == 1  # a bad config never reaches the job

    def refuses(cfg):
        raise FileNotFoundError(f"{cfg.data.shards}/manifest.json: no such file")

    assert run_entry("prog.py", parse_finetune_config, refuses, ["--data", "gone"]) == 1
    assert capsys.readouterr().err == "prog.py: error: gone/manifest.json: no such file\n"

    def bug(cfg):
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):  # real bugs keep their traceback
        run_entry("prog.py", parse_finetune_config, bug, ["--data", "s"])
