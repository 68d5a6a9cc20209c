"""Config machinery: precedence (preset < YAML < flags), validation naming the field, YAML round trip."""

from dataclasses import dataclass, field

import pytest
import yaml

from cass_dist.configs.base import ConfigError, FieldError, RunSection, load_config, parse_config, save_config
from cass_dist.configs.pretrain import PRESETS, PretrainConfig, parse_pretrain_config


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_flags_override_file_which_overrides_preset(tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", {"preset": "demo", "run": {"max_steps": 7, "seed": 3},
                                                "data": {"batch_size": 12}})
    cfg = parse_pretrain_config(["--config", cfg_file, "--seed", "5", "--data.image-size", "48"])
    assert cfg.run.max_steps == 7  # file over preset (demo has 80)
    assert cfg.run.seed == 5  # flag over file
    assert cfg.data.batch_size == 12
    assert cfg.data.image_size == 48  # dotted flag, dashes accepted
    assert cfg.model.cnn == PRESETS["demo"]().model.cnn  # untouched preset value


def test_every_issue_flag_is_accepted(tmp_path):
    cfg = parse_pretrain_config([
        "--preset", "demo", "--data", "d", "--output-dir", str(tmp_path), "--max-steps", "3", "--epochs", "2",
        "--batch-size", "4", "--save-every", "2", "--resume", "auto", "--report-to", "tensorboard", "--seed", "9",
        "--objective", "paper", "--pretrained", "--grad-checkpointing", "false", "--optim.betas", "[0.8, 0.9]"])
    assert (cfg.data.shards, cfg.run.output_dir, cfg.run.max_steps, cfg.run.epochs) == ("d", str(tmp_path), 3, 2)
    assert (cfg.data.batch_size, cfg.run.save_every, cfg.run.resume, cfg.run.report_to) == (4, 2, "auto", "tensorboard")
    assert (cfg.run.seed, cfg.objective.name, cfg.model.pretrained) == (9, "paper", True)
    assert cfg.model.grad_checkpointing is False
    assert cfg.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "demo", "--lr-cnn", "-1"], "optim.lr_cnn: must be > 0, got -1.0"),
    (["--preset", "demo", "--batch-size", "0"], "data.batch_size: must be >= 1, got 0"),
    (["--preset", "demo", "--precision", "fp8"], "run.precision: must be one of"),
    (["--preset", "demo", "--seed", "abc"], "run.seed: expected an integer, got 'abc'"),
    (["--preset", "demo", "--keep-last", "0"], "run.keep_last: must be >= 1"),
    (["--preset", "demo", "--model.drop_path_rate", "1.5"], "model.drop_path_rate: must be in [0, 1)"),
    (["--max-steps", "3"], "data.shards: required"),
    (["--preset", "demo", "--max-step", "3"], "did you mean --max-steps"),
    (["--preset", "nope"], "preset: unknown preset 'nope'; choose one of ['demo', 'paper', 't4']"),
])
def test_bad_config_names_the_field(argv, message):
    with pytest.raises(ConfigError) as info:
        parse_pretrain_config(argv)
    assert message in str(info.value)


def test_bad_yaml_field_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lr_cnnn: unknown field; did you mean optim\.lr_cnn"):
        parse_pretrain_config(["--config", write_yaml(tmp_path / "c.yaml", {"optim": {"lr_cnnn": 1.0}})])
    with pytest.raises(ConfigError, match=r"run: expected a mapping"):
        parse_pretrain_config(["--config", write_yaml(tmp_path / "d.yaml", {"run": 3})])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_pretrain_config(["--config", str(tmp_path / "missing.yaml")])


