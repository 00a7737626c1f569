"""The benchmark-only "original" attention pattern and the attention kernel benchmark
(``bench/bench_keyframe_attention.py``) at the sizes where memory decides what can run (issue 18,
item 9). The other "original" backends' tests are in test_benchmark.py."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tokenflow.benchmark import original_kernels as original_pattern
from tokenflow.benchmark.original_kernels import keyframe_attention_original
from tokenflow.kernels.keyframe_attention import keyframe_attention_torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_keyframe_attention.py"


@pytest.mark.parametrize("n_kf", [original_pattern.SINGLE_BATCH_MAX, original_pattern.SINGLE_BATCH_MAX + 1])
def test_original_attention_batches_up_to_12_keyframes_then_loops(n_kf, monkeypatch):
    """As the original (``single_batch = n_frames <= 12``): one batched product per head up to 12
    keyframes, one query keyframe at a time above; both equal the float64 reference."""
    batches = []
    real = original_pattern._float32_product
    monkeypatch.setattr(original_pattern, "_float32_product", lambda a, b: batches.append(a.shape[0]) or real(a, b))
    g = torch.Generator().manual_seed(n_kf)
    q, k, v = (torch.randn(3, n_kf, 5, 2 * 4, generator=g) for _ in range(3))
    for inject in (False, True):
        batches.clear()
        ours = keyframe_attention_original(q, k, v, 2, inject)
        ref = keyframe_attention_torch(q.double(), k.double(), v.double(), 2, inject)
        assert torch.allclose(ours.double(), ref, atol=2e-6, rtol=0)
        step = n_kf if n_kf <= 12 else 1
        assert batches == [step] * (3 * 2 * (n_kf // step)), batches   # branches x heads x query batches


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_keyframe_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_memory_of_the_materialising_variants():
    bench = _bench_module()
    target = {"K": 25, "S": 4096, "heads": 5}
    assert bench.score_bytes("sdpa-math", target) == 2 * 4 * 5 * (25 * 4096) ** 2        # ~420 GB: never fits
    assert bench.score_bytes("original", target) == 2 * 4 * 4096 * 25 * 4096             # one keyframe: 3.4 GB
    assert bench.score_bytes("original", {**target, "K": 12}) == 2 * 4 * 12 * 4096 * 12 * 4096
    assert bench.score_bytes("sdpa-flash", target) == bench.score_bytes("triton", target) == 0


def test_attention_bench_skips_what_cannot_fit_and_says_why(tmp_path, monkeypatch):
    """SDPA's math backend is not run where its scores exceed free memory (simulated: 8 MiB free);
    its row records the reason; the variants that fit run and are compared."""
    bench = _bench_module()
    monkeypatch.setitem(bench.PRESETS, "small", [(64, 2, 16, 13)])
    monkeypatch.setattr(bench, "free_bytes", lambda device: 8 << 20)
    out = tmp_path / "attention.json"
    assert bench.main(["--variants", "sdpa-flash,sdpa-math,original", "--reps", "1", "--no-memory",
                       "--out", str(out)]) == 0
    rows = {row["variant"]: row for row in json.loads(out.read_text())["results"]}
    skipped = rows["sdpa-math"]["skipped"]
    assert skipped.startswith("its scores need") and skipped.endswith("8.0 MiB of cpu memory is free"), rows
    assert "ms" not in rows["sdpa-math"] and "error" not in rows["sdpa-math"]
    for name in ("sdpa-flash", "original"):
        assert rows[name]["ms"] > 0 and rows[name]["max_abs_diff_vs_reference"] < 1e-5, rows[name]
