"""The hospital's reference labels, imported from a CSV into ``reference_labels``: every row is
checked before any is written, so a file with one bad row changes nothing, and importing a
label again corrects it.

The CSV has a header naming its columns: ``study_uid`` and/or ``accession_number`` (at least one
per row), ``label`` (covid, other, normal or unknown; any case), optional ``reader`` and
``reported_at`` (ISO 8601 date or date and time; UTC when it names no zone).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from hrct_triage.common.errors import HrctTriageError
from hrct_triage.common.storage import InvalidUID, validate_uid
from hrct_triage.db.models import ReferenceLabel, Study

LABELS = ("covid", "other", "normal", "unknown")
COLUMNS = ("study_uid", "accession_number", "label", "reader", "reported_at")
_ACCESSION_MAX = 16  # DICOM SH, as Study.accession_number holds it
_READER_MAX = 64


class LabelImportError(HrctTriageError, ValueError):
    """A labels file that cannot be imported; ``problems`` lists each bad row by line number."""

    def __init__(self, source: str, problems: list[LabelProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{source}: {len(problems)} bad row(s), nothing imported: {lines}{more}")


@dataclass(frozen=True)
class LabelProblem:
    """What is wrong with one line of the file (line 1 is the header)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class LabelRow:
    """One checked row of the file."""

    line: int
    study_uid: str | None
    accession_number: str | None
    label: str
    reader: str | None
    reported_at: datetime | None


@dataclass
class ImportCounts:
    """What an import did: labels new to the worklist, corrected ones, ones already so."""

    new: int = 0
    corrected: int = 0
    unchanged: int = 0
    corrections: list[str] = field(default_factory=list)  # "line N: old -> new"

    def as_dict(self) -> dict[str, object]:
        return {
            "new": self.new,
            "corrected": self.corrected,
            "unchanged": self.unchanged,
            "corrections": self.corrections,
        }


# --- reading the file -----------------------------------------------------------------------


def read_label_file(path: Path) -> list[LabelRow]:
    """The rows of the file at ``path``, or LabelImportError with every bad row."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        problem = LabelProblem(0, f"cannot read: {error.strerror}")
        raise LabelImportError(str(path), [problem]) from None
    except UnicodeDecodeError as error:
        raise LabelImportError(
            str(path), [LabelProblem(0, f"not UTF-8 text (byte {error.start})")]
        ) from None
    return parse_labels(text, source=str(path))


def parse_labels(text: str, *, source: str = "labels") -> list[LabelRow]:
    """Check every row of CSV ``text``; LabelImportError lists all bad rows at once."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise LabelImportError(source, [LabelProblem(1, f"not CSV: {error}")]) from None
    if header is None or not any(cell.strip() for cell in header):
        raise LabelImportError(source, [LabelProblem(1, "empty file: no header")])
    names = [cell.strip().lower() for cell in header]
    problems = _header_problems(names)
    if problems:
        raise LabelImportError(source, problems)
    rows: list[LabelRow] = []
    try:
        for record in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in record):
                continue  # blank lines are allowed, e.g. at the end
            if len(record) != len(names):
                problems.append(
                    LabelProblem(line, f"{len(record)} fields, the header has {len(names)}")
                )
                continue
            row = _row(line, dict(zip(names, record, strict=True)), problems)
            if row is not None:
                rows.append(row)
    except csv.Error as error:
        problems.append(LabelProblem(reader.line_num, f"not CSV: {error}"))
    problems.extend(_duplicates(rows))
    if not rows and not problems:
        problems.append(LabelProblem(2, "no labels in the file"))
    if problems:
        raise LabelImportError(source, sorted(problems, key=lambda p: p.line))
    return rows


