"""Sending our outputs to destinations: DIMSE C-STORE, STOW-RS, and what an attempt reports.

Imports ``common`` only; the worklist bookkeeping of a delivery lives in ``db.worklist``.
"""
