"""Output of a benchmark: the printed tables, the JSON file (atomic), the PNG plot (optional, ``plots``).

JSON layout (``run.run`` builds it): ``device``, ``versions``, ``git``, ``command``, ``argv``,
``settings``, ``model``, ``clip``, ``load`` (start / end snapshots), ``matmul_peak`` per dtype,
``peak_dtype``, and per variant ``stages[stage]`` with ``seconds`` (median), ``repeats_s``,
``frames_per_s``, ``samples_per_s``, ``flops``, ``tflops``, ``fraction_of_peak`` and
``peak_memory_bytes``; ``ran`` (``engine.backends.what_ran``: the UNet backend and each kernel op's
backends that ran, with their verification status); ``ratios[variant][stage]`` = first variant's
seconds / this variant's. ``variants_planned``, ``complete`` (False in the copies written after each
variant but the last), ``failed`` (names); a failed variant has ``error`` (one line), ``error_type``
and ``exit_code`` instead of numbers.
"""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Optional, TextIO

from tokenflow.benchmark import plots
from tokenflow.benchmark.config import STAGE_LABELS, STAGES
from tokenflow.engine.backends import describe_ran
from tokenflow.errors import ConfigError, OutputError
from tokenflow.io.outputs import atomic_file

MATPLOTLIB_HINT = "pip install matplotlib (the plot's only dependency)"


def _num(value: Optional[float], fmt: str, width: int) -> str:
    return f"{value:{width}{fmt}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def format_tables(doc: dict) -> str:
    """Per variant and stage: s, frames/s, samples/s, TFLOP/s, % of peak, peak MiB; then ratios."""
    peaks = doc["matmul_peak"]
    peak = peaks.get(doc["peak_dtype"], {})
    lines = [f"device: {doc['device']['name']}; model: {doc['model']['name']}"
             + (" (random weights)" if doc["model"]["random_weights"] else ""),
             f"clip: {doc['clip']['frames']} frames {doc['clip']['size'][0]}x{doc['clip']['size'][1]} "
             f"(latents {doc['clip']['latent'][0]}x{doc['clip']['latent'][1]}), inversion "
             f"{doc['settings']['inversion_steps']} steps, edit {doc['settings']['steps']} steps, "
             f"{doc['settings']['repeats']} repeats (median), {doc['settings']['warmup']} warm-up",
             "matmul peak: " + ", ".join(f"{k} {v['tflops']:.2f} TFLOP/s (n={v['size']})" for k, v in peaks.items())]
    header = (f"{'stage':16s} {'seconds':>9s} {'frames/s':>9s} {'samples/s':>10s} {'TFLOP/s':>8s} "
              f"{'% peak':>7s} {'peak MiB':>9s}")
    for entry in doc["variants"]:
        lines += ["", f"variant {entry['name']}"
                  + (f"  ({', '.join(f'{k}={v}' for k, v in entry['overrides'].items())})" if entry["overrides"] else ""),
                  header]
        for stage in STAGES:
            s = entry["stages"][stage]
            frac = s.get("fraction_of_peak")
            mem = s.get("peak_memory_bytes")
            lines.append(f"{STAGE_LABELS[stage]:16s} {_num(s.get('seconds'), '.3f', 9)} "
                         f"{_num(s.get('frames_per_s'), '.2f', 9)} {_num(s.get('samples_per_s'), '.2f', 10)} "
                         f"{_num(s.get('tflops'), '.3f', 8)} {_num(None if frac is None else 100 * frac, '.1f', 7)} "
                         f"{_num(None if mem is None else mem / 2**20, '.0f', 9)}")
        if entry.get("ran"):   # which UNet and kernel backends ran, how far verified
            lines += [f"ran: {line}" for line in describe_ran(entry["ran"])]
        other = entry.get("other_timings_s") or {}
        if other:
            lines.append("also timed (inside total): " + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(other.items())))
        for note in entry["notes"]:
            lines.append(f"note: {note}")
    if len(doc["variants"]) > 1:
        first = doc["variants"][0]["name"]
        names = [e["name"] for e in doc["variants"]]
        widths = [max(12, len(n)) for n in names]
        lines += ["", f"speed-up vs {first} (its seconds / variant's seconds; > 1 is faster)",
                  f"{'stage':16s} " + " ".join(f"{n:>{w}s}" for n, w in zip(names, widths))]
        for stage in STAGES:
            lines.append(f"{STAGE_LABELS[stage]:16s} " + " ".join(
                _num(doc["ratios"][n][stage], ".2f", w - 1) + "x" if doc["ratios"][n][stage] is not None
                else f"{'-':>{w}s}" for n, w in zip(names, widths)))
        lines.append(f"{'max |dlatent|':16s} " + " ".join(
            _num(e["max_abs_latent_diff_vs_first"], ".2e", w) for e, w in zip(doc["variants"], widths)))
        # what a variant costs beside its time (ControlNets: more work and memory), vs the first variant
        for label, key in (("FLOPs x first", "flops"), ("peak mem x first", "peak_memory_bytes")):
            base = doc["variants"][0]["stages"]["total"].get(key)
            lines.append(f"{label:16s} " + " ".join(
                _num(_ratio(e["stages"]["total"].get(key), base), ".2f", w - 1) + "x"
                if _ratio(e["stages"]["total"].get(key), base) is not None else f"{'-':>{w}s}"
                for e, w in zip(doc["variants"], widths)))
    method = next((e["memory_method"] for e in doc["variants"] if e.get("memory_method")), "-")
    lines.append(f"(peak memory: {method}; TFLOP/s: analytic FLOPs / median "
                 f"seconds; % peak: of the {doc['peak_dtype']} matmul peak {peak.get('tflops', 0):.2f} TFLOP/s)")
    return "\n".join(lines)


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return value / base if isinstance(value, (int, float)) and isinstance(base, (int, float)) and base else None


def print_tables(doc: dict, stream: Optional[TextIO] = None) -> None:
    print(format_tables(doc), file=stream or sys.stdout, flush=True)


def write_json(doc: dict, path: str) -> Path:
    """Write ``doc`` to ``path`` atomically (a temp file in the same folder, then ``os.replace``)."""
    target = Path(path).expanduser()
    try:
        with atomic_file(target, make_parents=True) as f:
            json.dump(_finite(doc), f, indent=2, allow_nan=False)
            f.write("\n")
    except OSError as exc:
        raise OutputError(f"cannot write the benchmark JSON to '{path}' ({exc.strerror or exc})") from None
    return target


def _finite(value):
    """NaN / infinity (e.g. a diff of diverged latents) become null: JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_plot_support() -> None:
    """ConfigError (before anything runs) when --plot is asked for without matplotlib."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise ConfigError(f"--plot needs matplotlib, which is not installed: {MATPLOTLIB_HINT}") from None


def write_plot(doc: dict, path: str) -> Path:
    """One PNG (written atomically) of stage times, throughput and peak memory per variant (``plots``)."""
    check_plot_support()
    return plots.write(doc, path)
