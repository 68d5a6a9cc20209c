"""Evaluate frozen features (kNN, linear probe) or a fine-tuned classifier; writes DIR/metrics.json.

    python launch/evaluate.py --data SHARDS --init RUN_DIR|FILE|random --probe knn|linear --output-dir DIR
    python launch/evaluate.py --data SHARDS --init FINETUNE_RUN_DIR --probe head --output-dir DIR

Works under ``accelerate launch`` too (features are gathered across ranks). See ``--help``.
"""

import sys

from cass_dist.configs.finetune import parse_evaluate_config
from cass_dist.engine.entry import run_entry


def evaluate(cfg) -> None:
    from cass_dist.engine.probe import evaluate as run_probe  # after the config is known to be good

    run_probe(cfg)


def main(argv=None) -> int:
    return run_entry("launch/evaluate.py", parse_evaluate_config, evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
