"""Make pydicom's writer do its ambiguous-VR pass once per object, not once per item.

``pydicom.filewriter.write_dataset`` runs ``correct_ambiguous_vr`` over a dataset *and all its
descendants* whenever the dataset was not read in the encoding being written - true of every
item built in memory - and then again for each nested item it writes. For the SR (~4,800 items
five levels deep, mostly the image library) that repeated walk was a sixth of the encoding time.

:func:`settle_encoding` runs the correction once over the whole tree, then marks each item as
already in the target encoding and character set, which is what the writer checks before
walking it. Items holding raw (still undecoded) elements are left unmarked: for them the writer
must convert the elements to re-encode their text, as it did before. The exception are sequences
``worker.outputs.sr_encoded`` made, ASCII and explicit VR little endian: in that encoding they are
written as they are. The bytes written are the same (tests/test_write_prep.py compares them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from pydicom import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.valuerep import AMBIGUOUS_VR, VR

from hrct_triage.worker.outputs.sr_encoded import is_pre_encoded

__all__ = ["settle_encoding"]


def settle_encoding(ds: Dataset, *, implicit_vr: bool, little_endian: bool) -> None:
    """Correct ambiguous VRs in ``ds`` once and mark its items as in the given encoding."""
    marked: list[Dataset] = []
    ambiguous = False
    as_they_are = not implicit_vr and little_endian  # the encoding of pre-encoded sequences
    stack = [ds]
    while stack:
        item = stack.pop()
        raw = False
        for element in item.elements():
            if element.is_raw:
                raw = raw or not (as_they_are and is_pre_encoded(element))
            elif element.VR == VR.SQ:
                stack.extend(cast(Iterable[Dataset], element.value))
            elif element.VR in AMBIGUOUS_VR:
                ambiguous = True
        if not raw:
            marked.append(item)
    if ambiguous:
        correct_ambiguous_vr(ds, little_endian)
    for item in marked:
        # pydicom compares the original character set with this private property; an item
        # without it (another pydicom) is left unmarked and simply walked as before.
        charset = getattr(item, "_character_set", None)
        if charset is not None:
            item.set_original_encoding(implicit_vr, little_endian, charset)
