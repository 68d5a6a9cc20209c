"""cass-dist: CASS (Cross-Architectural Self-Supervision) pretraining, from one CPU to Slurm clusters."""

__version__ = "0.1.0"
