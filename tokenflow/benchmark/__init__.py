"""``tokenflow bench``: throughput of whole edits, per stage, for comparable variants.

Modules (each usable on its own):
    config         BenchConfig (typed settings), PRESETS, the variants of ``--compare``
    architectures  SD 1.5 / 2.1-base UNet + VAE with random weights, built on the device
    flops          analytic FLOPs of every stage of an edit (formula in its docstring)
    peak           measured dense matmul TFLOP/s of the device (the "% of peak" yardstick)
    measure        timing medians, peak memory of one call (CUDA; CPU in a child process), the
                   kernel benchmarks' flags and results JSON (bench/*.py are thin scripts on it)
    system         idle-machine guard, per-stage peak memory, git revision
    run            the runner: warm-up, repeats, medians, rates -> one JSON document
    report         printed tables, atomic JSON, PNG plot (matplotlib, optional)
    cli            ``add_parser(subparsers)`` and ``main(args) -> int``
    original_kernels  the original implementation's compute pattern as by-name kernel backends
                   (``original``), registered when ``run`` is imported: only benchmark runs see them

Model weights never matter here; the FLOP model and the "original" kernel backends
(``tokenflow.benchmark.original_kernels``) are tested in ``tests/test_benchmark.py``.
"""
from tokenflow.benchmark.config import PRESETS, BenchConfig

__all__ = ["BenchConfig", "PRESETS"]
