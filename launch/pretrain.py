"""Pretrain CASS: ``accelerate launch launch/pretrain.py [--preset demo|paper|t4] [--config FILE] [flags]``.

With no arguments: builds the synthetic demo shards in ``shards/demo`` if they are missing and runs
the ``demo`` preset (tiny models, CPU, a few minutes). ``--help`` lists every flag.
"""

import logging
import sys
from pathlib import Path

from accelerate import PartialState

from cass_dist.configs.pretrain import DEMO_SHARDS, PretrainConfig, parse_pretrain_config
from cass_dist.data.manifest import MANIFEST_NAME
from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine.entry import run_entry
from cass_dist.engine.pretrain import pretrain
from cass_dist.engine.run import launch_on_cpu_if_no_gpu


def parse(argv: list[str]) -> PretrainConfig:
    return parse_pretrain_config(argv, default_preset=None if argv else "demo")


def pretrain_with_demo_shards(cfg: PretrainConfig) -> None:
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise here
    if cfg.data.shards == DEMO_SHARDS:
        state = PartialState(cpu=launch_on_cpu_if_no_gpu())
        with state.main_process_first():  # the main process builds; the others then find the manifest
            if state.is_main_process and not (Path(DEMO_SHARDS) / MANIFEST_NAME).is_file():
                logging.info(f"building the synthetic demo shards in {DEMO_SHARDS}")
                build_synthetic(DEMO_SHARDS, num_images=2000, image_size=32)
    pretrain(cfg)


def main(argv=None) -> int:
    return run_entry("launch/pretrain.py", parse, pretrain_with_demo_shards, argv)


if __name__ == "__main__":
    sys.exit(main())
