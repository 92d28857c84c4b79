from hrct_triage.cli.app import main

main()
