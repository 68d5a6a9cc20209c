"""Training engine: the Run (Accelerator, run dir, trackers, signals), checkpoints, and the loops.

``Run`` and the checkpoint helpers are shared by every loop; the pretraining loop lives in
``cass_dist.engine.pretrain`` (imported on demand: it pulls in the models and the data layer).
"""

from cass_dist.engine.checkpoint import (
    CheckpointError,
    TrainState,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    read_train_state,
    resolve_resume,
    save_checkpoint,
)
from cass_dist.engine.run import Run, choose_precision

__all__ = [
    "CheckpointError",
    "Run",
    "TrainState",
    "choose_precision",
    "find_latest",
    "list_checkpoints",
    "load_checkpoint",
    "read_train_state",
    "resolve_resume",
    "save_checkpoint",
]
