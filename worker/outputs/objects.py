"""The DICOM outputs of an analysis, built in memory: one TID 1500 SR and the heat-map SCs.

Callers file them through ``worker.outputs.write_outputs``; this module is the building step it
uses (and tests inspect). The builders live in ``worker.outputs.sr`` and ``worker.outputs.sc``;
their identity (UIDs, dates, equipment) in ``worker.outputs.uids``.

Contract, written once:
- Same ``StudyAnalysis`` (same study, analysed instances, model, threshold) and the same
  ``content_datetime`` => byte-identical objects with the same SOP Instance UIDs, so a
  redelivery sends the same objects. Take ``content_datetime`` from the worklist (the recorded
  analysis time), never from the clock at delivery.
- Another analysed set, model (version or weights) or threshold => new UIDs (a new object;
  pass the previous SR as ``predecessor`` to say it is superseded).
- Every object is in the source study, says "not for diagnostic use" in its series
  description, and passes ``dciodvfy`` without errors (tests/test_outputs.py checks this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from io import BytesIO

from pydicom import Dataset
from pydicom.uid import UID

from hrct_triage.common.settings import Settings, check_series_description
from hrct_triage.worker.method.results import StudyAnalysis
from hrct_triage.worker.outputs.sc import DEFAULT_SC_SERIES_DESCRIPTION, build_heatmap_scs
from hrct_triage.worker.outputs.sr import DEFAULT_SR_SERIES_DESCRIPTION, build_sr
from hrct_triage.worker.outputs.write_prep import settle_encoding

__all__ = ["SeriesLabels", "StudyOutputs", "build_outputs", "encode"]


@dataclass(frozen=True)
class SeriesLabels:
    """Series number and description of each output kind, as the site configures them.

    Every description must say "not for diagnostic use": checked here, at the edge, so no
    configuration can produce an output that reads like a diagnostic series.
    """

    sr_number: int = 9901
    sr_description: str = DEFAULT_SR_SERIES_DESCRIPTION
    sc_number: int = 9902
    sc_description: str = DEFAULT_SC_SERIES_DESCRIPTION

    def __post_init__(self) -> None:
        for name in ("sr_description", "sc_description"):
            try:
                check_series_description(getattr(self, name))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        for name in ("sr_number", "sc_number"):
            if not 1 <= getattr(self, name) <= 2**31 - 1:
                raise ValueError(f"{name}: must be a positive IS, got {getattr(self, name)}")

    @classmethod
    def from_settings(cls, settings: Settings) -> SeriesLabels:
        """The labels ``HRCT_SR_SERIES_*`` and ``HRCT_SC_SERIES_*`` ask for."""
        return cls(
            sr_number=settings.outputs.sr_series_number,
            sr_description=settings.outputs.sr_series_description,
            sc_number=settings.outputs.sc_series_number,
            sc_description=settings.outputs.sc_series_description,
        )

    def for_mode(self, mode: str) -> SeriesLabels:
        """These labels, with each description starting "SHADOW " for a result reached in shadow
        mode, so an object that strays from the QA archive says so; a description with no room
        for the word (64 characters) stays as configured."""
        if mode != "shadow":
            return self
        return replace(
            self,
            sr_description=_shadow(self.sr_description),
            sc_description=_shadow(self.sc_description),
        )


SHADOW_PREFIX = "SHADOW "


def _shadow(description: str) -> str:
    marked = f"{SHADOW_PREFIX}{description}"
    return marked if len(marked) <= 64 else description


@dataclass(frozen=True)
class StudyOutputs:
    """The objects to send for one analysis; ``all`` is the order to send them in."""

    sr: Dataset
    scs: list[Dataset]

    @property
    def all(self) -> list[Dataset]:
        """SCs first: a PACS that receives the SR can then already resolve its references."""
        return [*self.scs, self.sr]


def build_outputs(
    analysis: StudyAnalysis,
    headers: Sequence[Dataset],
    *,
    content_datetime: datetime,
    predecessor: Dataset | None = None,
    institution_name: str | None = None,
    labels: SeriesLabels = SeriesLabels(),
) -> StudyOutputs:
    """Heat-map SCs for ``analysis.heatmaps`` and the SR that lists them in its image library.

    ``headers`` are the source series' headers (no pixel data needed); they must cover every
    analysed slice and every heat-map slice.
    """
    by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in headers}
    scs = build_heatmap_scs(
        analysis,
        by_uid,
        content_datetime=content_datetime,
        series_number=labels.sc_number,
        series_description=labels.sc_description,
    )
    sr = build_sr(
        analysis,
        headers,
        scs,
        content_datetime=content_datetime,
        predecessor=predecessor,
        institution_name=institution_name,
        series_number=labels.sr_number,
        series_description=labels.sr_description,
    )
    return StudyOutputs(sr=sr, scs=scs)


def encode(ds: Dataset) -> bytes:
    """The Part 10 file bytes of ``ds`` (with file meta), as they are stored and compared.

    Marks ``ds`` and its items as being in the output's encoding (``worker.outputs.write_prep``),
    which changes nothing but how often pydicom re-checks them for ambiguous VRs.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if syntax and syntax.is_transfer_syntax and not syntax.is_deflated:
        settle_encoding(
            ds, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian
        )
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
