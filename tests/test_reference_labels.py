"""Reference labels imported from a CSV (db.reference_labels, ``hrct-triage labels import``), on
SQLite and PostgreSQL: a good file, a file with bad rows (nothing imported, every bad row named
by line), and a corrected file imported again.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from hrct_triage.cli.app import app
from hrct_triage.db.models import ReferenceLabel, Study, StudyStatus
from hrct_triage.db.reference_labels import (
    ImportCounts,
    LabelImportError,
    import_labels,
    parse_labels,
    read_label_file,
)
from hrct_triage.db.session import transaction

NOW = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
GOOD = """study_uid,accession_number,label,reader,reported_at
1.2.826.0.1.1,,COVID ,dr a,2026-05-01
,ACC2,normal,dr b,2026-05-01T10:30:00+02:00
1.2.826.0.1.3,ACC3,other,,
1.2.826.0.1.4,,Unknown,,
"""


def _labels(sessions: sessionmaker[Session]) -> dict[str, tuple[str, str | None, str | None]]:
    with transaction(sessions) as session:
        return {
            (row.study_uid or row.accession_number or ""): (row.label, row.reader, row.source)
            for row in session.scalars(select(ReferenceLabel))
        }


def _import(sessions: sessionmaker[Session], text: str, source: str = "labels.csv") -> ImportCounts:
    rows = parse_labels(text, source=source)
    with transaction(sessions) as session:
        return import_labels(session, rows, source=source, now=NOW)


def test_good_file_is_imported_with_labels_normalised(sessions: sessionmaker[Session]) -> None:
    counts = _import(sessions, GOOD)
    assert counts.as_dict() == {"new": 4, "corrected": 0, "unchanged": 0, "corrections": []}
    held = _labels(sessions)
    assert held == {
        "1.2.826.0.1.1": ("covid", "dr a", "labels.csv:2"),
        "ACC2": ("normal", "dr b", "labels.csv:3"),
        "1.2.826.0.1.3": ("other", None, "labels.csv:4"),
        "1.2.826.0.1.4": ("unknown", None, "labels.csv:5"),
    }
    with transaction(sessions) as session:
        acc2 = session.scalars(
            select(ReferenceLabel).where(ReferenceLabel.accession_number == "ACC2")
        ).one()
        # a stated zone is kept (as UTC); a date alone is midnight UTC
        assert acc2.reported_at == datetime(2026, 5, 1, 8, 30, tzinfo=UTC)


def test_bad_rows_are_all_named_and_nothing_is_imported(
    sessions: sessionmaker[Session],
) -> None:
    bad = (
        "study_uid,accession_number,label,reader,reported_at\n"
        "1.2.826.0.1.1,,covid,,\n"  # line 2: good
        "1.2.826.0.1.2,,maybe,,\n"  # line 3: unknown label
        ",,covid,,\n"  # line 4: no identifier
        "1.2.08,,normal,,\n"  # line 5: invalid UID (zero-padded component)
        "1.2.826.0.1.6,,normal,,yesterday\n"  # line 6: bad date
        "1.2.826.0.1.1,,normal,,\n"  # line 7: duplicate of line 2
        ",ACCESSION_NUMBER_TOO_LONG,other,,\n"  # line 8: accession longer than 16
        f"{'1.' * 40}1,,other,,\n"  # line 9: UID longer than 64
        "1.2.826.0.1.10,,other\n"  # line 10: a field short
    )
    with pytest.raises(LabelImportError) as raised:
        parse_labels(bad, source="bad.csv")
    lines = [problem.line for problem in raised.value.problems]
    assert lines == [3, 4, 5, 6, 7, 8, 9, 10]
    messages = {problem.line: problem.message for problem in raised.value.problems}
    assert "maybe" in messages[3] and "covid, other, normal, unknown" in messages[3]
    assert "neither" in messages[4]
    assert "not a valid UID" in messages[5]
    assert "ISO 8601" in messages[6]
    assert "also on line 2" in messages[7]
    assert "16" in messages[8]
    assert "longer than 64" in messages[9]
    assert "fields" in messages[10]
    assert "bad.csv" in str(raised.value) and "nothing imported" in str(raised.value)
    assert _labels(sessions) == {}


def test_bad_header_is_refused(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(LabelImportError) as raised:
        parse_labels("uid,diagnosis\n1.2.3,covid\n")
    assert [p.line for p in raised.value.problems] == [1, 1, 1]
    with pytest.raises(LabelImportError, match="no labels"):
        parse_labels("study_uid,label\n\n")
    with pytest.raises(LabelImportError, match="empty file"):
        parse_labels("")


def test_reimport_corrects_and_counts(sessions: sessionmaker[Session]) -> None:
    _import(sessions, GOOD, source="first.csv")
    corrected = GOOD.replace("COVID ,dr a", "other,dr c").replace(",ACC2,normal", ",ACC2,covid")
    counts = _import(sessions, corrected, source="second.csv")
    assert counts.as_dict() == {
        "new": 0,
        "corrected": 2,
        "unchanged": 2,
        "corrections": ["line 2: covid -> other", "line 3: normal -> covid"],
    }
    held = _labels(sessions)
    assert held["1.2.826.0.1.1"] == ("other", "dr c", "second.csv:2")
    assert held["ACC2"] == ("covid", "dr b", "second.csv:3")
    assert held["1.2.826.0.1.3"] == ("other", None, "first.csv:4")  # unchanged: left as it was


def test_a_label_naming_its_study_both_ways_is_completed_not_duplicated(
    sessions: sessionmaker[Session],
) -> None:
    _import(sessions, "accession_number,label\nACC9,covid\n")
    _import(sessions, "study_uid,accession_number,label\n1.2.826.0.1.9,ACC9,covid\n")
    with transaction(sessions) as session:
        rows = session.scalars(select(ReferenceLabel)).all()
        assert [(r.study_uid, r.accession_number) for r in rows] == [("1.2.826.0.1.9", "ACC9")]


def test_identifiers_contradicting_the_worklist_or_held_labels_import_nothing(
    sessions: sessionmaker[Session],
) -> None:
    with transaction(sessions) as session:
        session.add(
            Study(study_uid="1.2.826.0.2.1", accession_number="REAL1", status=StudyStatus.DONE)
        )
    _import(sessions, "study_uid,accession_number,label\n1.2.826.0.2.5,ACC5,normal\n")
    contradicting = (
        "study_uid,accession_number,label\n"
        "1.2.826.0.2.7,,covid\n"  # line 2: good, new
        "1.2.826.0.2.1,WRONG,covid\n"  # line 3: the study has accession REAL1
        "1.2.826.0.2.9,REAL1,covid\n"  # line 4: REAL1 is another study's
        "1.2.826.0.2.6,ACC5,covid\n"  # line 5: ACC5 is held with another UID
    )
    with pytest.raises(LabelImportError) as raised:
        _import(sessions, contradicting)
    assert [p.line for p in raised.value.problems] == [3, 4, 5]
    twice = "study_uid,accession_number,label\n1.2.826.0.2.5,,covid\n,ACC5,other\n"
    with pytest.raises(LabelImportError) as raised:  # one held label, corrected two ways
        _import(sessions, twice)
    assert [str(p) for p in raised.value.problems] == [
        "line 3: names the same imported label as line 2"
    ]
    assert set(_labels(sessions)) == {"1.2.826.0.2.5"}  # line 2 was not written either


def test_cli_imports_reports_and_refuses(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HRCT_DATABASE_URL", database_url)
    good = tmp_path / "reports.csv"
    good.write_text(GOOD, encoding="utf-8")
    first = CliRunner().invoke(app, ["labels", "import", str(good)])
    assert first.exit_code == 0, first.output
    assert "4 new" in first.output and "0 corrected" in first.output
    again = CliRunner().invoke(app, ["labels", "import", str(good)])
    assert again.exit_code == 0 and "4 unchanged" in again.output
    bad = tmp_path / "bad.csv"
    bad.write_text("study_uid,label\n1.2.3,covid\n1.2.4,flu\n", encoding="utf-8")
    refused = CliRunner().invoke(app, ["labels", "import", str(bad)])
    assert refused.exit_code == 1
    assert "nothing imported" in refused.output and "flu" in refused.output
    assert re.search(r"\b3\b[^\n]*flu", refused.output)  # the bad row by its line number
    binary = tmp_path / "latin1.csv"
    binary.write_bytes("study_uid,label,reader\n1.2.5,covid,Dr M\xfcller\n".encode("latin-1"))
    with pytest.raises(LabelImportError, match="not UTF-8"):
        read_label_file(binary)
