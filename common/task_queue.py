"""What the listener and the workers agree on about the broker: task names, queues, settings.

The broker carries only study ids; everything else is read from the worklist. Celery is
configured here (not in ``worker``) so that the listener can publish without importing the worker.
"""

from __future__ import annotations

import math
from typing import Any

from hrct_triage.common.settings import Settings

TRIAGE_TASK = "hrct.triage_study"
DELIVER_TASK = "hrct.deliver_study"
TASK_FOR_OUTBOX = {"triage": TRIAGE_TASK, "deliver": DELIVER_TASK}
QUEUE = "hrct"
# Studies that jump the queue (see ``db.priority.is_urgent`` for the rule). Workers consume
# ``CONSUME_ORDER``: the urgent queue first.
URGENT_QUEUE = "hrct.urgent"
CONSUME_ORDER = (URGENT_QUEUE, QUEUE)
# How long a new worker pool process may take to start, model load included.
WORKER_PROCESS_START_SECONDS = 120.0
# Redis: a message is handed on this long after its lease (at most the lease itself) ...
VISIBILITY_MARGIN_SECONDS = 60.0
# ... and workers look for such messages this often (at most the margin).
RESTORE_SWEEP_SECONDS = 10.0


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the publisher (listener) and the consumers (workers)."""
    config: dict[str, Any] = {
        "broker_url": settings.resolved_broker_url,
        "task_default_queue": QUEUE,
        # No result backend: outcomes are recorded in the worklist, not in the broker.
        "task_ignore_result": True,
        "result_backend": None,
        # A message is acknowledged only when its task has run, and given back when the worker
        # process dies, so a killed worker loses nothing; the worklist claim makes a second
        # delivery harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One study at a time per worker process: a GPU worker should not hoard queued studies.
        "worker_prefetch_multiplier": 1,
        # A pool process loads the model before it reports up (``worker.tasks._warm_up``):
        # seconds on a busy CPU, more with CUDA start-up. Celery's default (4 s) killed every
        # replacement of a lost pool process before it was up, in a loop, so one OOM kill left
        # the worker analysing nothing (tests/faults: test_pool_process_killed_mid_analysis).
        "worker_proc_alive_timeout": WORKER_PROCESS_START_SECONDS,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        # Publishing must not hang the listener when the broker is down: the outbox keeps the
        # message and the dispatcher tries again on its next round.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
    }
    if config["broker_url"].startswith(("redis://", "rediss://")):
        # A message not acknowledged within the lease is handed to another worker. (kombu's
        # SQLAlchemy transport would pass these to create_engine, so Redis only.) The margin
        # past the lease lets the lease lapse before the copy arrives; it used to be a fixed
        # minute, and kombu looked for such messages only every ~100 s, so a worker that hung
        # held its study for lease + up to 160 s however short the lease (tests/faults:
        # test_two_workers_and_a_redelivery_after_the_visibility_timeout).
        lease = float(settings.analysis.lease_seconds)
        margin = min(VISIBILITY_MARGIN_SECONDS, lease)
        config["broker_transport_options"] = {
            "visibility_timeout": math.ceil(lease + margin),
            # Every worker looks for overdue messages this often (kombu: interval x throttle).
            "unacked_restore_interval": max(1.0, min(RESTORE_SWEEP_SECONDS, margin)),
            "unacked_restore_throttle": 1,
            # kombu's Redis channel polls its queues round robin by default, so an urgent study
            # could wait behind a routine one. "priority" polls them in the order the worker
            # names them (``CONSUME_ORDER``): the urgent queue is always emptied first.
            "queue_order_strategy": "priority",
        }
    # The embedded SQLAlchemy transport has no such option (its transport options go to
    # create_engine) and always polls round robin: there an urgent study waits behind at most
    # one routine study per worker process (prefetch 1), not behind the whole queue.
    return config
