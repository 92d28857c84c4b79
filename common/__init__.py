"""What every process shares (settings, logs, storage, UIDs, queue); imports no other room.

Also the DICOM element bytes read and written by hand, and the paper's published values.
"""
