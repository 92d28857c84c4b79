"""The SR classes a stored SR document can be written in, and the document rewritten for one.

Our SR is built as a Comprehensive 3D SR, but its TID 1500 content holds no 3D coordinates, so a
PACS that does not store that class can get the same content as a Comprehensive SR or, where
the content meets its stricter constraints, an Enhanced SR. Which classes fit is decided from
the content itself (value types, relationships, by-reference links) against the constraint
tables of PS3.3 A.35.3 (Comprehensive SR) and A.35.2 (Enhanced SR). The tables below are a
subset of the standard's, never a superset: a row left out only forgoes a fallback, it never
lets an invalid object out.

A rewritten document differs from the stored one in its SOP Class UID and SOP Instance UID
only: both IODs hold the same modules as ours (Comprehensive 3D SR adds Enhanced General
Equipment, whose attributes are all allowed in General Equipment). Its UID is derived from the
stored one and the class, so rewriting it again gives the same object.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydicom import DataElement, Dataset, dcmread
from pydicom.uid import UID

from hrct_triage.common.sop_classes import (
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    ENHANCED_SR,
    SR_CLASSES,
    sop_class_name,
)
from hrct_triage.worker.outputs.files import write_output
from hrct_triage.worker.outputs.uids import sr_uid_for_class

_ANY = frozenset(
    {
        "TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME", "SCOORD",
        "SCOORD3D", "TCOORD", "COMPOSITE", "IMAGE", "WAVEFORM", "CONTAINER", "TABLE",
    }
)  # fmt: skip
# PS3.3 A.35.3.3.1.1 and A.35.2.3.1.1: both IODs allow the same value types, none 3D.
_VALUE_TYPES = frozenset(
    {
        "TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME", "SCOORD",
        "TCOORD", "COMPOSITE", "IMAGE", "WAVEFORM", "CONTAINER",
    }
)  # fmt: skip
_LEAF = frozenset({"TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME"})
_REFERENCES = frozenset({"COMPOSITE", "IMAGE", "WAVEFORM"})
_COORDINATES = frozenset({"SCOORD", "TCOORD"})

_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018

# (source value types, relationship type, target value types): one row of a constraint table.
_Row = tuple[frozenset[str], str, frozenset[str]]

# PS3.3 Table A.35.2-2, Enhanced SR.
_ENHANCED_ROWS: tuple[_Row, ...] = (
    (frozenset({"CONTAINER"}), "CONTAINS", _VALUE_TYPES),
    (frozenset({"CONTAINER"}), "HAS OBS CONTEXT", _LEAF | {"COMPOSITE"}),
    (frozenset({"CONTAINER", "IMAGE", "WAVEFORM", "COMPOSITE", "NUM"}), "HAS ACQ CONTEXT", _LEAF),
    (_ANY, "HAS CONCEPT MOD", frozenset({"TEXT", "CODE"})),
    (frozenset({"TEXT", "CODE", "NUM"}), "HAS PROPERTIES", _LEAF | _REFERENCES | _COORDINATES),
    (frozenset({"TEXT", "CODE", "NUM"}), "INFERRED FROM", _LEAF | _REFERENCES | _COORDINATES),
    (frozenset({"SCOORD"}), "SELECTED FROM", frozenset({"IMAGE"})),
    (frozenset({"TCOORD"}), "SELECTED FROM", frozenset({"SCOORD", "IMAGE", "WAVEFORM"})),
)

# PS3.3 Table A.35.3-2, Comprehensive SR: wider observation and acquisition context, and
# containers as properties.
_COMPREHENSIVE_ROWS: tuple[_Row, ...] = (
    (frozenset({"CONTAINER"}), "CONTAINS", _VALUE_TYPES),
    (frozenset({"TEXT", "CODE", "NUM", "CONTAINER"}), "HAS OBS CONTEXT", _LEAF | {"COMPOSITE"}),
    (frozenset({"CONTAINER"}), "HAS OBS CONTEXT", frozenset({"CONTAINER"})),
    (
        frozenset({"CONTAINER", "IMAGE", "WAVEFORM", "COMPOSITE", "NUM"}),
        "HAS ACQ CONTEXT",
        _LEAF | {"CONTAINER"},
    ),
    (_ANY, "HAS CONCEPT MOD", frozenset({"TEXT", "CODE"})),
    (
        frozenset({"TEXT", "CODE", "NUM"}),
        "HAS PROPERTIES",
        _LEAF | _REFERENCES | _COORDINATES | {"CONTAINER"},
    ),
    (
        frozenset({"TEXT", "CODE", "NUM"}),
        "INFERRED FROM",
        _LEAF | _REFERENCES | _COORDINATES | {"CONTAINER"},
    ),
    (frozenset({"SCOORD"}), "SELECTED FROM", frozenset({"IMAGE"})),
    (frozenset({"TCOORD"}), "SELECTED FROM", frozenset({"SCOORD", "IMAGE", "WAVEFORM"})),
)

# Relationships Comprehensive SR allows by-reference (HAS CONCEPT MOD and CONTAINS of a
# CONTAINER are by-value only); Enhanced SR allows none.
_BY_REFERENCE = frozenset(
    {"CONTAINS", "HAS OBS CONTEXT", "HAS ACQ CONTEXT", "HAS PROPERTIES", "INFERRED FROM",
     "SELECTED FROM"}
)  # fmt: skip

_RULES: dict[str, tuple[tuple[_Row, ...], frozenset[str]]] = {
    COMPREHENSIVE_SR: (_COMPREHENSIVE_ROWS, _BY_REFERENCE),
    ENHANCED_SR: (_ENHANCED_ROWS, frozenset()),
}


def content_problems(sr: Dataset, sop_class: str) -> list[str]:
    """Why the content of ``sr`` cannot be written as ``sop_class`` (empty: it can).

    Comprehensive 3D SR allows whatever the other two do and 3D coordinates besides, so a
    document of ours always fits it.
    """
    if sop_class == COMPREHENSIVE_3D_SR:
        return []
    if sop_class not in _RULES:
        raise ValueError(f"sop_class: {sop_class} is not an SR class we write")
    rows, by_reference = _RULES[sop_class]
    name = sop_class_name(sop_class)
    problems: list[str] = []
    for path, parent, item in _relationships(sr):
        relationship = str(item.get("RelationshipType", ""))
        if "ReferencedContentItemIdentifier" in item:
            target = _referenced(sr, item.ReferencedContentItemIdentifier)
            if (
                relationship not in by_reference
                or target is None
                or (relationship == "CONTAINS" and target.get("ValueType") == "CONTAINER")
            ):
                problems.append(f"{name} allows no {relationship} by reference (item {path})")
                continue
        else:
            target = item
        source_type = str(parent.get("ValueType", ""))
        target_type = str(target.get("ValueType", ""))
        if target_type not in _VALUE_TYPES:
            problems.append(f"{name} has no value type {target_type} (item {path})")
        elif not _allowed(rows, source_type, relationship, target_type):
            problems.append(
                f"{name} allows no {source_type} {relationship} {target_type} (item {path})"
            )
    return problems


def writable_classes(sr: Dataset) -> tuple[str, ...]:
    """The SR classes ``sr`` can be sent as, most specific first: its own, then each less
    specific one its content fits."""
    own = str(sr.SOPClassUID)
    if own not in SR_CLASSES:
        raise ValueError(f"sr: SOP Class {own} is not an SR class we write")
    lower = SR_CLASSES[SR_CLASSES.index(own) + 1 :]
    return (own, *(c for c in lower if not content_problems(sr, c)))


def as_class(sr: Dataset, sop_class: str) -> Dataset:
    """``sr`` written as ``sop_class``: same content, its own class and derived UID."""
    own = str(sr.SOPClassUID)
    if own == sop_class:
        return sr
    if own not in SR_CLASSES or sop_class not in SR_CLASSES[SR_CLASSES.index(own) :]:
        raise ValueError(
            f"sop_class: an SR stored as {sop_class_name(own)} is written only in less specific "
            f"classes, not {sop_class_name(sop_class)}"
        )
    problems = content_problems(sr, sop_class)
    if problems:
        raise ValueError(f"sop_class: {'; '.join(problems[:3])}")
    uid = sr_uid_for_class(str(sr.SOPInstanceUID), sop_class)
    rewritten = Dataset(dict(sr.items()))  # shares the unchanged elements, not the dict
    implicit_vr, little_endian = sr.original_encoding
    if implicit_vr is not None and little_endian is not None:
        rewritten.set_original_encoding(implicit_vr, little_endian, sr.original_character_set)
    rewritten[_SOP_CLASS_UID] = DataElement(_SOP_CLASS_UID, "UI", sop_class)
    rewritten[_SOP_INSTANCE_UID] = DataElement(_SOP_INSTANCE_UID, "UI", uid)
    rewritten.file_meta = copy.deepcopy(sr.file_meta)
    rewritten.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    rewritten.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    rewritten.preamble = sr.preamble
    return rewritten


def write_as_class(path: Path, sop_class: str) -> Path:
    """The stored SR at ``path`` written beside it as ``sop_class`` (durably, named by its UID);
    ``path`` itself when it already is of that class."""
    sr = dcmread(path)
    if str(sr.SOPClassUID) == sop_class:
        return path
    return write_output(as_class(sr, sop_class), path.parent)


def _relationships(sr: Dataset) -> Iterator[tuple[str, Dataset, Dataset]]:
    """Every (position, parent, child) of the content tree, position as in PS3.3 C.17.3.2.5
    (the root is 1, its first child 1.1)."""
    stack: list[tuple[str, Dataset]] = [("1", sr)]
    while stack:
        path, parent = stack.pop()
        for index, child in enumerate(parent.get("ContentSequence", []), start=1):
            child_path = f"{path}.{index}"
            yield child_path, parent, child
            stack.append((child_path, child))


def _referenced(sr: Dataset, identifier: Sequence[int] | int) -> Dataset | None:
    """The item a by-reference relationship points at, or None when it points nowhere."""
    steps = [int(identifier)] if isinstance(identifier, int) else [int(i) for i in identifier]
    if not steps or steps[0] != 1:
        return None
    item = sr
    for step in steps[1:]:
        children = item.get("ContentSequence", [])
        if not 1 <= step <= len(children):
            return None
        item = children[step - 1]
    return item


def _allowed(rows: Sequence[_Row], source: str, relationship: str, target: str) -> bool:
    return any(
        source in sources and relationship == kind and target in targets
        for sources, kind, targets in rows
    )
