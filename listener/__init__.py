"""The DICOM side: Storage SCP, spool, completion, dispatch; imports ``db`` and ``common`` only.

The SCP spools every instance durably, records it in the worklist, decides when a study is
complete and publishes it to the queue. It never imports torch or ``worker``.
"""
