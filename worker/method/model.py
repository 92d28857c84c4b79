"""The DenseNet-121 of Yang et al. 2020 and its checkpoints.

A checkpoint is a safetensors file whose metadata says what the weights are (name, version,
input size, lung window, threshold, trim fraction, what they were trained on, when), next to a
``<checkpoint>.sha256`` sidecar in ``sha256sum`` format. The hash is checked before the file is
parsed: a result that goes to a PACS must name exactly the weights that produced it, and a
truncated or swapped file must never be used silently.

Without weights the worker refuses to start unless untrained weights were asked for explicitly;
those are deterministic (fixed seed) and say "untrained" in their version, so every output built
from them says so too.

Placement: CUDA when available (bf16 autocast), else CPU in fp32 unless the CPU does bf16
natively (AVX512-BF16 or AMX), where bf16 autocast is fast rather than emulated. Weights and
inputs are channels_last on both.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import DenseNet, densenet121

from hrct_triage.common import paper
from hrct_triage.common.errors import AnalysisError
from hrct_triage.worker.method.domain import DomainReference, load_reference
from hrct_triage.worker.method.results import ModelInfo

__all__ = [
    "CheckpointError",
    "CheckpointMetadata",
    "LoadedModel",
    "ModelError",
    "WeightsMissing",
    "build_densenet121",
    "cpu_supports_bf16",
    "file_sha256",
    "load_model",
    "model_info",
    "native_bf16",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

MODEL_NAME = "densenet121-covid19-hrct"
NUM_CLASSES = 2  # 0: healthy, 1: COVID-19 (the paper's two classes)
COVID_CLASS = 1
UNTRAINED_SEED = 20200309  # fixed so every untrained worker computes the same numbers


class ModelError(AnalysisError):
    """The model cannot be used; the message says what to do."""


class WeightsMissing(ModelError):
    """No checkpoint was configured and untrained weights were not allowed."""


class CheckpointError(ModelError):
    """The checkpoint is unreadable, fails its SHA-256 check or does not fit DenseNet-121."""


@dataclass(frozen=True)
class CheckpointMetadata:
    """What a checkpoint says about itself; stored as safetensors string metadata."""

    name: str
    version: str
    trained_on: str
    created: str  # ISO 8601 date
    input_size: int = paper.INPUT_SIZE
    window_width: float = paper.LUNG_WINDOW_WIDTH
    window_level: float = paper.LUNG_WINDOW_LEVEL
    threshold: float = paper.THRESHOLD
    trim_fraction: float = paper.TRIM_FRACTION
    # JSON object: how the weights were chosen and scored (epoch, validation AUC, recipe).
    # Optional on load, so checkpoints written before it existed still load.
    metrics: str = "{}"

    def to_strings(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_strings(cls, values: dict[str, str], *, source: Path) -> CheckpointMetadata:
        missing = [f.name for f in fields(cls) if f.name not in values and f.name != "metrics"]
        if missing:
            raise CheckpointError(f"checkpoint {source} lacks metadata {', '.join(missing)}")
        try:
            return cls(
                name=values["name"],
                version=values["version"],
                trained_on=values["trained_on"],
                created=values["created"],
                input_size=int(values["input_size"]),
                window_width=float(values["window_width"]),
                window_level=float(values["window_level"]),
                threshold=float(values["threshold"]),
                trim_fraction=float(values["trim_fraction"]),
                metrics=values.get("metrics", "{}"),
            )
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {source} has malformed metadata: {exc}") from exc


@dataclass(frozen=True)
class LoadedModel:
    """A DenseNet-121 ready for inference: eval mode, on ``device``, with what it is."""

    module: nn.Module
    info: ModelInfo
    metadata: CheckpointMetadata
    device: torch.device
    bf16: bool  # run the forward under bf16 autocast
    # NHWC tensors: faster on CUDA, and measured ~1.5x faster than NCHW on this AVX2 CPU too.
    channels_last: bool = True
    # The reference of the checkpoint's training inputs (``worker.method.domain``); None: no
    # domain scores (no reference beside the checkpoint, or one for other weights).
    domain: DomainReference | None = None


def build_densenet121(*, num_classes: int = NUM_CLASSES, seed: int | None = None) -> nn.Module:
    """torchvision's DenseNet-121 (four dense blocks) with a ``num_classes`` classifier.

    With ``seed`` the initial weights are deterministic and the global RNG is left untouched.
    """
    if seed is None:
        return densenet121(weights=None, num_classes=num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return densenet121(weights=None, num_classes=num_classes)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: Path, model: nn.Module, *, metadata: CheckpointMetadata) -> str:
    """Write ``path`` (safetensors + metadata) and its ``.sha256`` sidecar; return the hash."""
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata.to_strings())
    digest = file_sha256(path)
    sidecar_path(path).write_text(f"{digest}  {path.name}\n", encoding="ascii")
    return digest


def load_model(
    path: Path | None,
    *,
    allow_untrained: bool,
    device: str | None = None,
    bf16: bool | None = None,
    compile_features: bool = False,
) -> LoadedModel:
    """Load a checked checkpoint, or deterministic untrained weights when allowed.

    ``device`` defaults to CUDA when available, else CPU; ``bf16`` defaults to what the device
    does natively. ``compile_features`` wraps the feature extractor in ``torch.compile`` (the
    classifier and the CAM stay eager: they are tiny). Raises :class:`WeightsMissing` or
    :class:`CheckpointError` (both :class:`ModelError`).
    """
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    domain: DomainReference | None = None
    if path is None or not path.exists():
        module, metadata, info = _untrained(path, allow_untrained=allow_untrained)
        log.info("untrained weights have no domain reference: domain scores are not computed")
    else:
        module, metadata, info = _from_checkpoint(path)
        domain = load_reference(path, info.sha256)
    use_bf16 = native_bf16(target) if bf16 is None else bf16
    module = module.to(target).to(memory_format=torch.channels_last)
    module.eval()
    if compile_features:
        network = cast(DenseNet, module)
        network.features = cast(nn.Sequential, torch.compile(network.features))
    log.info(
        "model %s %s on %s (bf16=%s, channels_last, compiled=%s)",
        info.name, info.version, target, use_bf16, compile_features,
    )  # fmt: skip
    return LoadedModel(module, info, metadata, target, use_bf16, channels_last=True, domain=domain)


def _untrained(
    path: Path | None, *, allow_untrained: bool
) -> tuple[nn.Module, CheckpointMetadata, ModelInfo]:
    if not allow_untrained:
        where = "no checkpoint configured" if path is None else f"checkpoint {path} not found"
        raise WeightsMissing(
            f"{where}: set HRCT_MODEL_PATH to a checkpoint (with its .sha256 sidecar), or set "
            "HRCT_ALLOW_UNTRAINED=1 to run with untrained weights (results are meaningless)"
        )
    if path is not None:
        log.warning("checkpoint %s not found; using UNTRAINED weights as allowed", path)
    metadata = CheckpointMetadata(
        name=MODEL_NAME,
        version=f"untrained-seed{UNTRAINED_SEED}",
        trained_on="nothing: untrained random weights, for plumbing tests only",
        created="",
    )
    return (
        build_densenet121(seed=UNTRAINED_SEED),
        metadata,
        model_info(metadata, sha256=None, untrained=True),
    )


def _from_checkpoint(path: Path) -> tuple[nn.Module, CheckpointMetadata, ModelInfo]:
    digest = _verified_sha256(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file: {exc}"
        ) from exc
    metadata = CheckpointMetadata.from_strings(raw_metadata, source=path)
    module = build_densenet121()
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit DenseNet-121: {exc}") from exc
    untrained = "untrained" in metadata.version.lower()
    return module, metadata, model_info(metadata, sha256=digest, untrained=untrained)


def _verified_sha256(path: Path) -> str:
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        raise CheckpointError(
            f"checkpoint {path} has no {sidecar.name}; write it with "
            f"`sha256sum {path.name} > {sidecar.name}` once you trust the file"
        )
    parts = sidecar.read_text(encoding="ascii", errors="replace").split()
    expected = parts[0].lower() if parts else ""
    if len(expected) != 64:
        raise CheckpointError(f"{sidecar} does not hold a SHA-256 hex digest")
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} fails its SHA-256 check (expected {expected}, got {actual}): "
            "the file is damaged or not the one that was released"
        )
    return actual


def model_info(metadata: CheckpointMetadata, *, sha256: str | None, untrained: bool) -> ModelInfo:
    """What the outputs say about the weights: ``metadata`` and the file's digest (None: not
    loaded from a file)."""
    return ModelInfo(
        name=metadata.name,
        version=metadata.version,
        sha256=sha256,
        untrained=untrained,
        trained_on=metadata.trained_on,
        input_size=metadata.input_size,
        window_width=metadata.window_width,
        window_level=metadata.window_level,
    )


def native_bf16(device: torch.device) -> bool:
    """True where bf16 autocast runs in hardware on ``device`` (fast), not emulated (slow)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_supports_bf16()


def cpu_supports_bf16() -> bool:
    """True when the CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16)."""
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AVX512" not in capability:
        return False  # torch's kernels would not use bf16 instructions here
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
