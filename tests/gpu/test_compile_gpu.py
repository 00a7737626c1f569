"""The compile backend on a CUDA device (tiny model): CUDA graphs with a host keyframe store and
keyframe windows, graphs counted. Cold inductor compiles take the longest of tests/gpu, so
bench/gpu_check runs this file in its compile stage, after the cheaper checks."""
import pytest
import torch

from tests.gpu.conftest import TINY, rel
from tokenflow.benchmark.run import synthetic_clip
from tokenflow.config import EditConfig
from tokenflow.method.keyframes import window_sizes

pytestmark = pytest.mark.gpu


def test_compile_with_host_store_and_windows_counts_graphs(cuda, tiny_cuda, editor_on, tmp_path):
    """--backend compile (CUDA graphs), --keyframe-store host, --keyframe-window 2: the graphs the compile
    module states (plain 1, keyframes one per window size, propagate 1) however many keyframes each
    chunk stages, none more on a second edit (issue 18, defects 1-4)."""
    clip = synthetic_clip(TINY["frames"], TINY["size"])
    editor = editor_on(tiny_cuda)
    eager = editor.edit(clip, config=EditConfig(**TINY, device="cuda", keyframe_store="host", keyframe_window=2))
    config = EditConfig(**TINY, device="cuda", backend="compile", keyframe_store="host", keyframe_window=2,
                        chunk_frames=4, cache_dir=str(tmp_path))
    first = editor.edit(clip, config=config)
    backend = editor.runner.backend
    graphs = backend.stats().get("compilations")
    print(f"compile backend stats after one edit: {backend.stats()}")
    keyframes = TINY["frames"] // TINY["keyframe_spacing"]
    stated = {"plain": 1, "keyframes": len(window_sizes(keyframes, 2)), "propagate": 1}
    assert backend.stats()["graphs"] == stated and 1 <= graphs <= sum(stated.values())   # fewer: dynamo reused one
    second = editor.edit(clip, config=config)
    assert backend.stats().get("compilations") == graphs
    assert torch.equal(first.latents, second.latents)
    assert rel(first.latents.float(), eager.latents.float()) < 5e-2
