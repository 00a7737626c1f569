"""Plots of ``tokenflow bench`` result files: one PNG per document, one comparing them all.

Inputs are JSON files; those that are ``tokenflow bench`` documents (``"benchmark": "tokenflow
bench"``, as ``tokenflow bench --json`` writes them) are plotted, every other file (the hand-written
e2e / parity records, the kernel benchmarks' JSON) is skipped with a one-line reason. Outputs:
    <out>/<name>.png       stage times, UNet samples/s, frames/s and peak memory per variant
    <out>/comparison.png   with two or more documents: every variant of every document, grouped by
                           setup (device, model, clip, dtype); see ``tokenflow.benchmark.plots``

  python bench/plot_results.py                                  # bench/results/*.json -> bench/results/plots/
  python bench/plot_results.py run1.json run2.json --out /tmp/plots
Exit status: 0 when plots were written, 1 when no input is a bench document or nothing could be written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

try:
    from tokenflow.benchmark import plots, report
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tokenflow.benchmark import plots, report
from tokenflow.errors import OutputError, TokenFlowError
from tokenflow.io.outputs import check_writable

RESULTS = Path(__file__).resolve().parent / "results"
COMPARISON = "comparison.png"


def load(path: Path) -> Tuple[Optional[dict], Optional[str]]:
    """(document, None) for a plottable ``tokenflow bench`` file, else (None, why it is skipped)."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"is not JSON ({exc})"
    problem = plots.document_problem(doc)
    return (None, f"is not a tokenflow bench document: {problem}") if problem else (doc, None)


def unique_names(paths: List[Path]) -> List[str]:
    """The files' stems, with -2, -3 ... appended where two inputs (or the comparison) share one."""
    seen = {Path(COMPARISON).stem: 1}
    names = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path, help="JSON files (default: bench/results/*.json)")
    parser.add_argument("--out", type=Path, default=RESULTS / "plots", help="folder of the PNGs "
                        "(default: bench/results/plots)")
    args = parser.parse_args(argv)
    inputs = args.inputs or sorted(RESULTS.glob("*.json"))
    docs = []
    for path, name in zip(inputs, unique_names(inputs)):
        doc, why = load(path)
        if doc is None:
            print(f"skipped {path}: {why}", file=sys.stderr)
        else:
            docs.append((path, name, doc))
    if not docs:
        print(f"error: none of the {len(inputs)} input(s) is a tokenflow bench document "
              f"(write one with: tokenflow bench --json PATH)", file=sys.stderr)
        return 1
    try:
        report.check_plot_support()
    except TokenFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        check_writable(args.out / COMPARISON)   # makes the folder, probes a file in it
    except OutputError as exc:
        print(f"error: cannot write plots to '{args.out}': {exc}", file=sys.stderr)
        return 1
    try:
        for path, name, doc in docs:
            print(report.write_plot(doc, args.out / f"{name}.png"), flush=True)
        if len(docs) > 1:
            print(plots.write_comparison([(name, doc) for _, name, doc in docs], args.out / COMPARISON))
    except TokenFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
