"""The project's exception family: one root, one class per subsystem edge.

A caller that must not crash on anything of ours (a CLI command, a Celery task, a DICOM handler)
catches the subsystem's class, or :class:`HrctTriageError` for all of them; everything inside a
subsystem raises plain built-in errors, which the edge turns into one of these or into a status.
"""

from __future__ import annotations


class HrctTriageError(Exception):
    """Root of every exception this project raises on purpose."""


class ConfigurationError(HrctTriageError):
    """A setting or an installation that cannot work (bad value, missing tool or platform)."""


class DicomInputError(HrctTriageError, ValueError):
    """Bytes or attributes from the network or a file that are not what DICOM says they are."""


class ListenerError(HrctTriageError):
    """The listener could not start, or a peer broke the protocol."""


class AnalysisError(HrctTriageError):
    """The method could not analyse a study (no fitting series, unusable weights)."""


class PhantomError(HrctTriageError):
    """A phantom study could not be written as asked."""
