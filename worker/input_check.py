"""Whether what a study holds now changes what its analysis takes: late waves.

A scanner sends a study in waves: the images, then, minutes later, a reformat, a dose report, a
thin reconstruction, a resend. The input of an analysis is the series that series selection
(``worker.method.series``, the one definition of it) chooses and the exact instances of that
series (SOP Instance UID and content hash each), summed up in a digest. The worker compares
digests at two moments:

* a late wave's check (a study with a verdict, re-opened by new or changed instances and quiet
  again): the same input keeps the verdict, with its generation and outputs; another input
  starts a new generation, analysed at once;
* the end of an analysis during which instances arrived: the same input records the result;
  another input, or a series that selection would choose and is still arriving, records
  nothing and lets the study complete again, so that it is analysed once, on what it then holds.

The outcome is recorded in the transaction that read the instances last, under the study's
lock, so no instance is recorded between the look and the outcome; a look that finds the set
changed looks again, reading only the new headers. Each decision is an event that says what
arrived and why the study was or was not analysed again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy.orm import Session

from hrct_triage.common.settings import Settings
from hrct_triage.db import worklist
from hrct_triage.db.models import Study
from hrct_triage.worker.method.results import NotApplicable
from hrct_triage.worker.method.series import SelectedSeries, read_headers, select_from_headers

log = logging.getLogger("hrct.worker")

# Looks at a study's instances before the worker stops chasing a set that changes between its
# look and its record (a wave arriving right then) and lets the study complete again instead.
LOOKS = 5
# The input digest of a study in which no series fits for analysis.
NO_SERIES = hashlib.sha256(b"no series fit for analysis").hexdigest()

Transaction = Callable[[], AbstractContextManager[Session]]
Now = Callable[[], datetime]
# A header read before, by (path, content hash): a later look reads only what is new.
Known = Mapping[tuple[str, str], Dataset]


@dataclass(frozen=True)
class InputView:
    """A study's instances as the worker saw them, and what series selection made of them."""

    rows: tuple[worklist.InputRow, ...]
    known: Known
    selected: SelectedSeries | None
    reason: str | None  # why no series fits, when ``selected`` is None
    digest: str  # of the input: the chosen series and its instances (``NO_SERIES`` if none)
    fingerprint: str  # of every instance of the study (``worklist.instance_set_digest``)


def look(
    rows: Sequence[worklist.InputRow], *, min_slices: int, known: Known | None = None
) -> InputView:
    """Read the headers of ``rows`` (those not in ``known``) and select the series."""
    known = known or {}
    headers = {
        (row.path, row.sha256): known[row.path, row.sha256]
        for row in rows
        if (row.path, row.sha256) in known
    }
    fresh = {Path(row.path): row for row in rows if (row.path, row.sha256) not in headers}
    for path, header in read_headers(fresh):
        headers[fresh[path].path, fresh[path].sha256] = header
    selected, reason = _select(rows, headers, min_slices=min_slices)
    return InputView(
        rows=tuple(rows),
        known=headers,
        selected=selected,
        reason=reason,
        digest=input_digest(selected, rows),
        fingerprint=worklist.instance_set_digest(rows),
    )


def _select(
    rows: Sequence[worklist.InputRow], headers: Known, *, min_slices: int
) -> tuple[SelectedSeries | None, str | None]:
    pairs = [
        (Path(row.path), headers[row.path, row.sha256])
        for row in rows
        if (row.path, row.sha256) in headers
    ]
    try:
        return select_from_headers(pairs, min_slices=min_slices), None
    except NotApplicable as verdict:
        return None, verdict.reason


def input_digest(selected: SelectedSeries | None, rows: Sequence[worklist.InputRow]) -> str:
    """SHA-256 of the chosen series' UID and of each of its instances' UID and content hash."""
    if selected is None:
        return NO_SERIES
    chosen = {str(path) for path in selected.paths}
    lines = sorted(f"{r.sop_instance_uid}:{r.sha256}" for r in rows if str(Path(r.path)) in chosen)
    return hashlib.sha256("\n".join([selected.series_uid, *lines]).encode("ascii")).hexdigest()


