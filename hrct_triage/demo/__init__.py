"""``hrct-triage demo`` and its scanner and PACS stand-ins; imports the rooms it drives.

Those are ``phantoms``, ``processes``, ``db``, ``common``, the method's default checkpoint and the
worklist table the CLI prints too (``worklist_table``).
"""
