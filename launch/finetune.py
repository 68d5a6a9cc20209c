"""Fine-tune a backbone on a labelled shard set.

    accelerate launch launch/finetune.py --data SHARDS --init RUN_DIR|FILE|random|imagenet \
        --branch cnn|vit|both --label-fraction 0.1 --output-dir runs/ft

Every config field is a flag (``--help``); ``--config FILE.yaml`` and ``--preset small`` also work.
"""

import sys

from cass_dist.configs.finetune import parse_finetune_config
from cass_dist.engine.entry import run_entry


def finetune(cfg) -> None:
    from cass_dist.engine.finetune import finetune as train  # after the config is known to be good

    train(cfg)


def main(argv=None) -> int:
    return run_entry("launch/finetune.py", parse_finetune_config, finetune, argv)


if __name__ == "__main__":
    sys.exit(main())