def arriving_preferred(
    view: InputView, *, analysed_series_uid: str | None
) -> SelectedSeries | None:
    """The series selection would choose instead of ``analysed_series_uid`` if every series
    had enough slices: one that may still be arriving. None when there is none."""
    selected, _ = _select(view.rows, view.known, min_slices=1)
    if selected is None or selected.series_uid == analysed_series_uid:
        return None
    return selected


# --- what the events say ------------------------------------------------------------------------


def describe_series(series: SelectedSeries) -> str:
    """``series 2 'CHEST 1.0 LUNG' (40 slices, 1 mm, kernel LUNG)``, for an event."""
    first = series.headers[0]
    facts = [f"{series.slice_count} slices"]
    if series.slice_thickness is not None:
        facts.append(f"{series.slice_thickness:g} mm")
    if series.kernel:
        facts.append(f"kernel {series.kernel}")
    label = _series_label(first.get("SeriesNumber"), first.get("SeriesDescription"))
    return f"{label} ({', '.join(facts)})"


def describe_arrivals(late: Sequence[worklist.LateSeries]) -> str:
    """What a late wave brought, series by series, for an event."""
    if not late:
        return "no new or changed instance left"
    parts = []
    for series in late:
        counts = [f"{series.new} new"] if series.new else []
        counts += [f"{series.replaced} changed"] if series.replaced else []
        total = series.new + series.replaced
        kinds = ", ".join(UID(uid).name for uid in series.sop_classes)
        parts.append(
            f"{' and '.join(counts)} instance{'s' if total != 1 else ''} in "
            f"{_series_label(series.series_number, series.description)} "
            f"({series.modality or 'no modality'}; {kinds})"
        )
    return "; ".join(parts)


def describe_same(view: InputView) -> str:
    if view.selected is None:
        return "still no series fits for analysis"
    return f"series selection still chooses {describe_series(view.selected)}, the same instances"


def describe_change(view: InputView, *, before_series_uid: str | None) -> str:
    """Why ``view``'s input is not the one analysed before (``before_series_uid``: the series
    chosen then, None when none was)."""
    if view.selected is None:
        return f"no series fits for analysis any more ({view.reason})"
    now = describe_series(view.selected)
    if before_series_uid is None:
        return f"series selection now chooses {now}, where none fitted before"
    if view.selected.series_uid != before_series_uid:
        return f"series selection now chooses {now} instead of {_label_of(view, before_series_uid)}"
    return f"the analysed {now} has new or changed instances"


def _series_label(number: object, description: object) -> str:
    return f"series {number if number not in (None, '') else '?'} {str(description or '')!r}"


def _label_of(view: InputView, series_uid: str) -> str:
    for header in view.known.values():
        if str(header.get("SeriesInstanceUID", "")) == series_uid:
            return _series_label(header.get("SeriesNumber"), header.get("SeriesDescription"))
    return f"series {series_uid}"


# --- the two decisions --------------------------------------------------------------------------


def read_input(tx: Transaction, study_id: int, *, min_slices: int) -> InputView:
    """The study's instances now, and what series selection makes of them."""
    with tx() as session:
        rows = worklist.input_rows(session, study_id)
    return look(rows, min_slices=min_slices)


def check_late_wave(
    tx: Transaction, claim: worklist.Claim, view: InputView, *, min_slices: int, now: Now
) -> str | tuple[worklist.Claim, InputView]:
    """A late wave's check (``claim.analysed_input`` set): the study's state when the verdict
    stands, or the claim of the new generation to analyse and the input to analyse."""
    assert claim.analysed_input is not None
    for _ in range(LOOKS):
        if view.digest != claim.analysed_input:
            return _start_generation(tx, claim, view, now=now)
        with tx() as session:
            rows = worklist.held_input_rows(session, claim)
            if rows is None:
                return "ignored"
            if worklist.instance_set_digest(rows) == view.fingerprint:
                study = session.get(Study, claim.study_id)
                assert study is not None
                arrivals = _arrivals(session, study)
                detail = (
                    f"late wave: {arrivals}; {describe_same(view)}: not analysed again, "
                    f"generation {claim.generation} stands"
                )
                worklist.keep_verdict(session, claim, detail=detail, now=now())
                log.info("study %d: %s", claim.study_id, detail, extra=_context(claim))
                return study.status
        view = look(rows, min_slices=min_slices, known=view.known)
    return _reopen(
        tx,
        claim,
        "instances kept arriving during the late wave's check; checked again once they settle",
        now=now,
    )