def _header_problems(names: list[str]) -> list[LabelProblem]:
    problems = []
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        problems.append(
            LabelProblem(1, f"unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(LabelProblem(1, f"column(s) named twice: {', '.join(repeated)}"))
    if "label" not in names:
        problems.append(LabelProblem(1, "no label column"))
    if "study_uid" not in names and "accession_number" not in names:
        problems.append(LabelProblem(1, "neither a study_uid nor an accession_number column"))
    return problems


def _row(line: int, cells: dict[str, str], problems: list[LabelProblem]) -> LabelRow | None:
    found: list[str] = []
    uid = cells.get("study_uid", "").strip() or None
    accession = cells.get("accession_number", "").strip() or None
    label = cells.get("label", "").strip().lower()
    reader = cells.get("reader", "").strip() or None
    if uid is None and accession is None:
        found.append("neither study_uid nor accession_number")
    if uid is not None:
        try:
            validate_uid(uid, "study_uid")
        except InvalidUID as error:
            found.append(str(error))
    if accession is not None and (len(accession) > _ACCESSION_MAX or "\\" in accession):
        found.append(f"accession_number longer than {_ACCESSION_MAX} characters or with a '\\'")
    if label not in LABELS:
        shown = repr(label[:20]) if label else "empty"
        found.append(f"label {shown} is not one of {', '.join(LABELS)}")
    if reader is not None and len(reader) > _READER_MAX:
        found.append(f"reader longer than {_READER_MAX} characters")
    reported_at = _moment(cells.get("reported_at", "").strip(), found)
    if found:
        problems.extend(LabelProblem(line, message) for message in found)
        return None
    return LabelRow(line, uid, accession, label, reader, reported_at)


def _moment(text: str, found: list[str]) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        found.append(f"reported_at {text[:32]!r} is not an ISO 8601 date or date and time")
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _duplicates(rows: Iterable[LabelRow]) -> list[LabelProblem]:
    """An identifier named on two lines: which label was meant is unknowable."""
    problems = []
    first_line: dict[tuple[str, str], int] = {}
    for row in rows:
        for kind, value in (
            ("study_uid", row.study_uid),
            ("accession_number", row.accession_number),
        ):
            if value is None:
                continue
            earlier = first_line.setdefault((kind, value), row.line)
            if earlier != row.line:
                problems.append(LabelProblem(row.line, f"{kind} also on line {earlier}"))
    return problems


# --- writing them ---------------------------------------------------------------------------


def import_labels(
    session: Session, rows: list[LabelRow], *, source: str, now: datetime
) -> ImportCounts:
    """Insert or correct every row inside the caller's transaction; LabelImportError (raised
    before anything is written) when a row contradicts the worklist or the labels held."""
    plans, problems = [], []
    corrected_by: dict[int, int] = {}  # held label id -> the line correcting it
    for row in rows:
        try:
            held = _existing(session, row)
        except _Contradiction as error:
            problems.append(LabelProblem(row.line, str(error)))
            continue
        if held is not None:
            earlier = corrected_by.setdefault(held.id, row.line)
            if earlier != row.line:
                problems.append(
                    LabelProblem(row.line, f"names the same imported label as line {earlier}")
                )
                continue
        plans.append((row, held))
    if problems:
        raise LabelImportError(source, problems)
    counts = ImportCounts()
    for row, held in plans:
        origin = f"{source}:{row.line}"
        if held is None:
            session.add(
                ReferenceLabel(
                    study_uid=row.study_uid,
                    accession_number=row.accession_number,
                    label=row.label,
                    reader=row.reader,
                    reported_at=row.reported_at,
                    imported_at=now,
                    source=origin,
                )
            )
            counts.new += 1
            continue
        before = (held.label, held.reader, held.reported_at)
        if before == (row.label, row.reader, row.reported_at) and (
            row.study_uid in (None, held.study_uid)
            and row.accession_number in (None, held.accession_number)
        ):
            counts.unchanged += 1
            continue
        if held.label != row.label:
            counts.corrections.append(f"line {row.line}: {held.label} -> {row.label}")
        held.study_uid = row.study_uid or held.study_uid
        held.accession_number = row.accession_number or held.accession_number
        held.label, held.reader, held.reported_at = row.label, row.reader, row.reported_at
        held.imported_at, held.source = now, origin
        counts.corrected += 1
    session.flush()
    return counts


class _Contradiction(ValueError):
    pass


def _existing(session: Session, row: LabelRow) -> ReferenceLabel | None:
    """The label row this one corrects, if any; _Contradiction when its two identifiers name
    different studies or different labels already held."""
    if row.study_uid is not None and row.accession_number is not None:
        for study_uid, accession in session.execute(
            select(Study.study_uid, Study.accession_number).where(
                or_(
                    Study.study_uid == row.study_uid, Study.accession_number == row.accession_number
                )
            )
        ):
            if study_uid == row.study_uid and accession not in (None, row.accession_number):
                raise _Contradiction(
                    f"the worklist's study {row.study_uid} has another accession_number"
                )
            if study_uid != row.study_uid:
                raise _Contradiction(
                    f"accession_number {row.accession_number} belongs to another study "
                    "in the worklist"
                )
    conditions = []
    if row.study_uid is not None:
        conditions.append(ReferenceLabel.study_uid == row.study_uid)
    if row.accession_number is not None:
        conditions.append(ReferenceLabel.accession_number == row.accession_number)
    held = list(session.scalars(select(ReferenceLabel).where(or_(*conditions))))
    if len(held) > 1:
        raise _Contradiction(
            "study_uid and accession_number match two different labels already imported"
        )
    if not held:
        return None
    label = held[0]
    if (
        row.study_uid is not None
        and label.study_uid is not None
        and label.study_uid != row.study_uid
    ) or (
        row.accession_number is not None
        and label.accession_number is not None
        and label.accession_number != row.accession_number
    ):
        raise _Contradiction(
            "an imported label has this identifier with a different "
            + (
                "study_uid"
                if row.study_uid and label.study_uid != row.study_uid
                else "accession_number"
            )
        )
    return label
