"""The analysis side: Celery tasks, the Yang et al. 2020 pipeline, outputs and delivery.

Never imported by ``listener``; the two meet in ``db`` and on the queue.
"""
