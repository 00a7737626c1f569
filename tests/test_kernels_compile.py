"""The Triton kernels compile for an H100/H200 (sm_90) and fit its shared memory: no GPU needed.

Triton compiles ahead of time for a named target without a device (the launcher, which needs
the CUDA driver, is never built). This catches what the interpreter cannot: lowering errors,
shapes tl.dot refuses, shared-memory overflow of the autotune configs. Running the compiled
kernels still needs a GPU (``tokenflow doctor --check --device cuda``).

Compiling needs the kernels as real ``triton.jit`` functions, not the interpreter's: under
TRITON_INTERPRET=1 (which conftest sets) this module re-runs itself in a fresh process without it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from tokenflow.kernels.gather import triton as gt  # noqa: E402
from tokenflow.kernels.keyframe_attention import triton as at  # noqa: E402
from tokenflow.kernels.nearest import triton as nt  # noqa: E402
from tokenflow.kernels.support import interpreting  # noqa: E402

INTERPRETED = interpreting()


def _ptxas_missing():
    nvidia = Path(triton.__file__).parent / "backends" / "nvidia"
    return not nvidia.is_dir() or not any((nvidia / "bin").glob("ptxas*"))


def test_sm90_compiles_in_a_process_without_the_interpreter():
    if not INTERPRETED:
        pytest.skip("this process compiles directly")
    if _ptxas_missing():
        pytest.skip("this triton wheel has no NVIDIA backend/ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    # everything but this wrapper itself ran and passed
    assert "failed" not in summary and "error" not in summary and " 1 skipped" in summary, summary

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover
    pytest.skip("this triton has no ahead-of-time compile API", allow_module_level=True)

SM90 = GPUTarget("cuda", 90, 32)
SM90_SMEM_LIMIT = 232448  # bytes per block (227 KiB opt-in)
ESIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path, monkeypatch):
    if INTERPRETED and request.node.name != "test_sm90_compiles_in_a_process_without_the_interpreter":
        pytest.skip("runs in the fresh process")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")


def _compile(fn, types, constexprs, warps, stages, aligned):
    """types: runtime argument -> triton type; aligned: arguments marked divisible by 16, as triton
    marks contiguous tensors whose channel count is a multiple of 16 (SD: 320, 640, 1280)."""
    sig = {n: "constexpr" if n in constexprs else types[n] for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=SM90, options={"num_warps": warps, "num_stages": stages})


ATTN_INTS = ["sqb", "sqf", "sqs", "skb", "skf", "sks", "svb", "svf", "svs", "sob", "sof", "sos", "n_kf", "seq", "heads"]


def _attention(dtype, head_dim, config, inject=False):
    types = {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")}
    types.update({n: "i32" for n in ATTN_INTS}, qk_scale="fp32")
    block_d = max(16, triton.next_power_of_2(head_dim))
    constexprs = dict(config.kwargs, HEAD_DIM=head_dim, INJECT_QK=inject, BLOCK_D=block_d, UPCAST=False,
                      PRECISION="ieee" if dtype == "fp32" else "tf32")
    aligned = ["Q", "K", "V", "Out"] + [n for n in ATTN_INTS if n.startswith("s") and n != "seq"]
    return _compile(at._keyframe_attention_kernel, types, constexprs, config.num_warps, config.num_stages, aligned)


class _Q:  # what the autotuner hands the pruner: the positional args (only Q's element size is read)
    def __init__(self, esize):
        self._esize = esize

    def element_size(self):
        return self._esize


@pytest.mark.parametrize("dtype,head_dim", [("fp16", 64), ("fp16", 80), ("fp16", 160), ("fp32", 64), ("fp32", 160)])
def test_every_attention_config_the_autotuner_may_try_compiles_and_fits(dtype, head_dim):
    """Compiled for real: the shared memory the compiler reports, for every config kept by the pruner."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    kept = at._prune_configs(at._tuning_configs(), {"Q": _Q(ESIZE[dtype])}, BLOCK_D=block_d)
    assert kept
    for c in kept:
        kernel = _attention(dtype, head_dim, c)
        assert kernel.metadata.shared <= SM90_SMEM_LIMIT, (c, kernel.metadata.shared)


@pytest.mark.parametrize("dtype,head_dim,inject", [("fp16", 64, False), ("bf16", 80, True), ("fp16", 160, False),
                                                   ("fp32", 40, False)])
def test_attention_compiles_for_sm90_with_tensor_cores(dtype, head_dim, inject):
    block_d = max(16, triton.next_power_of_2(head_dim))
    config = at._prune_configs(at._tuning_configs(), {"Q": _Q(ESIZE[dtype])}, BLOCK_D=block_d)[0]
    kernel = _attention(dtype, head_dim, config, inject)
    expected = at.smem_bytes(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], block_d, config.num_stages,
                             ESIZE[dtype])
    assert abs(kernel.metadata.shared - expected) <= 1024, (kernel.metadata.shared, expected)
    assert kernel.metadata.shared <= SM90_SMEM_LIMIT
    if dtype != "fp32":
        assert "wgmma" in kernel.asm["ptx"]  # Hopper tensor-core MMA, not a scalar fallback


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_cosine_nearest_and_gather_compile_for_sm90(dtype):
    ints = ["sxf", "sxn", "skk", "skm", "spf", "spp", "n_tokens", "n_keys", "channels", "n_pairs"]
    types = {"X": f"*{dtype}", "Keys": f"*{dtype}", "Pairs": "*i64", "Idx": "*i64", **{n: "i32" for n in ints}}
    for config in nt._nearest_configs():
        kernel = _compile(nt._cosine_argmax_kernel, types,
                          dict(config.kwargs, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32"),
                          config.num_warps, config.num_stages, ["X", "Keys", "Pairs", "Idx", "sxf", "sxn", "skk", "skm"])
        assert kernel.metadata.shared <= SM90_SMEM_LIMIT
    ints = ["skb", "skk", "skm", "sif", "sip", "spf", "spp", "swf", "swp", "sob", "sof", "son", "n_tokens", "n_keys", "channels",
            "n_pairs"]
    types = {"KF": f"*{dtype}", "Idx": "*i64", "Pairs": "*i64", "W": "*fp32", "Out": f"*{dtype}",
             **{n: "i32" for n in ints}}
    kernel = _compile(gt._gather_blend_kernel, types, dict(BLOCK_N=gt.GATHER_BLOCKS[0], BLOCK_C=gt.GATHER_BLOCKS[1]),
                      4, 3, ["KF", "Idx", "Pairs", "W", "Out"])
    assert kernel.metadata.shared <= SM90_SMEM_LIMIT
