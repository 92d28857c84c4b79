"""The named state transitions of a study; imports the rest of ``db`` and ``common`` only.

Every function here runs inside the caller's transaction (``db.session.transaction``) and never
commits by itself, so a state change and the outbox row announcing it land together or not at all.
The contract each transition keeps:

* ``record_instance``: the instance row exists when it returns; an identical resend changes
  nothing; a changed one keeps the newest version and an ``instance_replacements`` row for the
  old one; a new or changed instance of a study that was already complete re-opens it.
* ``complete_ready_studies``: a study moves to ``queued`` only after the quiet period, only when
  no open association has fed it and no transient refusal of one of its instances is outstanding;
  the same transaction writes its ``triage`` outbox row.
* ``claim``: at most one worker holds a study at a time; a lease that lapses (worker killed) lets
  another take it. Everything a worker records afterwards is checked against its claim token, so
  a superseded analysis records nothing.
* Late waves: a new or changed instance of a study that has a verdict re-opens it, and its
  completion queues a check within the same generation (``Claim.analysed_input``). The worker
  keeps the verdict (``keep_verdict``) when series selection would analyse exactly what it was
  computed on, and otherwise analyses a new generation (``start_generation``). An instance that
  arrives during an analysis leaves the claim alone: the worker reads the instances again in
  the transaction that records its result (``held_input_rows``) and, if what it would analyse
  changed, records nothing and lets the study complete again (``reopen``).

One module per stage, all re-exported here, so callers keep writing ``worklist.claim(...)``:
``states`` (task names, status groups, records, the state-change helpers), ``associations``,
``ingest``, ``outbox``, ``analysis``, ``delivery``, ``capabilities`` and ``operator``.
"""

from __future__ import annotations

from hrct_triage.db.worklist.analysis import (
    analysis_inputs,
    claim,
    fail_analysis,
    finish_analysis,
    give_up,
    held_input_rows,
    input_rows,
    instance_set_digest,
    keep_verdict,
    late_arrivals,
    live_holder,
    live_holders,
    mark_not_applicable,
    note_analysis,
    release_holds,
    reopen,
    start_generation,
)
from hrct_triage.db.worklist.associations import (
    AssociationTally,
    close_association,
    close_orphaned_associations,
    open_association,
    receiving_instances,
    record_refusal,
    replaced_path,
    spooled_paths,
)
from hrct_triage.db.worklist.capabilities import load_capabilities, save_capabilities
from hrct_triage.db.worklist.delivery import (
    claim_delivery,
    pending_deliveries,
    record_delivery,
    release_delivery,
    settle_delivery,
)
from hrct_triage.db.worklist.ingest import (
    complete_ready_studies,
    forget_instance,
    record_instance,
    record_instance_quickly,
    wave_settled,
)
from hrct_triage.db.worklist.operator import (
    CANCELLED_REASON,
    PURGEABLE,
    PurgeCandidate,
    cancel,
    purge_candidates,
    record_purge,
    requeue,
    resend,
    urgent_publications,
)
from hrct_triage.db.worklist.outbox import Publication, due_publications, mark_published
from hrct_triage.db.worklist.states import (
    DELIVER,
    TRIAGE,
    AnalysisRecord,
    Claim,
    InputRow,
    InstanceFacts,
    LateSeries,
    OutputRecord,
    Recorded,
)

__all__ = [
    "CANCELLED_REASON",
    "DELIVER",
    "PURGEABLE",
    "TRIAGE",
    "AnalysisRecord",
    "AssociationTally",
    "Claim",
    "InputRow",
    "InstanceFacts",
    "LateSeries",
    "OutputRecord",
    "Publication",
    "PurgeCandidate",
    "Recorded",
    "analysis_inputs",
    "cancel",
    "claim",
    "claim_delivery",
    "close_association",
    "close_orphaned_associations",
    "complete_ready_studies",
    "due_publications",
    "fail_analysis",
    "finish_analysis",
    "forget_instance",
    "give_up",
    "held_input_rows",
    "input_rows",
    "instance_set_digest",
    "keep_verdict",
    "late_arrivals",
    "live_holder",
    "live_holders",
    "load_capabilities",
    "mark_not_applicable",
    "mark_published",
    "note_analysis",
    "open_association",
    "pending_deliveries",
    "purge_candidates",
    "receiving_instances",
    "record_delivery",
    "record_instance",
    "record_instance_quickly",
    "record_purge",
    "record_refusal",
    "release_delivery",
    "release_holds",
    "reopen",
    "replaced_path",
    "requeue",
    "resend",
    "save_capabilities",
    "settle_delivery",
    "spooled_paths",
    "start_generation",
    "urgent_publications",
    "wave_settled",
]
