"""The Celery application of the workers: configuration only, no torch import here."""

from __future__ import annotations

from celery import Celery

from db.queue import celery_config
from db.settings import get_settings

app = Celery("hrct-worker", include=["worker.tasks"])
app.conf.update(celery_config(get_settings()))
