"""``tokenflow bench``: the FLOP model, the "original" kernel backends, the runner and its outputs.

FLOP checks compare the analytic model (``tokenflow.benchmark.flops``) with
``torch.utils.flop_counter.FlopCounterMode``, which counts exactly the same operations
(convolutions, mm/addmm/bmm, attention products) at 2 FLOPs per multiply-add. The CPU's fused
SDPA kernel has no FLOP formula in the counter, so the math backend is forced: its attention then
runs as counted bmm calls. Both sides are integer arithmetic, hence the tolerance of 1e-9
relative: any disagreement is a missing or extra layer in the model, not rounding.
"""
import argparse
import contextlib
import json
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tokenflow.app.run import run_command
from tokenflow.benchmark import architectures, cli, flops, measure, peak, run, system
from tokenflow.benchmark import config as bench_config
from tokenflow.benchmark.original_kernels import (
    cosine_nearest_original,
    gather_blend_original,
    keyframe_attention_original,
)
from tokenflow.config import EditConfig
from tokenflow.errors import ConfigError
from tokenflow.io.cache import InversionCache
from tokenflow.io.progress import Reporter
from tokenflow.kernels import explain, verify
from tokenflow.kernels.gather import gather_blend_torch
from tokenflow.kernels.keyframe_attention import keyframe_attention, keyframe_attention_torch
from tokenflow.kernels.nearest import cosine_nearest_torch
from tokenflow.models import architectures as model_architectures
from tokenflow.models.random_weights import build_random, tokenizer_vocab

REL = 1e-9
CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """Tests that run whole edits use one thread: on a shared 2-core machine a second thread that
    waits for a busy core slows every op down far more than it speeds it up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def counting():
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        yield counter


# ----------------------------------------------------------------------------- FLOP model


@pytest.mark.parametrize("h,w", [(16, 16), (12, 20), (11, 9)])
def test_unet_flops_match_flop_counter(tiny_sd, h, w):
    x, text = torch.randn(2, 4, h, w), torch.randn(2, 77, 32)
    with counting() as counter:
        tiny_sd.unet(x, torch.tensor(500), encoder_hidden_states=text)
    expected = 2 * flops.unet_cost(tiny_sd.unet.config, h, w).plain()
    assert counter.get_total_flops() == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_real_sd_unet_and_vae_flops_on_meta(arch):
    """The real architectures' shapes, run on the meta device (no memory, no arithmetic)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = model_architectures.ARCHITECTURES[arch][0]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**model_architectures.SD_VAE)
        x, text = torch.randn(1, 4, 48, 40), torch.randn(1, 77, unet_config["cross_attention_dim"])
        image = torch.randn(1, 3, 96, 128)
    # the published parameter counts of SD 1.5 / 2.1-base's UNet and SD's VAE
    assert sum(p.numel() for p in unet.parameters()) == {"sd15": 859520964, "sd21": 865910724}[arch]
    assert sum(p.numel() for p in vae.parameters()) == 83653863
    with counting() as counter:
        unet(x, torch.tensor(1, device="meta"), encoder_hidden_states=text)
    assert counter.get_total_flops() == pytest.approx(flops.unet_cost(unet.config, 48, 40).plain(), rel=REL)
    with counting() as counter:
        z = vae.encode(image).latent_dist.mean
    assert counter.get_total_flops() == pytest.approx(flops.vae_encode(vae.config, 96, 128), rel=REL)
    with counting() as counter:
        vae.decode(z)
    assert counter.get_total_flops() == pytest.approx(flops.vae_decode(vae.config, 12, 16), rel=REL)


class FlopReporter(Reporter):
    """Counts the FLOPs of each stage / sub-stage from a FlopCounterMode running around the edit."""

    def __init__(self):
        super().__init__(quiet=True)
        self.counter, self.flops = None, {}

    @contextlib.contextmanager
    def _count(self, name):
        before = self.counter.get_total_flops()
        yield
        self.flops[name] = self.flops.get(name, 0) + self.counter.get_total_flops() - before

    @contextlib.contextmanager
    def stage(self, name, total=None, **kwargs):
        with self._count(name), super().stage(name, total, **kwargs) as stage:
            yield stage

    @contextlib.contextmanager
    def timed(self, name, *args, **kwargs):
        with self._count(name), super().timed(name, *args, **kwargs):
            yield


