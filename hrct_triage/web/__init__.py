"""The read-only web worklist and its JSON API; imports ``db`` and ``common`` only."""