def _start_generation(
    tx: Transaction, claim: worklist.Claim, view: InputView, *, now: Now
) -> str | tuple[worklist.Claim, InputView]:
    with tx() as session:
        study = session.get(Study, claim.study_id)
        assert study is not None
        before = study.analysed_series_uid if claim.analysed_input != NO_SERIES else None
        detail = (
            f"late wave: {_arrivals(session, study)}; "
            f"{describe_change(view, before_series_uid=before)}: analysed again as generation "
            f"{claim.generation + 1}"
        )
        started = worklist.start_generation(session, claim, detail=detail, now=now())
    if started is None:
        return "ignored"
    log.info("study %d: %s", claim.study_id, detail, extra=_context(claim))
    return started, view


def record_if_unchanged(
    tx: Transaction,
    claim: worklist.Claim,
    view: InputView,
    record: Callable[[Session], str],
    *,
    settings: Settings,
    now: Now,
) -> str:
    """Run ``record`` (the claim's outcome; it returns the study's state) in a transaction that
    finds the study's instances as ``view`` saw them.

    Instances that arrived meanwhile are looked at: if the input is the same and no series
    that selection would prefer is still arriving, the outcome is recorded all the same;
    otherwise nothing is, and the study completes again once they settle.
    """
    for _ in range(LOOKS):
        with tx() as session:
            rows = worklist.held_input_rows(session, claim)
            if rows is None:
                return "ignored"
            if worklist.instance_set_digest(rows) == view.fingerprint:
                return record(session)
            study = session.get(Study, claim.study_id)
            assert study is not None
            calling_ae = study.calling_ae
        newer = look(rows, min_slices=settings.analysis.min_slices, known=view.known)
        why = _why_not_record(
            tx, claim, view, newer, settings.listener.quiet_seconds_for(calling_ae), now
        )
        if why is not None:
            return _reopen(tx, claim, why, now=now, during=True)
        view = newer
    return _reopen(tx, claim, "instances kept arriving", now=now, during=True)


def _why_not_record(
    tx: Transaction,
    claim: worklist.Claim,
    view: InputView,
    newer: InputView,
    quiet_seconds: float,
    now: Now,
) -> str | None:
    analysed = view.selected.series_uid if view.selected is not None else None
    if newer.digest != view.digest:
        return describe_change(newer, before_series_uid=analysed)
    with tx() as session:
        settled = worklist.wave_settled(
            session, claim.study_id, quiet_seconds=quiet_seconds, now=now()
        )
    if settled:
        return None
    preferred = arriving_preferred(newer, analysed_series_uid=analysed)
    if preferred is None:
        return None
    return f"{describe_series(preferred)} is still arriving and would be chosen once complete"


def _reopen(
    tx: Transaction, claim: worklist.Claim, why: str, *, now: Now, during: bool = False
) -> str:
    with tx() as session:
        study = session.get(Study, claim.study_id)
        assert study is not None
        detail = (
            f"during the analysis: {_arrivals(session, study)}; {why}; its result is not "
            "recorded, the study is analysed once they settle"
            if during
            else why
        )
        if not worklist.reopen(session, claim, detail=detail, now=now()):
            return "ignored"
    log.info("study %d: %s", claim.study_id, detail, extra=_context(claim))
    return "receiving"


def _arrivals(session: Session, study: Study) -> str:
    if study.reopened_at is None:
        return "new or changed instances"
    return describe_arrivals(worklist.late_arrivals(session, study.id, since=study.reopened_at))


def _context(claim: worklist.Claim) -> dict[str, object]:
    return {"study_id": claim.study_id, "study_uid": claim.study_uid}
