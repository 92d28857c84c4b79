"""Where the checkpoint and its domain reference live, without importing the worker or torch.

The drift watch (``db``, ``web``, the ``stats`` CLI) reads the reference beside the checkpoint
the worker loads; this repeats the worker's path rule (``worker.method.checkpoints``) so those
rooms never import the worker. A test keeps the two rules equal.
"""

from __future__ import annotations

from pathlib import Path

#: The shipped demo checkpoint, as ``hrct_triage.worker.method.checkpoints.DEMO_CHECKPOINT``.
SHIPPED_CHECKPOINT = (
    Path(__file__).parent.parent
    / "worker"
    / "method"
    / "weights"
    / "densenet121-phantom.safetensors"
)
REFERENCE_SUFFIX = ".domain.json"


def checkpoint_in_use(model_path: Path | None) -> Path | None:
    """``HRCT_MODEL_PATH`` when set, else the shipped checkpoint when installed, else None."""
    if model_path is not None:
        return model_path
    return SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.exists() else None


def domain_reference_path(checkpoint: Path) -> Path:
    """``<checkpoint path without its suffix>.domain.json``: ``model.pt`` and
    ``model.safetensors`` both give ``model.domain.json``."""
    return (
        checkpoint.with_suffix(REFERENCE_SUFFIX)
        if checkpoint.suffix
        else Path(f"{checkpoint}{REFERENCE_SUFFIX}")
    )
