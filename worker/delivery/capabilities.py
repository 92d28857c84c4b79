"""What a destination accepts, asked before it matters: one association proposing every SOP
class our outputs may be sent as, each with each transfer syntax we send, as separate
presentation contexts, so the answer says which pairs it takes and why it refuses the others.
Nothing is stored; the association is released at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from hrct_triage.common.settings import Destination
from hrct_triage.common.sop_classes import OUTPUT_CLASSES
from hrct_triage.worker.delivery.association import (
    associate,
    context_words,
    make_ae,
    not_established,
)
from hrct_triage.worker.delivery.dimse import OFFERED_TRANSFER_SYNTAXES
from hrct_triage.worker.delivery.outcomes import Capabilities, ContextAnswer


def check_capabilities(
    destination: Destination,
    *,
    calling_ae: str,
    timeout: float,
    classes: Sequence[str] = OUTPUT_CLASSES,
    transfer_syntaxes: Sequence[str] = tuple(OFFERED_TRANSFER_SYNTAXES),
) -> Capabilities:
    """Propose every (class, transfer syntax) pair to ``destination`` and report its answers.

    A DICOMweb destination negotiates nothing: its report has no answers and says so.
    """
    started = time.monotonic()
    if destination.is_dicomweb:
        return Capabilities(destination, (), "DICOMweb negotiates no SOP class", 0.0)
    ae = make_ae(calling_ae, timeout)
    pairs = [(c, ts) for c in classes for ts in transfer_syntaxes]
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    assoc, witness = associate(ae, destination)
    if assoc is None or (not assoc.is_established and not witness.negotiated):
        problem = not_established(destination, witness, timeout).words
        return Capabilities(destination, (), problem, time.monotonic() - started)
    try:
        # Context ids are given in the order the contexts were requested (1, 3, 5, ...).
        proposed = {
            cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in assoc.requestor.requested_contexts
        }
        answers = {cx.context_id: ContextAnswer(*proposed[cx.context_id], True, "accepted")
                   for cx in assoc.accepted_contexts}  # fmt: skip
        for cx in assoc.rejected_contexts:
            detail = context_words(cx).partition(" (")[2].rstrip(")")
            answers[cx.context_id] = ContextAnswer(*proposed[cx.context_id], False, detail)
        ordered = tuple(answers[i] for i in sorted(answers))
        return Capabilities(destination, ordered, None, time.monotonic() - started)
    finally:
        if assoc.is_established:
            assoc.release()
