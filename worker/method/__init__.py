"""The method of Yang et al. 2020: series selection, HU volume, preprocessing, model, inference.

Plain functions over arrays and files: imports nothing of Celery, the network or the database.
"""
