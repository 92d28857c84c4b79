"""Fine-tuning with DenseNet-121's first stages frozen.

On a CPU the stem and the first dense blocks, which work at 56 x 56 and 28 x 28, cost most of a
training step, yet they hold generic edge and texture filters that a fine-tuning run from earlier
weights hardly needs to move. Freezing them makes a CPU fine-tuning run fit several epochs where
it would otherwise fit one or two (docs/benchmarks.md gives the step times). Frozen batch-norm
layers stay in eval mode, so their running statistics stay those of the starting weights.
"""

from __future__ import annotations

from torch import nn

__all__ = ["FREEZE_POINTS", "check_freeze_point", "freeze_stages", "set_training_mode"]

# The first stages in torchvision's DenseNet naming (features.*), in forward order
_STAGES = ("conv0", "norm0", "denseblock1", "transition1", "denseblock2", "transition2")
# What each --freeze-through value leaves untrained
FREEZE_POINTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "denseblock1": _STAGES[:4],
    "denseblock2": _STAGES,
}


def check_freeze_point(through: str) -> None:
    """Refuse a ``--freeze-through`` value that names no stage."""
    if through not in FREEZE_POINTS:
        raise ValueError(
            f"freeze_through must be one of {', '.join(FREEZE_POINTS)}, got {through!r}"
        )


def _frozen_parts(module: nn.Module, through: str) -> list[nn.Module]:
    check_freeze_point(through)
    features = getattr(module, "module", module).features
    return [getattr(features, name) for name in FREEZE_POINTS[through]]


def freeze_stages(module: nn.Module, through: str) -> None:
    """Stop gradients through the stages ``through`` names (see :data:`FREEZE_POINTS`)."""
    for part in _frozen_parts(module, through):
        part.requires_grad_(False)


def set_training_mode(module: nn.Module, through: str) -> None:
    """``module.train()``, except that the frozen stages keep eval mode (fixed batch-norm)."""
    module.train()
    for part in _frozen_parts(module, through):
        part.eval()
