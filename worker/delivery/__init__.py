"""Sending outputs to destinations (C-STORE, STOW-RS) and when to retry; imports ``common`` only.

The worklist bookkeeping of a delivery lives in ``db.worklist``.
"""
