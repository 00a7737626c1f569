"""Whole edits on a CUDA device: Triton vs torch kernels (tiny model), and the memory plan against
what CUDA actually reserved (SD 2.1-base architecture, random weights, 512x512). The compile
backend's check is in test_compile_gpu.py (bench/gpu_check runs it in its compile stage)."""
import pytest
import torch

from tests.gpu.conftest import TINY, rel
from tokenflow.benchmark.run import synthetic_clip
from tokenflow.config import EditConfig
from tokenflow.kernels import KernelChoice, check_backends
from tokenflow.kernels.dispatch import choose
from tokenflow.kernels.probe import sample_args

pytestmark = pytest.mark.gpu


def test_tiny_edit_with_triton_kernels_matches_torch_kernels(cuda, tiny_cuda, editor_on):
    # auto keeps Triton after its self-check on this GPU, and picks it at the model's shapes
    assert check_backends(cuda, torch.float16) == KernelChoice()
    for op in ("keyframe_attention", "cosine_nearest", "gather"):
        args, _ = sample_args(op, cuda, torch.float16, heads=2, dim=32, n_kf=4, seq=256)
        assert choose(op, None, *args) == "triton", op
    clip = synthetic_clip(TINY["frames"], TINY["size"])
    editor = editor_on(tiny_cuda)
    auto = editor.edit(clip, config=EditConfig(**TINY, device="cuda"))
    ref = editor.edit(clip, config=EditConfig(**TINY, device="cuda", attention_backend="torch", nearest_backend="torch"))
    assert torch.isfinite(auto.latents).all() and torch.isfinite(auto.frames).all()
    err = rel(auto.latents.float(), ref.latents.float())
    print(f"triton vs torch kernels, tiny model fp16: relative L2 of the final latents {err:.2e}")
    assert err < 5e-2   # fp16 rounding plus rare nearest-neighbour ties flipping


def test_tiny_sdxl_edit_with_triton_kernels_matches_torch_kernels(cuda, editor_on):
    """tiny-xl (SDXL's block layout: 70 self-attention layers at two token levels) in bfloat16
    with its VAE in float32: auto runs the Triton kernels in every layer and gives the
    torch kernels' edit. The CPU suite cannot afford this through the interpreter
    (tests/test_sdxl.py::test_kernel_backends_give_the_torch_passes skips triton there)."""
    from tokenflow.kernels.dispatch import forget_used, used
    from tokenflow.models.load import load_model

    model = load_model("tiny-xl", cuda, torch.bfloat16)
    clip = synthetic_clip(8, (64, 64))
    editor = editor_on(model)
    settings = dict(TINY, frames=8, keyframe_spacing=2, device="cuda", dtype="bfloat16")
    forget_used()
    auto = editor.edit(clip, config=EditConfig(**settings))
    ran = used()
    ref = editor.edit(clip, config=EditConfig(**settings, attention_backend="torch", nearest_backend="torch"))
    ops = ("keyframe_attention", "cosine_nearest", "gather")
    assert {op: set(ran.get(op, {})) for op in ops} == {op: {"triton"} for op in ops}, ran
    assert torch.isfinite(auto.latents).all() and torch.isfinite(auto.frames).all()
    err = rel(auto.latents.float(), ref.latents.float())
    print(f"triton vs torch kernels, tiny-xl bf16: relative L2 of the final latents {err:.2e}")
    assert err < 5e-2   # bf16 rounding plus rare nearest-neighbour ties flipping


def test_plan_against_measured_reserved_memory(cuda, editor_on):
    """SD 2.1-base shapes (random weights), 512x512, 16 frames, fp16, a 16 GB budget: what CUDA
    reserved stays within the plan's usable part of the budget, and the plan does not under-predict
    the allocations; prints measured reserved / plan peak (bench/gpu_check stage 4 records it too)."""
    from tokenflow.benchmark.architectures import build_model

    model = build_model("sd21", cuda, torch.float16)
    clip = synthetic_clip(16, (512, 512))
    editor = editor_on(model)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(cuda)
    result = editor.edit(clip, config=EditConfig(inversion_prompt="shapes", prompt="glass", frames=16, size=(512, 512),
                                                 inversion_steps=2, steps=2, device="cuda", memory_budget="16GB",
                                                 use_cache=False))
    reserved, allocated = torch.cuda.max_memory_reserved(cuda), torch.cuda.max_memory_allocated(cuda)
    plan = result.plan
    print(f"plan peak {plan.peak / 1e9:.2f} GB (usable {plan.usable / 1e9:.2f} GB of a {plan.budget / 1e9:.2f} GB "
          f"budget); measured: allocated {allocated / 1e9:.2f} GB, reserved {reserved / 1e9:.2f} GB; "
          f"measured reserved / plan peak = {reserved / plan.peak:.3f}")
    assert reserved <= plan.usable
    assert allocated <= 1.1 * plan.peak
