"""Whole edits on a CUDA device: Triton vs torch kernels (tiny model), the compile backend with a
host keyframe store and keyframe windows (graphs counted), and the memory plan against what CUDA
actually reserved (SD 2.1-base architecture, random weights, 512x512)."""
import pytest
import torch

from tokenflow.benchmark.run import synthetic_clip
from tokenflow.config import EditConfig
from tokenflow.io.cache import InversionCache
from tokenflow.kernels import KernelChoice, check_backends
from tokenflow.kernels.dispatch import choose
from tokenflow.kernels.probe import sample_args
from tokenflow.method.editor import Editor
from tokenflow.method.keyframes import window_sizes
from tokenflow.models.load import load_model

pytestmark = pytest.mark.gpu

TINY = dict(inversion_prompt="shapes", prompt="glass", frames=12, size=(64, 64), inversion_steps=6, steps=3,
            keyframe_spacing=3, use_cache=False)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny_cuda(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return load_model(str(tiny_model_dir), torch.device("cuda"), torch.float16)


def test_tiny_edit_with_triton_kernels_matches_torch_kernels(cuda, tiny_cuda):
    # auto keeps Triton after its self-check on this GPU, and picks it at the model's shapes
    assert check_backends(cuda, torch.float16) == KernelChoice()
    for op in ("keyframe_attention", "cosine_nearest", "gather"):
        args, _ = sample_args(op, cuda, torch.float16, heads=2, dim=32, n_kf=4, seq=256)
        assert choose(op, None, *args) == "triton", op
    clip = synthetic_clip(TINY["frames"], TINY["size"])
    editor = Editor(tiny_cuda, cache=InversionCache(enabled=False))
    auto = editor.edit(clip, config=EditConfig(**TINY, device="cuda"))
    ref = editor.edit(clip, config=EditConfig(**TINY, device="cuda", attention_backend="torch", nearest_backend="torch"))
    assert torch.isfinite(auto.latents).all() and torch.isfinite(auto.frames).all()
    rel = _rel(auto.latents.float(), ref.latents.float())
    print(f"triton vs torch kernels, tiny model fp16: relative L2 of the final latents {rel:.2e}")
    assert rel < 5e-2   # fp16 rounding plus rare nearest-neighbour ties flipping


def test_compile_with_host_store_and_windows_counts_graphs(cuda, tiny_cuda, tmp_path):
    """--backend compile (CUDA graphs), --keyframe-store host, --keyframe-window 2: the graphs the compile
    module states (plain 1, keyframes one per window size, propagate 1) however many keyframes each
    chunk stages, none more on a second edit (issue 18, defects 1-4)."""
    clip = synthetic_clip(TINY["frames"], TINY["size"])
    editor = Editor(tiny_cuda, cache=InversionCache(enabled=False))
    eager = editor.edit(clip, config=EditConfig(**TINY, device="cuda", keyframe_store="host", keyframe_window=2))
    config = EditConfig(**TINY, device="cuda", backend="compile", keyframe_store="host", keyframe_window=2,
                        chunk_frames=4, cache_dir=str(tmp_path))
    first = editor.edit(clip, config=config)
    backend = editor.runner.backend
    graphs = backend.stats().get("compilations")
    print(f"compile backend stats after one edit: {backend.stats()}")
    keyframes = TINY["frames"] // TINY["keyframe_spacing"]
    stated = {"plain": 1, "keyframes": len(window_sizes(keyframes, 2)), "propagate": 1}
    assert backend.stats()["graphs"] == stated and graphs == sum(stated.values())
    second = editor.edit(clip, config=config)
    assert backend.stats().get("compilations") == graphs
    assert torch.equal(first.latents, second.latents)
    assert _rel(first.latents.float(), eager.latents.float()) < 5e-2


def test_plan_against_measured_reserved_memory(cuda):
    """SD 2.1-base shapes (random weights), 512x512, 16 frames, fp16, a 16 GB budget: what CUDA
    reserved stays under the budget, and the plan does not under-predict the allocations."""
    from tokenflow.benchmark.architectures import build_model

    model = build_model("sd21", cuda, torch.float16)
    clip = synthetic_clip(16, (512, 512))
    editor = Editor(model, cache=InversionCache(enabled=False))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(cuda)
    result = editor.edit(clip, config=EditConfig(inversion_prompt="shapes", prompt="glass", frames=16, size=(512, 512),
                                                 inversion_steps=2, steps=2, device="cuda", memory_budget="16GB",
                                                 use_cache=False))
    reserved, allocated = torch.cuda.max_memory_reserved(cuda), torch.cuda.max_memory_allocated(cuda)
    plan = result.plan
    print(f"plan peak {plan.peak / 1e9:.2f} GB (budget {plan.budget / 1e9:.2f} GB); measured: allocated "
          f"{allocated / 1e9:.2f} GB, reserved {reserved / 1e9:.2f} GB")
    assert reserved <= plan.budget
    assert allocated <= 1.1 * plan.peak
