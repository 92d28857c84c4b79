"""The DICOM side: a Storage SCP that spools every instance durably, records it in the worklist,
decides when a study is complete and publishes it to the queue. Never imports torch or ``worker``.
"""
