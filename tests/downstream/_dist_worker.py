"""Worker of the 2-rank gather test: each rank evaluates an uneven share of one fixed prediction set."""

from __future__ import annotations

import json
import os
import sys

import torch


def make_predictions(task: str, n: int = 37, num_classes: int = 4, seed: int = 0):
    """Return (probs, labels, keys) of a fixed, seeded prediction set for ``task``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=g)
    if task == "multi-label":
        labels = (torch.rand(n, num_classes, generator=g) > 0.5).float()
        probs = torch.sigmoid(logits + 2 * (labels - 0.5))
    else:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        probs = torch.softmax(logits + 1.5 * torch.nn.functional.one_hot(labels, num_classes), dim=1)
    keys = [f"test-{i:07d}" for i in range(n)]
    return probs, labels, keys


def main(out_path: str) -> None:
    from accelerate import Accelerator

    from cass_dist.metrics import compute_metrics, gather_predictions, to_jsonable

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    results = {}
    for task, classes in (("multi-class", 4), ("binary", 2), ("multi-label", 4)):
        probs, labels, keys = make_predictions(task, num_classes=classes)
        # Uneven shares, interleaved: rank 0 takes 2 of every 3 samples, rank 1 the rest.
        mine = [i for i in range(len(keys)) if (i % 3 != 2) == (rank == 0)]
        got = gather_predictions(accelerator, probs[mine], labels[mine], [keys[i] for i in mine])
        results[task] = compute_metrics(got[0], got[1], task=task)
        results[task]["gathered_keys"] = got[2]
    # A rank without any sample must still take part and the others must get everything.
    probs, labels, keys = make_predictions("multi-class")
    if rank == 0:
        got = gather_predictions(accelerator, probs, labels, keys)
    else:
        got = gather_predictions(accelerator, None, None, [])
    results["one_rank_empty"] = compute_metrics(got[0], got[1], task="multi-class")
    results["world_size"] = world
    if rank == 0:
        with open(out_path + ".tmp", "w") as fh:
            json.dump(to_jsonable(results), fh)
        os.replace(out_path + ".tmp", out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