def test_saved_config_loads_back_equal(tmp_path):
    cfg = parse_pretrain_config(["--preset", "t4", "--data", "x", "--model.vit_patch_size", "8"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file
    assert load_config(PretrainConfig, path) == cfg


def test_presets_state_the_paper_and_t4_settings():
    paper, t4, demo = PRESETS["paper"](), PRESETS["t4"](), PRESETS["demo"]()
    assert (paper.model.cnn, paper.model.vit, paper.model.embed_dim) == ("resnet50", "vit_base_patch16_384", 1000)
    assert (paper.objective.name, paper.optim.optimizer, paper.optim.lr_cnn, paper.optim.lr_vit) == ("paper", "adam", 1e-3, 1e-3)
    assert (paper.data.batch_size, paper.data.image_size, paper.data.views, paper.data.transform) == (16, 384, 1, "pretrain")
    assert (t4.data.views, demo.data.views, PretrainConfig().data.views) == (1, 2, 2)  # the paper shares one view
    assert (t4.run.precision, t4.model.grad_checkpointing, t4.model.vit) == ("fp16", True, paper.model.vit)
    assert demo.run.precision == "fp32" and demo.data.image_size <= 64
    assert PretrainConfig().objective.name == demo.objective.name  # one default, owned by the objectives module


def test_a_new_config_reuses_the_machinery():
    @dataclass
    class HeadSection:
        dropout: float = 0.0

        def validate(self):
            if not 0 <= self.dropout < 1:
                raise FieldError("dropout", "must be in [0, 1)", self.dropout)

    @dataclass
    class FinetuneConfig:
        run: RunSection = field(default_factory=RunSection)
        head: HeadSection = field(default_factory=HeadSection)

    presets = {"small": lambda: FinetuneConfig(head=HeadSection(dropout=0.1))}
    cfg = parse_config(FinetuneConfig, ["--preset", "small", "--max-steps", "4"], presets=presets)
    assert (cfg.head.dropout, cfg.run.max_steps) == (0.1, 4)
    with pytest.raises(ConfigError, match=r"head\.dropout: must be in \[0, 1\), got 2\.0"):
        parse_config(FinetuneConfig, ["--head.dropout", "2"], presets=presets)


# ----------------------------------------------------------------------------- --help
def _entry_parsers():
    """Every entry script's parser (launch/pretrain.py, finetune.py, evaluate.py, cass-shards, cass-report)."""
    import argparse

    from cass_dist.configs import finetune as ft
    from cass_dist.configs import pretrain as pt
    from cass_dist.configs.base import build_parser
    from cass_dist.data.__main__ import build_parser as shards_parser
    from cass_dist.report import build_parser as report_parser

    parsers = {
        "launch/pretrain.py": build_parser(pt.PretrainConfig, pt.ALIASES, pt.PRESETS),
        "launch/finetune.py": build_parser(ft.FinetuneConfig, ft.FINETUNE_ALIASES, ft.FINETUNE_PRESETS),
        "launch/evaluate.py": build_parser(ft.EvaluateConfig, ft.EVALUATE_ALIASES, ft.EVALUATE_PRESETS),
        "cass-report": report_parser(),
    }
    shards = shards_parser()
    parsers["cass-shards"] = shards
    for action in shards._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.update({f"cass-shards {name}": sub for name, sub in action.choices.items()})
    return parsers


def test_every_flag_of_every_entry_script_says_what_it_means():
    import argparse

    for script, parser in _entry_parsers().items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            meaning = (action.help or "").split("[")[0].strip()  # what precedes "[type; default ...]"
            assert meaning and meaning != action.dest, f"{script} {name}: no meaning in --help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                shown = parser.formatter_class(prog=script)._get_help_string(action)  # as --help prints it
                assert "default" in shown, f"{script} {name}: --help does not show the default"
        parser.format_help()  # every help string formats (a stray % would raise here)


def test_config_flags_read_their_meaning_type_and_default_from_the_source():
    from cass_dist.configs.base import build_parser, field_meanings
    from cass_dist.configs.finetune import EvaluateConfig, FinetuneConfig
    from cass_dist.configs.pretrain import ALIASES

    for cls in (PretrainConfig, FinetuneConfig, EvaluateConfig):
        assert [name for name, text in field_meanings(cls).items() if not text] == [], cls.__name__
    helps = {a.dest: a.help for a in build_parser(PretrainConfig, ALIASES, PRESETS)._actions}
    assert helps["set:data.shards"] == 'directory holding manifest.json (made by cass-shards) [string; default ""]'
    assert helps["set:data.batch_size"] == "per process [int; default 32]"
    assert helps["set:run.precision"].endswith("[one of auto|bf16|fp16|fp32; default \"auto\"]")
    assert helps["set:model.vit_patch_size"].endswith("[int or null; default null]")
    assert helps["set:optim.betas"].endswith("default [0.9, 0.999]]")
    assert helps["set:data.views"].startswith("2: each branch gets its own augmentation")  # a comment block above
    assert "resume may change" in helps["set:run.resume_force"]


def test_a_field_without_a_comment_still_shows_type_and_default():
    from cass_dist.configs.base import build_parser

    @dataclass
    class Section:
        plain: int = 3
        noted: float = 0.5  # 50% of it

    @dataclass
    class Config:
        sec: Section = field(default_factory=Section)

    helps = {a.dest: a.help for a in build_parser(Config, {}, {})._actions}
    assert helps["set:sec.plain"] == "[int; default 3]"
    assert helps["set:sec.noted"] == "50%% of it [number; default 0.5]"  # argparse formats help with %
    assert "50% of it" in build_parser(Config, {}, {}).format_help()


def test_resume_force_is_a_flag():
    cfg = parse_pretrain_config(["--preset", "demo", "--resume", "auto", "--resume-force", "global_batch,data.views"])
    assert cfg.run.resume_force == "global_batch,data.views"
