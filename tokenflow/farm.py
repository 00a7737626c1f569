"""``tokenflow farm``: many jobs on a Ray cluster. Being written: see issue 7."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    farm = sub.add_parser("farm", help="run job files on a Ray cluster (pip install 'tokenflow[farm]')")
    farm.add_argument("jobs", nargs="+", help="job files, folders of them, or globs")


def main(args: argparse.Namespace) -> int:
    raise NotImplementedError("the farm is being written")