def _edit_cases():
    cases = [dict(propagation="original"), dict(propagation="paper")]
    if "keyframe_window" in EditConfig.__dataclass_fields__:
        cases.append(dict(propagation="original", keyframe_window=2))
    if "inversion" in EditConfig.__dataclass_fields__:   # frames x edit timesteps (after the skip) inverted
        cases += [dict(propagation="original", inversion="ddpm"), dict(propagation="paper", inversion="ddpm", skip=1)]
    return cases


@pytest.mark.parametrize("overrides", _edit_cases(), ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_stage_of_an_edit_matches_flop_counter(tiny_sd, overrides, one_thread):
    """Whole tiny edit (5 frames, 3 groups: pairs 1 and 2, K=3): each stage's counted FLOPs equal
    the analytic ones computed from the edit's own keyframes and plans."""
    from tokenflow.method.editor import Editor

    clip = run.synthetic_clip(5, (96, 80))
    cfg = EditConfig(frames=5, inversion_steps=2, steps=2, keyframe_spacing=2, prompt="p", inversion_prompt="q",
                     attention_backend="torch", nearest_backend="torch", **overrides).validate()
    reporter = FlopReporter()
    editor = Editor(tiny_sd, cache=InversionCache(enabled=False), reporter=reporter)
    try:
        samples_before = editor.runner.samples
        with counting() as counter:
            reporter.counter = counter
            result = editor.edit(clip, config=cfg)
        samples = editor.runner.samples - samples_before
    finally:
        editor.tokenflow.remove()
    work = run.work_of(tiny_sd, result, cfg, 5, (10, 12))
    stages = ["encode", "invert", "edit", "decode"] + [s for s in ("keyframes", "propagate") if s in reporter.flops]
    for stage in stages:
        assert reporter.flops[stage] == pytest.approx(work.flops[stage], rel=REL), stage
    assert samples == work.samples["total"]


def test_keyframe_pass_counts_extended_attention():
    """S_kv = K*S for uncond/cond, S for the source branch; propagation has no attention at all."""
    cost = flops.UNetCost(base=10.0, layers=(flops.SelfAttentionLayer(tokens=4, channels=2),))
    proj = 4 * 2 * 2 * 2 * 4
    assert cost.plain() == 10 + proj + 4 * 4 * 4 * 2
    assert cost.keyframe_pass(3) == 9 * (10 + proj) + 3 * 4 * 4 * 4 * 2 + 6 * 4 * 4 * 12 * 2
    assert cost.propagation_frame(2) == 3 * 10 + 2 * 4 * 8 * 2


# ----------------------------------------------------------------------------- "original" backends


def _rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("branches,n_kf,seq,heads,dim", [(3, 1, 7, 1, 8), (3, 3, 13, 2, 5), (5, 2, 33, 3, 16),
                                                        (2, 4, 9, 5, 3)])
@pytest.mark.parametrize("inject", [False, True])
def test_original_attention_matches_reference_fp32(branches, n_kf, seq, heads, dim, inject):
    g = torch.Generator().manual_seed(branches * 1000 + n_kf * 100 + seq)
    q, k, v = (_rand(g, branches, n_kf, seq, heads * dim) for _ in range(3))
    ours = keyframe_attention_original(q, k, v, heads, inject)
    ref = keyframe_attention_torch(q.double(), k.double(), v.double(), heads, inject)
    assert torch.allclose(ours.double(), ref, atol=2e-6, rtol=0)
    assert torch.allclose(ours, keyframe_attention(q, k, v, heads, inject_qk=inject, backend="original"))


@pytest.mark.parametrize("F,N,K,M,C,P", [(3, 9, 2, 11, 5, 2), (1, 4, 1, 4, 3, 1), (6, 17, 3, 23, 8, 2),
                                         (4, 6, 5, 7, 33, 3)])
def test_original_nearest_and_gather_match_reference_fp32(F, N, K, M, C, P):
    g = torch.Generator().manual_seed(F * N + M)
    x, keys = _rand(g, F, N, C), _rand(g, K, M, C)
    pairs = torch.randint(K, (F, P), generator=g)
    pairs[0, -1] = -1
    if F > 2:
        pairs[1] = pairs[2]            # frames sharing their keyframes (one matrix for both)
    idx = cosine_nearest_original(x, keys, pairs)
    assert verify.nearest_mismatches(idx, x, keys, pairs) == 0
    assert (idx == cosine_nearest_torch(x, keys, pairs)).float().mean() > 0.99   # ties aside, identical
    kf_out = _rand(g, 3, K, M, C)
    weights = torch.rand(F, P, generator=g) * (pairs >= 0)
    ours = gather_blend_original(kf_out, idx, pairs, weights)
    assert torch.allclose(ours, gather_blend_torch(kf_out, idx, pairs, weights), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["keyframe_attention", "cosine_nearest", "gather"])
def test_original_backends_pass_the_backend_checks(op, dtype):
    """``kernels.verify``'s rules: attention/gather error at most twice the torch backend's own
    error in the same dtype against float64 (+1e-5 in float32); nearest indices equal to the float64
    argmax on the same rounded inputs except for ties within 1e-5. Irregular shapes."""
    from tokenflow.kernels.probe import sample_args

    for seed, (heads, dim, n_kf, seq) in enumerate([(3, 24, 3, 37), (2, 40, 2, 70), (5, 8, 4, 19)]):
        args, _ = sample_args(op, CPU, dtype, heads=heads, dim=dim, n_kf=n_kf, seq=seq,
                              generator=torch.Generator().manual_seed(seed))
        for result in verify.check(op, "original", args):
            assert result.ok, result.describe()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_original_nearest_cuda_scoring_passes_the_checks(monkeypatch, dtype):
    """The CUDA path for half inputs (raw dot products, then division by float32 norms), run on the
    CPU: products of half-precision numbers are exact in float32 either way."""
    from tokenflow.benchmark import original_kernels as original_pattern
    from tokenflow.kernels.probe import sample_args

    monkeypatch.setattr(original_pattern, "_divide_after", lambda t: True)
    for seed, (dim, n_kf, seq) in enumerate([(24, 3, 37), (40, 2, 70), (160, 4, 64)]):
        args, _ = sample_args("cosine_nearest", CPU, dtype, dim=dim, n_kf=n_kf, seq=seq,
                              generator=torch.Generator().manual_seed(seed))
        (result,) = verify.check("cosine_nearest", "original", args)
        assert result.ok, result.describe()


def test_the_backend_checks_catch_a_wrong_original_kernel():
    """The checks above can fail: a wrong scale, a wrong argmax or a dropped weight are caught."""
    from tokenflow.kernels.probe import sample_args

    args, _ = sample_args("keyframe_attention", CPU, torch.float16, heads=2, dim=16, n_kf=2, seq=21)
    wrong = lambda q, k, v, heads, inject: keyframe_attention_original(q * 1.05, k, v, heads, inject)  # noqa: E731
    assert not verify.check_attention("original", *args, impl=wrong).ok
    args, _ = sample_args("cosine_nearest", CPU, torch.bfloat16)
    off = lambda x, keys, pairs: (cosine_nearest_original(x, keys, pairs) + 1) % keys.shape[1]  # noqa: E731
    assert not verify.check_nearest("original", *args, impl=off).ok
    args, _ = sample_args("gather", CPU, torch.float32)
    half = lambda kf, idx, pairs, w: gather_blend_original(kf, idx, pairs, w * 0.999)  # noqa: E731
    assert not verify.check_gather("original", *args, impl=half).ok


@pytest.mark.parametrize("op", ["keyframe_attention", "cosine_nearest", "gather"])
def test_original_backends_are_only_used_by_name(op):
    from tokenflow.kernels.probe import sample_args

    args, _ = sample_args(op, CPU, torch.float32)
    assert "original" not in {v.name for v in explain(op, *args)}   # never offered as a choice
    verdicts = {v.name: v for v in explain(op, *args, backend="original")}
    assert verdicts["original"].runs and verdicts["original"].chosen
    assert "original implementation" in verdicts["original"].auto_reason


# ----------------------------------------------------------------------------- runner and outputs


def _args(*extra):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    return parser.parse_args(["bench", "--preset", "smoke", "--frames", "4", "--inversion-steps", "2",
                              "--steps", "2", "--keyframe-spacing", "2", "--idle-wait", "0", "--threads", "1", *extra])


REQUIRED_STAGE_KEYS = {"seconds", "repeats_s", "frames_per_s", "samples_per_s", "tflops", "fraction_of_peak",
                       "peak_memory_bytes"}


@pytest.fixture(scope="module")
def compare_doc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    path = folder / "out" / "bench.json"
    assert cli.main(_args("--compare", "torch,original", "--repeats", "2", "--json", str(path))) == 0
    return json.loads(path.read_text()), folder


def test_runner_json_has_every_stage_and_key(compare_doc):
    doc, _ = compare_doc
    for key in ("device", "versions", "git", "command", "settings", "load", "matmul_peak", "variants", "ratios"):
        assert key in doc, key
    assert {"torch", "diffusers"} <= set(doc["versions"])
    assert doc["matmul_peak"]["float32"]["tflops"] > 0
    assert set(doc["load"]["start"]) >= {"loadavg", "busy_cpus"}
    assert doc["model"]["random_weights"] and doc["clip"]["frames"] == 4
    for entry in doc["variants"]:
        assert entry["load_before"] and entry["load_after"] and entry["unet_samples_counted"] > 0
        assert len(entry["others_busy_cpus"]) == 2 and len(entry["idle_wait"]) == 2 and entry["finite"]
        assert not any("counted" in note for note in entry["notes"]), entry["notes"]
        for stage in bench_config.STAGES:
            s = entry["stages"][stage]
            assert REQUIRED_STAGE_KEYS <= set(s), (stage, s)
            assert s["seconds"] > 0 and len(s["repeats_s"]) == 2 and s["peak_memory_bytes"] > 0, (stage, s)
            assert s["tflops"] > 0 and s["frames_per_s"] > 0
        assert entry["stages"]["invert"]["samples_per_s"] > 0 and entry["stages"]["encode"]["samples_per_s"] is None


def test_compare_reports_ratios_against_the_first_variant(compare_doc):
    doc, _ = compare_doc
    assert [v["name"] for v in doc["variants"]] == ["torch", "original"]
    assert all(r == 1.0 for r in doc["ratios"]["torch"].values())
    original = doc["variants"][1]
    for stage, ratio in doc["ratios"]["original"].items():
        assert ratio == pytest.approx(doc["variants"][0]["stages"][stage]["seconds"]
                                      / original["stages"][stage]["seconds"])
    assert original["overrides"]["attention_backend"] == "original"
    assert original["edit_config"]["chunk_frames"] == 2                  # one keyframe group per call
    assert original["max_abs_latent_diff_vs_first"] < 1e-3               # same edit, other kernels


def test_plot_writes_a_png(compare_doc):
    pytest.importorskip("matplotlib")
    from tokenflow.benchmark import report

    doc, folder = compare_doc
    path = report.write_plot(doc, str(folder / "plot.png"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_print_every_stage_and_the_ratios(compare_doc):
    from tokenflow.benchmark import report

    text = report.format_tables(compare_doc[0])
    assert "speed-up vs torch" in text and "propagation" in text and "keyframe pass" in text


def test_missing_matplotlib_is_one_clear_error(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import fails as if not installed
    assert run_command(lambda: cli.main(_args("--plot", str(tmp_path / "p.png")))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install matplotlib" in err


@pytest.mark.parametrize("flags,code,words", [
    (["--size", "100x7"], 2, "multiple of 8"),
    (["--compare", "torch,warp9"], 2, "unknown variant 'warp9'"),
    (["--repeats", "0"], 2, "repeats"),
    (["--inversion-steps", "3"], 2, "inversion timesteps"),
    (["--dtype", "float8"], 2, "dtype"),
    (["--video", "/nonexistent/clip.mp4"], 3, "clip.mp4"),
])
def test_bad_flags_are_one_line_errors(capsys, flags, code, words):
    assert run_command(lambda: cli.main(_args(*flags))) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_variant_names():
    v = bench_config.variant_overrides
    assert v("triton+chunk4") == {"attention_backend": "triton", "nearest_backend": "triton", "chunk_frames": 4}
    assert v("chunk=3") == {"chunk_frames": 3} and v("faiss") == {"nearest_backend": "faiss"}
    assert v("original")["inverted_latents"] == "disk"
    assert v("attn=xformers+latents=host") == {"attention_backend": "xformers", "inverted_latents": "host"}
    assert v("inversion=ddim500") == v("ddim500") == {"inversion": "ddim", "inversion_steps": 500}
    assert v("inversion=ddpm") == v("ddpm") == {"inversion": "ddpm"}
    assert v("ddpm50+chunk2") == {"inversion": "ddpm", "_ddpm_steps": 50, "chunk_frames": 2}
    for bad in ("ddim", "inversion=ddim0", "inversion=ddpm1001", "inversion=euler"):
        with pytest.raises(ConfigError):
            v(bad)


def test_inversion_variants_check_their_steps_before_any_model_builds():
    base = bench_config.BenchConfig(steps=50, inversion_steps=20)
    run.check_schedule(base.replace(variants=("ddim500", "ddpm50")))   # each variant's own inversion
    with pytest.raises(ConfigError, match="exceeds the 20 inversion steps of variant 'default'"):
        run.check_schedule(base)
    with pytest.raises(ConfigError, match="its steps are --steps \\(50\\): use --steps 10"):
        run.edit_config(base, bench_config.Variant("ddpm10", bench_config.variant_overrides("ddpm10")), CPU,
                        torch.float32, "tiny")


# ----------------------------------------------------------------------------- helpers


def test_matmul_peak_and_load_guard_report_numbers(monkeypatch):
    result = peak.measure(CPU, torch.float32, size=64, repeats=2, warmup=0)
    assert result.tflops > 0 and len(result.all_s) == 2
    waited = system.wait_until_idle(max_wait_s=0)        # one real /proc/stat sample
    assert set(waited) == {"waited_s", "idle", "busy_cpus", "threshold"} and waited["waited_s"] >= 0
    # the guard waits for the machine, sample by sample, not for the clock: scripted samples
    samples = iter([3.0, 2.0, 0.25])
    monkeypatch.setattr(system, "busy_cpus", lambda *a: next(samples))
    waited = system.wait_until_idle(max_wait_s=3600, threshold=0.5)
    assert waited["idle"] and waited["busy_cpus"] == 0.25 and next(samples, None) is None   # three samples
    calls = []
    monkeypatch.setattr(system, "busy_cpus", lambda *a: calls.append(a) or 3.0)
    waited = system.wait_until_idle(max_wait_s=0, threshold=0.5)   # no time to wait: one sample, not idle
    assert not waited["idle"] and waited["busy_cpus"] == 3.0 and len(calls) == 1


def test_measure_times_each_call_after_the_warm_up():
    calls = []
    times = measure.time_runs(lambda: calls.append(1), CPU, reps=4, warmup=2)
    assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)
    assert measure.median_seconds(lambda: None, CPU, reps=3, warmup=0) >= 0
    assert measure.fmt_bytes(3 * 2**20).strip() == "3.0 MiB" and measure.fmt_bytes("ValueError: x") == "ValueError: x"


def test_measure_writes_the_kernel_results_atomically_with_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_nearest.py", "--reps", "1"])
    rows = [{"variant": "torch", "ms": 1.5, "speedup": float("nan")}]
    path = measure.write_results("nearest", CPU, rows, None, {"dtype": "float32"}, tmp_path / "results")
    assert path.parent == tmp_path / "results" and path.name.startswith("nearest_cpu_")
    doc = json.loads(path.read_text())
    assert doc["results"] == [{"variant": "torch", "ms": 1.5, "speedup": None}], "NaN is not JSON: null"
    assert doc["benchmark"] == "nearest" and doc["dtype"] == "float32" and "torch" in doc["versions"]
    assert doc["command"].endswith("bench_nearest.py --reps 1") and doc["device"]
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp file left"


def test_memory_tracker_nests_stages():
    tracker = system.MemoryTracker(CPU)
    with tracker.stage("edit"):
        with tracker.stage("keyframes"):
            block = torch.ones(8 << 20, dtype=torch.uint8)  # 8 MiB touched
            del block
    assert tracker.peaks["edit"] >= tracker.peaks["keyframes"] > 0


def test_random_architecture_weights_are_finite_seeded_and_built_on_the_device():
    """The benchmark's architectures use the tiny model's recipe (models.random_weights), built on
    meta and allocated on the target device in the target dtype."""
    factory = lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))  # noqa: E731
    first = build_random(factory, architectures.SEED, "t", device=torch.device("cpu"), dtype=torch.float16)
    again = build_random(factory, architectures.SEED, "t", device=torch.device("cpu"), dtype=torch.float16)
    on_meta = build_random(factory, architectures.SEED, "t", device=torch.device("cpu"), dtype=torch.float32)
    plain = build_random(factory, architectures.SEED, "t")
    assert first[0].weight.dtype == torch.float16 and torch.isfinite(first[0].weight).all()
    assert torch.equal(first[0].weight, again[0].weight)
    assert all(torch.equal(a, b) for a, b in zip(on_meta.parameters(), plain.parameters())), "built on meta or not"
    assert first[0].weight.abs().max() <= 64 ** -0.5 and first[0].weight.std().item() == pytest.approx(
        (3 * 64) ** -0.5, rel=0.1)   # U(+-1/sqrt(fan_in))
    assert (first[1].weight.float() - 1).abs().max() < 0.6 and first[1].bias.abs().max() < 0.6
    with pytest.raises(RuntimeError, match="buffers"):
        build_random(lambda: torch.nn.BatchNorm1d(4), 0, "bn", device=torch.device("cpu"), dtype=torch.float32)


def test_benchmark_text_encoder_and_tokenizer_come_from_the_shared_recipe():
    encoder = architectures.build_text_encoder("sd21")
    assert encoder.config.hidden_size == 1024 and encoder.config.num_hidden_layers == architectures.TEXT_LAYERS
    assert encoder.config.vocab_size == len(tokenizer_vocab()) and encoder.config.hidden_act == "gelu"
    again = architectures.build_text_encoder("sd21")
    assert all(torch.equal(a, b) for a, b in zip(encoder.parameters(), again.parameters()))


def test_a_variant_out_of_memory_is_recorded_and_the_rest_still_runs(monkeypatch, tmp_path, capsys):
    from tokenflow.errors import ResourceError

    real = run.run_variant

    def flaky(model, clip, config, variant, *args, **kwargs):
        if variant.name == "chunk1":
            raise ResourceError("out of memory on the device (simulated)")
        return real(model, clip, config, variant, *args, **kwargs)

    monkeypatch.setattr(run, "run_variant", flaky)
    path = tmp_path / "b.json"
    assert run_command(lambda: cli.main(_args("--compare", "torch,chunk1,chunk2", "--warmup", "0", "--json", str(path)))) == 6
    doc = json.loads(path.read_text())
    assert [bool(v.get("error")) for v in doc["variants"]] == [False, True, False]
    assert doc["ratios"]["chunk1"]["total"] is None and doc["ratios"]["chunk2"]["total"] > 0
    assert "chunk1 did not finish" in capsys.readouterr().err


def test_end_to_end_comparison_runs_both_sides_on_the_same_settings(tmp_path):
    """bench/e2e_vs_original.py: our command, parsed by our CLI, asks for what the original's does."""
    import importlib.util
    from pathlib import Path

    from tokenflow.app.cli import build_parser
    from tokenflow.app.flags import config_from_args

    script = Path(__file__).resolve().parents[1] / "bench" / "e2e_vs_original.py"
    spec = importlib.util.spec_from_file_location("e2e_vs_original", script)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    args = argparse.Namespace(video="clip.mp4", model="tiny-folder", reference_python="py", reference_script="ref.py")
    ours = e2e.ours_command("onnx", args, tmp_path)
    theirs = e2e.original_command(args, tmp_path)
    config = config_from_args(build_parser().parse_args(ours[3:]))
    flag = lambda name: theirs[theirs.index(name) + 1]  # noqa: E731
    assert config.frames == int(flag("--n_frames")) == 40
    assert config.size == (int(flag("--W")), int(flag("--H"))) == (128, 128)
    assert config.inversion_steps == int(flag("--inversion_steps")) == 50
    assert config.steps == int(flag("--edit_steps")) == int(flag("--save_steps")) == 10
    assert config.keyframe_spacing == int(flag("--batch_size")) == 8
    assert config.seed == int(flag("--seed"))
    assert (config.pnp_attn_t, config.pnp_f_t) == (float(flag("--pnp_attn_t")), float(flag("--pnp_f_t")))
    assert config.prompt == flag("--prompt") and config.inversion_prompt == flag("--inversion_prompt")
    assert config.negative_prompt == flag("--negative_prompt")
    assert config.backend == "onnx" and config.device == "cpu" and flag("--threads") == "1"
