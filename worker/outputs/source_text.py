"""The source study's text in the outputs: decoded from whatever the scanner sent, written as UTF-8.

One rule for every output: the patient and study text of the source header is decoded
(``common.charsets`` resolves misspelt, unknown and missing Specific Character Sets) and the SR
and SC declare ``ISO_IR 192``. UTF-8 represents every character of every DICOM repertoire, so
a PACS shows the same name as on the source images, whatever the source's set, with no ISO 2022
escape sequences to get wrong; highdicom also refuses some sets scanners send (an empty first
value, a code extension on its own), which UTF-8 sidesteps.
"""

from __future__ import annotations

from pydicom import Dataset

from hrct_triage.common.charsets import decoded

__all__ = ["OUTPUT_CHARACTER_SET", "carry_study_text", "decoded_source"]

#: Specific Character Set of every output.
OUTPUT_CHARACTER_SET = "ISO_IR 192"


def decoded_source(header: Dataset) -> Dataset:
    """A copy of a source header whose text reads right (pass it to highdicom as the reference)."""
    return decoded(header)


def carry_study_text(output: Dataset, source: Dataset) -> None:
    """Copy the study's description, which highdicom's builders leave out, from ``source``.

    Study Description is General Study Module text a PACS shows beside the patient's name; the
    output is in the source's study, so it says what the source says.
    """
    description = source.get("StudyDescription")
    if description:
        output.StudyDescription = str(description)
