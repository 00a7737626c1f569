"""The memory planner on a CUDA device, simulated on CPU: SD 2.1-base's architecture on the meta
device (``models.architectures.meta_model``: shapes only) planned for ``cuda`` under a given
budget. Call caps, the int32 guard, device overheads, reserved memory and the lines the plan
used to miss (search buffers, CUDA graph pools, keyframe staging). No GPU needed or used."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tokenflow.engine import memory
from tokenflow.engine.memory import INT32_ELEMENTS, Calibration, LiveTensorTracker
from tokenflow.engine.planner import GPU_UNET_ROWS, GPU_VAE_ELEMENTS, make_plan
from tokenflow.engine.store import staging_slots
from tokenflow.errors import ResourceError
from tokenflow.kernels.nearest import cosine_nearest_static, cosine_nearest_torch
from tokenflow.models.architectures import meta_model

GIB = 2**30
FRAMES, LATENT = 200, (64, 64)     # 200 frames at 512x512
KEYFRAMES, STEPS = 25, 51          # keyframe spacing 8; 50 edit steps (+ the noisiest latents)


@pytest.fixture(scope="module")
def sd21_cuda():
    return meta_model("sd21", "SD 2.1-base", torch.device("cuda"), torch.float16)


def _plan(model, budget, **kw):
    args = dict(frames=FRAMES, latent_size=LATENT, branches=3, keyframes=KEYFRAMES, window=0, steps=STEPS,
                budget=budget, budget_source="test", calibration=Calibration(), host=(2**50, "test"),
                nearest_backend="triton")
    return make_plan(model, **{**args, **kw})


def test_a_16_gib_card_plans_capped_calls_under_reserved_memory_with_a_margin(sd21_cuda):
    plan = _plan(sd21_cuda, 16 * GIB)
    # call caps: UNet rows and VAE frames, and no tensor past int32 indexing
    assert 3 * plan.chunk_frames <= GPU_UNET_ROWS and plan.inversion_frames <= GPU_UNET_ROWS
    biggest_vae = memory.vae_largest_frame_elements(sd21_cuda.vae.config, 512, 512)
    assert biggest_vae == 256 * 512 * 512
    assert plan.vae_frames * biggest_vae <= GPU_VAE_ELEMENTS and plan.vae_frames == 8
    assert max(plan.largest_tensor.values()) <= INT32_ELEMENTS
    assert plan.call_caps["int32_unet_rows"] == INT32_ELEMENTS // (8 * 320 * 64 * 64)   # GEGLU [S, 8C] per row
    # the budget less the CUDA context, library workspaces and a 5 % margin holds the reserved peak
    assert set(plan.overheads) == {"cuda_context", "cublas_workspace", "cudnn_workspace", "margin"}
    assert plan.overheads["margin"] >= 0.05 * 16 * GIB
    assert plan.peak <= plan.usable == 16 * GIB - sum(plan.overheads.values())
    assert plan.peak + sum(v for k, v in plan.overheads.items() if k != "margin") <= 0.95 * 16 * GIB
    assert plan.reserved_factor > 1   # reserved memory, not the allocator's allocated bytes
    row = plan.unet_row_bytes
    assert plan.peaks["invert"] >= plan.weights_bytes + plan.latents_bytes + plan.reserved_factor * plan.inversion_frames * row
    text = plan.describe()
    for words in ("CUDA context", "cuBLAS workspaces", "cuDNN workspace", "safety margin", "usable", "reserved",
                  "unmeasured on GPU", "int32 indexing allows", "nearest-neighbour search"):
        assert words in text, (words, text)
    event = json.loads(json.dumps(plan.as_dict()))
    assert {"cuda_context", "cublas_workspace", "cudnn_workspace", "margin", "device_staging", "pinned_host_staging",
            "graph_pools", "nearest_triton"} <= set(event["breakdown"])
    assert event["usable"] == plan.usable and event["call_caps"]["vae_frames"] == 8


def test_a_large_budget_is_held_by_the_caps_not_the_memory(sd21_cuda):
    """An H200's default budget: before the caps, 200-frame (600-row) propagation and 200-frame VAE calls."""
    plan = _plan(sd21_cuda, 132 * GIB)
    assert (plan.chunk_frames, plan.inversion_frames, plan.vae_frames) == (GPU_UNET_ROWS // 3, GPU_UNET_ROWS, 8)
    assert plan.peak < 0.2 * plan.usable
    swept = _plan(sd21_cuda, 132 * GIB, row_cap=64, vae_cap=2)   # what a sweep (bench/gpu_check) sets
    assert (swept.chunk_frames, swept.inversion_frames, swept.vae_frames) == (21, 64, 2)
    assert swept.call_caps["propagation_rows"] == 64 and swept.call_caps["vae_frames"] == 2


def test_a_tiny_budget_is_refused_with_a_budget_that_fits(sd21_cuda):
    with pytest.raises(ResourceError) as caught:
        _plan(sd21_cuda, 4 * GIB)
    text = str(caught.value)
    assert "usable once the CUDA context, library workspaces and a margin are taken off" in text
    assert "--frames" in text and "--size" in text
    suggested = float(re.search(r"--memory-budget to at least ([0-9.]+)GiB", text)[1])
    plan = _plan(sd21_cuda, int(suggested * GIB))   # the keyframe pass (75 rows in one call) fits, just
    assert plan.peak <= plan.usable and plan.peaks["keyframes"] > plan.usable - 0.1 * GIB
    with pytest.raises(ResourceError, match="the keyframe pass needs"):
        _plan(sd21_cuda, int((suggested - 0.1) * GIB))


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_no_planned_tensor_passes_int32_indexing(device):
    model = meta_model("sd21", "SD 2.1-base", torch.device(device), torch.float16)
    with pytest.raises(ResourceError, match=r"a propagation call would hold a tensor of 3,145,728,000 elements, "
                                            r"past the 2,147,483,647 .*--chunk-frames"):
        _plan(model, 2**50, chunk_frames=100)           # 300 rows x 8 x 320 x 4096
    with pytest.raises(ResourceError, match=r"the keyframe pass would hold .*--keyframe-window"):
        _plan(model, 2**50, branches=7, keyframes=40)   # 3 prompts: 280 rows in one call
    plan = _plan(model, 2**50, branches=7, keyframes=40, window=20, frames=320, row_cap=10**6, vae_cap=10**6)
    assert max(plan.largest_tensor.values()) <= INT32_ELEMENTS   # uncapped, every call still stays under it
    assert plan.vae_frames == INT32_ELEMENTS // (256 * 512 * 512)


def test_static_search_tiles_and_graph_pools_are_counted_with_compile(sd21_cuda):
    eager = _plan(sd21_cuda, 16 * GIB)
    static = _plan(sd21_cuda, 16 * GIB, backend="compile", nearest_backend="static")
    assert static.nearest == "static" and static.nearest_bytes > 100 * eager.nearest_bytes
    assert static.nearest_bytes == max(memory.search_bytes("static", static.chunk_frames, KEYFRAMES, s, c, 2)
                                       for s, c in memory.attention_layer_shapes(sd21_cuda.unet, *LATENT).values())
    # one graph pool (CUDA graph trees share it), about the largest captured call, held through the VAE
    assert eager.graph_pool_bytes == 0 and static.graph_pool_bytes > 0
    calls = {"invert": static.inversion_frames, "keyframes": 3 * static.keyframe_call, "propagate": 3 * static.chunk_frames}
    assert static.graph_pool_bytes >= static.reserved_factor * max(calls.values()) * static.unet_row_bytes
    assert static.peaks["vae"] >= static.weights_bytes + static.graph_pool_bytes + static.vae_frames * static.vae_row_bytes
    assert static.peak <= static.usable and static.chunk_frames < eager.chunk_frames
    text = static.describe()
    assert "static search tiles" in text and "CUDA graph pool" in text and "unverified on GPU" in text
    assert static.as_dict()["breakdown"]["nearest_static"] == static.nearest_bytes
    # compile on a CPU holds no CUDA graphs
    cpu = meta_model("sd21", "SD 2.1-base", torch.device("cpu"), torch.float16)
    assert _plan(cpu, 16 * GIB, backend="compile", nearest_backend="static").graph_pool_bytes == 0


def test_an_offloaded_store_counts_device_and_pinned_host_staging(sd21_cuda):
    plan = _plan(sd21_cuda, 16 * GIB, keyframe_store="host")
    per_keyframe = plan.store_bytes // KEYFRAMES
    # the slots a chunk of consecutive frames can read (spacing 8): what the store allocates
    assert plan.staging_bytes == staging_slots(plan.chunk_frames, FRAMES // KEYFRAMES, KEYFRAMES) * per_keyframe
    assert plan.staging_bytes < KEYFRAMES * per_keyframe
    assert plan.pinned_staging_bytes == plan.staging_bytes
    assert plan.host.pinned_staging == plan.staging_bytes and "pinned_staging" in plan.host.phases["edit"]
    assert plan.peaks["keyframes"] >= plan.weights_bytes + plan.latents_bytes + plan.staging_bytes
    assert "staged per chunk: device" in plan.describe() and "pinned host" in plan.describe()
    breakdown = plan.as_dict()["breakdown"]
    assert breakdown["device_staging"] == breakdown["pinned_host_staging"] == plan.staging_bytes


@pytest.mark.parametrize("kind,search", [("static", cosine_nearest_static), ("torch", cosine_nearest_torch)])
def test_search_bytes_bound_what_the_search_allocates(kind, search):
    """The planner's search buffers against the live tensor bytes of the real search (CPU, float16
    features: the float32 copies are part of it)."""
    g = torch.Generator().manual_seed(0)
    for frames, keys, tokens, channels in ((3, 4, 256, 32), (6, 4, 1024, 64)):
        x = torch.randn(frames, tokens, channels, generator=g).half()
        k = torch.randn(keys, tokens, channels, generator=g).half()
        pairs = torch.tensor([[0, 1]] * frames)   # every frame reads keyframe 0: the torch search's widest tile
        tracker = LiveTensorTracker()
        with tracker:
            search(x, k, pairs)
        predicted = memory.search_bytes(kind, frames, keys, tokens, channels, 2)
        assert tracker.peak <= predicted < 1.6 * tracker.peak, (frames, tokens, tracker.peak, predicted)
        widest = _LargestOutput()
        with widest:
            search(x, k, pairs)
        assert widest.numel == memory.search_largest_elements(kind, frames, tokens, channels, 2)


class _LargestOutput(TorchDispatchMode):
    """The most elements of any tensor an op returns inside the block."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_the_default_cuda_budget_is_all_the_process_may_occupy(monkeypatch):
    """free + torch's reserved + the context this process already holds: the planner then takes
    the context, workspaces and margin off once (a fake device: no GPU here)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 16 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: GIB)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    budget, source = memory.default_budget(torch.device("cuda"))
    assert budget == 11 * GIB + memory.CUDA_CONTEXT
    assert source.startswith("free on Fake GPU + torch's reserved + this process's CUDA context")
    usable = budget - sum(memory.device_overheads("cuda", budget).values())
    assert usable < 11 * GIB - memory.GPU_MARGIN_FRACTION * budget + 1
