"""``hrct-triage demo``: phantoms sent by a scanner stand-in to the gateway and a PACS stand-in."""
