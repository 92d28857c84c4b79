"""The worklist database: tables, migrations, sessions, state transitions; imports ``common`` only.

``listener`` and ``worker`` meet here; the database is the source of truth for every study.
"""
