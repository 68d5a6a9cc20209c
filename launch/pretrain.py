"""Pretrain CASS: ``accelerate launch launch/pretrain.py [--preset demo|paper|t4] [--config FILE] [flags]``.

With no arguments: builds the synthetic demo shards in ``shards/demo`` if they are missing and runs
the ``demo`` preset (tiny models, CPU, a few minutes). ``--help`` lists every flag.
"""

import logging
import sys
from pathlib import Path

from accelerate import PartialState

from cass_dist.configs.base import ConfigError
from cass_dist.configs.pretrain import DEMO_SHARDS, parse_pretrain_config
from cass_dist.data.manifest import MANIFEST_NAME
from cass_dist.data.synthetic import build_synthetic
from cass_dist.engine.pretrain import pretrain
from cass_dist.engine.run import launch_on_cpu_if_no_gpu


def main(argv: list[str]) -> int:
    cpu = launch_on_cpu_if_no_gpu()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise here
    try:
        cfg = parse_pretrain_config(argv, default_preset=None if argv else "demo")
        if cfg.data.shards == DEMO_SHARDS:
            state = PartialState(cpu=cpu)
            with state.main_process_first():  # the main process builds; the others then find the manifest
                if state.is_main_process and not (Path(DEMO_SHARDS) / MANIFEST_NAME).is_file():
                    logging.info(f"building the synthetic demo shards in {DEMO_SHARDS}")
                    build_synthetic(DEMO_SHARDS, num_images=2000, image_size=32)
        pretrain(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as exc:  # library errors name the field or the file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
