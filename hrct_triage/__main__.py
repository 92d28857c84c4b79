from hrct_triage.cli.app import app

app()
