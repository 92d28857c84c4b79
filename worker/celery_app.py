"""The Celery application of the workers: configuration only, no torch import here."""

from __future__ import annotations

from celery import Celery

from hrct_triage.common.settings import get_settings
from hrct_triage.common.task_queue import celery_config

app = Celery("hrct-worker", include=["hrct_triage.worker.tasks"])
app.conf.update(celery_config(get_settings()))
