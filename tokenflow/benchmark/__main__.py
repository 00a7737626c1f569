"""``python -m tokenflow.benchmark [flags]``: the ``tokenflow bench`` subcommand, stand-alone."""
import sys

from .cli import run_cli

sys.exit(run_cli())
