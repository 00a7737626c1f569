from tokenflow.app.cli import run

run()
