"""The ``hrct-triage`` command: a thin composition root over ``listener``, ``worker`` and ``db``."""
