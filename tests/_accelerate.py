"""Accelerate keeps process-wide singletons (AcceleratorState, GradientState); tests that build
Accelerators in-process one after the other reset them, so each run starts from its own settings."""

from accelerate.state import AcceleratorState, GradientState


def reset_accelerate_state() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
