"""The model checkpoint the package ships, as the tests see it."""

from __future__ import annotations


def shipped_model_version() -> str:
    """The version the shipped demo checkpoint (worker/method/weights) states in its metadata."""
    from safetensors import safe_open

    from hrct_triage.worker.method.checkpoints import DEMO_CHECKPOINT

    with safe_open(str(DEMO_CHECKPOINT), framework="np") as handle:
        return str((handle.metadata() or {})["version"])
