"""``tokenflow bench`` per variant: the JSON is written after every variant, a variant that raises is
recorded and the others still run, and each variant says what ran (``ran``)."""
import json

import pytest

from tokenflow.app.cli import build_parser
from tokenflow.kernels import dispatch

OPS = ("keyframe_attention", "cosine_nearest", "gather")

SEEN = {}   # what the failing kernel found on disk when it ran


def broken_attention(q, k, v, heads, inject_qk=False):
    """A keyframe-attention backend that raises (the seam for a variant that fails mid-run)."""
    path = SEEN["path"]
    SEEN["doc"] = json.loads(path.read_text()) if path.exists() else None
    raise RuntimeError("kernel exploded\nsecond line")


@pytest.fixture
def broken_backend():
    dispatch.register(dispatch.Backend("keyframe_attention", "broken", 0, "tests.test_bench_variants:broken_attention",
                                       not_auto=lambda *specs: "test backend", benchmark_only=True))
    yield
    dispatch.unregister("keyframe_attention", "broken")


def test_bench_writes_after_every_variant_records_a_failure_and_goes_on(tmp_path, broken_backend, capsys):
    from tokenflow.app.run import run_command
    from tokenflow.benchmark import cli

    path = tmp_path / "bench.json"
    SEEN.clear()
    SEEN["path"] = path
    parser = build_parser()
    args = parser.parse_args(["bench", "--preset", "smoke", "--frames", "4", "--inversion-steps", "2", "--steps", "1",
                              "--keyframe-spacing", "2", "--idle-wait", "0", "--threads", "1", "--warmup", "0",
                              "--repeats", "1", "--compare", "torch,attn=broken,chunk2", "--json", str(path)])
    assert run_command(lambda: cli.main(args)) == 1
    captured = capsys.readouterr()
    assert "attn=broken did not finish: attn=broken: RuntimeError: kernel exploded" in captured.err.splitlines()[-1]
    assert captured.out.count("ran: UNet: eager (reference)") == 2   # the tables, per finished variant
    assert "ran: keyframe_attention: torch (reference)" in captured.out

    during = SEEN["doc"]   # the JSON as the second variant found it: the first variant, written
    assert during is not None and [v["name"] for v in during["variants"]] == ["torch"]
    assert during["complete"] is False and during["failed"] == []

    doc = json.loads(path.read_text())
    assert doc["complete"] and doc["failed"] == ["attn=broken"]
    assert [v["name"] for v in doc["variants"]] == doc["variants_planned"] == ["torch", "attn=broken", "chunk2"]
    broken = doc["variants"][1]
    assert broken["error"] == "RuntimeError: kernel exploded" and broken["error_type"] == "RuntimeError"
    assert broken["exit_code"] == 1 and broken["ran"] is None
    for entry in (doc["variants"][0], doc["variants"][2]):
        assert entry["stages"]["total"]["seconds"] > 0 and not entry.get("error")
        ran = entry["ran"]
        assert ran["unet"] == {"backend": "eager", "status": "reference"}
        assert [e["backend"] for op in OPS for e in ran["kernels"][op]] == ["torch"] * 3
        assert all(e["status"] == "reference" and e["calls"] > 0 for op in OPS for e in ran["kernels"][op])
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"], "no temp file left"
