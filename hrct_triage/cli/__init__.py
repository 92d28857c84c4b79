"""The ``hrct-triage`` command, the composition root: it may import every other room."""
