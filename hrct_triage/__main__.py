from hrct_triage.cli import app

app()
