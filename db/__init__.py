"""The worklist database: settings, tables, sessions and the named state transitions.

``listener`` and ``worker`` meet here; the database is the source of truth for every study.
"""
