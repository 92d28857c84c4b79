"""The read-only web worklist and its JSON API, served by ``hrct-triage web``."""
