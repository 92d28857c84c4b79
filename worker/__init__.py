"""The analysis side: Celery app, tasks and jobs over its rooms; imports ``db`` and ``common``.

Its rooms are ``method`` (the paper), ``outputs`` (SR and SCs), ``delivery`` (sending them) and
``training``. Never imported by ``listener``; the two meet in ``db`` and on the queue.
"""
