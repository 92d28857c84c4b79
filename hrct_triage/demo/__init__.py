"""``hrct-triage demo`` and its scanner and PACS stand-ins; imports the rooms it drives.

Those are ``phantoms``, ``processes``, ``db``, ``common``, the method's default checkpoint and the
CLI's worklist table (``cli.app.render_worklist``, imported lazily since ``cli`` imports this room).
"""
