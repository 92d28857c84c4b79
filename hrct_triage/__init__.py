"""hrct-triage, installed as one package: the rooms below, linked in, and the process starter."""
