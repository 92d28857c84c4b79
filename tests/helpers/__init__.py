"""What the tests share besides fixtures: peers, fake studies, worklist rows, the tier check.

Fixtures live in ``tests/conftest.py``; test modules import helpers from here, never from
``conftest.py`` or from one another.
"""
