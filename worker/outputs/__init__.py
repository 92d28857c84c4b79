"""A result's SR and heat-map SCs, built and filed; imports ``method``, ``common``, ``db.worklist``.

One entry point, ``write_outputs``: a result (``Analysed`` or ``NotAnalysed``) in, durable files
and their worklist records (``db.worklist.OutputRecord``, the only thing taken from the
database room) out. Nothing of Celery or the network.
"""

from hrct_triage.worker.outputs.files import Analysed, NotAnalysed, write_outputs
from hrct_triage.worker.outputs.objects import SeriesLabels

__all__ = ["Analysed", "NotAnalysed", "SeriesLabels", "write_outputs"]
