"""Fine-tune a backbone on a labelled shard set.

    accelerate launch launch/finetune.py --data SHARDS --init RUN_DIR|FILE|random|imagenet \
        --branch cnn|vit|both --label-fraction 0.1 --output-dir runs/ft

Every config field is a flag (``--help``); ``--config FILE.yaml`` and ``--preset small`` also work.
"""

import logging
import sys

from cass_dist.configs.base import ConfigError
from cass_dist.configs.finetune import parse_finetune_config
from cass_dist.engine.run import launch_on_cpu_if_no_gpu


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    launch_on_cpu_if_no_gpu()
    try:
        cfg = parse_finetune_config(argv)
    except ConfigError as exc:
        print(f"launch/finetune.py: error: {exc}", file=sys.stderr)
        return 2
    from cass_dist.engine.finetune import finetune

    try:
        finetune(cfg)
    except (ValueError, OSError, RuntimeError) as exc:  # library errors name the field or file
        print(f"launch/finetune.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
