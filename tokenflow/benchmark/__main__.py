"""``python -m tokenflow.benchmark [flags]``: the ``tokenflow bench`` subcommand, stand-alone."""
import sys

from tokenflow.benchmark.cli import run_cli

sys.exit(run_cli())
