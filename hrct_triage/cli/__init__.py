"""The ``hrct-triage`` command: a thin composition root over the listener, worker and db."""
