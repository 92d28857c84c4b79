"""What every process shares: typed settings, logging, durable files, the broker contract.

Imports nothing of ``hrct_triage`` outside this package.
"""
