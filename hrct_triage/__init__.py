"""hrct-triage, installed as one package: the rooms below, linked in, the process starter
and the worklist table."""
