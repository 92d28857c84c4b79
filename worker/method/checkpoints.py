"""Where the shipped demo checkpoint lives; no torch import, so the CLI can ask cheaply."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).with_name("weights")
DEMO_CHECKPOINT = WEIGHTS_DIR / "densenet121-phantom.safetensors"


def default_checkpoint() -> Path | None:
    """The shipped demo checkpoint, or None when this installation has none."""
    return DEMO_CHECKPOINT if DEMO_CHECKPOINT.exists() else None
