"""Evaluate frozen features (kNN, linear probe) or a fine-tuned classifier; writes DIR/metrics.json.

    python launch/evaluate.py --data SHARDS --init RUN_DIR|FILE|random --probe knn|linear --output-dir DIR
    python launch/evaluate.py --data SHARDS --init FINETUNE_RUN_DIR --probe head --output-dir DIR

Works under ``accelerate launch`` too (features are gathered across ranks). See ``--help``.
"""

import logging
import sys

from cass_dist.configs.base import ConfigError
from cass_dist.configs.finetune import parse_evaluate_config
from cass_dist.engine.run import launch_on_cpu_if_no_gpu


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    launch_on_cpu_if_no_gpu()
    try:
        cfg = parse_evaluate_config(argv)
    except ConfigError as exc:
        print(f"launch/evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    from cass_dist.engine.probe import evaluate

    try:
        evaluate(cfg)
    except (ValueError, OSError, RuntimeError) as exc:  # library errors name the field or file
        print(f"launch/evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
