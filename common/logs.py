"""Log set-up shared by every process (listener, dispatcher, workers): text or JSON lines.

JSON lines are for log shippers (Loki, Elasticsearch): one object per line with ``time``,
``level``, ``logger``, ``message`` and, when the call site gave them with ``extra=``, the context
fields in ``CONTEXT_FIELDS``. Only those names are copied from ``extra``: a field that is not on the
list never reaches the output, so a careless ``extra={"dataset": ...}`` cannot leak patient
identifiers. The code never logs PatientName, PatientID or PatientBirthDate in the first place
(the listener does not even decode them); ``tests/test_logs.py`` checks that over a real C-STORE.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Protocol

# Context a call site may attach with ``extra=``; each is an identifier of the gateway's own
# objects (study and association rows, UIDs), never a patient attribute.
CONTEXT_FIELDS = ("study_uid", "study_id", "association", "status", "reason_kind")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LogSettings(Protocol):
    @property
    def log_format(self) -> str: ...


class JsonFormatter(logging.Formatter):
    """One JSON object per record; exceptions as a single ``exception`` string field."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    """The formatter for ``HRCT_LOG_FORMAT``; an unknown name is a bug in the caller."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log_format {log_format!r} is neither 'text' nor 'json'")


class _GatewayHandler(logging.StreamHandler):
    """Marks the handler ``configure_logging`` installed, so a second call replaces it."""


def configure_logging(settings: _LogSettings, level: str | int = "INFO") -> None:
    """Send the root logger's records to stderr in ``settings.log_format`` at ``level``.

    Idempotent: calling it again (a worker after the CLI, a test) replaces the handler it
    installed before instead of doubling every line; handlers that others installed (pytest's
    capture, say) are left in place.
    """
    numeric = level if isinstance(level, int) else getattr(logging, str(level).upper(), None)
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not a logging level name")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _GatewayHandler)]:
        root.removeHandler(handler)
    handler = _GatewayHandler(sys.stderr)
    handler.setFormatter(make_formatter(settings.log_format))
    root.addHandler(handler)
    root.setLevel(numeric)
