"""The method of Yang et al. 2020 (series, volume, preprocessing, model); imports ``common`` only.

Plain functions over arrays and files: nothing of Celery, the network or the database.
"""
