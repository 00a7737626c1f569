"""Job files (``tokenflow run``, ``tokenflow schema``). Being written: see issue 7."""
from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    run = sub.add_parser("run", help="run job files (YAML): one edit each")
    run.add_argument("jobs", nargs="+", help="job files, folders of them, or globs")
    sub.add_parser("schema", help="print the JSON Schema of a job file")


def main(args: argparse.Namespace) -> int:
    raise NotImplementedError("job files are being written")
