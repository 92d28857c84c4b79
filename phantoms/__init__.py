"""Synthetic chest CT studies ("phantoms") written as DICOM, for the demo, tests and training.

Imports nothing of ``hrct_triage`` but ``common``; the GPU worker image does not install it.
"""
