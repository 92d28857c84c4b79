"""The DICOM objects of an analysis: the TID 1500 SR and heat-map Secondary Captures.

Imports the method's result types and ``common``; nothing of Celery, the network or the database.
"""
