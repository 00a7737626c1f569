"""Say what ran: the summary, the ``done`` event and the bench JSON name the UNet backend and each
kernel op's backend with how far it is verified (``tokenflow.gpu_runs``); stage timings wait for
asynchronous devices (``Reporter.use_device``)."""
import json

import pytest
import torch

from tokenflow import gpu_runs
from tokenflow.app.cli import build_parser, main
from tokenflow.engine.backends import VERIFIED, describe_ran, what_ran
from tokenflow.io.progress import Reporter
from tokenflow.kernels import dispatch

FAST = ["--inversion-steps", "4", "--steps", "2", "--size", "64x64", "--device", "cpu", "--keyframe-spacing", "2",
        "--frames", "4", "--no-cache"]
OPS = ("keyframe_attention", "cosine_nearest", "gather")


# ----------------------------------------------------------------------------- stage synchronisation


def test_stages_synchronise_at_both_boundaries_on_asynchronous_devices():
    calls = []
    reporter = Reporter(quiet=True, synchronize=lambda: calls.append(len(calls)))
    with reporter.stage("encode"):
        assert len(calls) == 1, "the work queued before the stage is waited for before it starts"
    assert len(calls) == 2, "the stage's own queued work is waited for before its time is taken"
    with reporter.stage("edit"), reporter.stage("inner"):
        pass
    assert len(calls) == 6


def test_a_failed_stage_does_not_synchronise_again():
    calls = []
    reporter = Reporter(quiet=True, synchronize=lambda: calls.append(1))
    with pytest.raises(RuntimeError), reporter.stage("edit"):
        raise RuntimeError("device error")
    assert len(calls) == 1 and "edit" in reporter.timings


def test_cpu_runs_do_not_synchronise():
    reporter = Reporter(quiet=True, synchronize=lambda: pytest.fail("called"))
    assert reporter.use_device(torch.device("cpu")).synchronize is None
    with reporter.stage("edit"):
        pass


# ----------------------------------------------------------------------------- the status words


def test_status_words_come_from_the_recorded_gpu_runs(monkeypatch):
    path = "keyframe_attention:triton"
    assert gpu_runs.status(path, "cuda", "NVIDIA H200", self_checked=True) == \
        "never run on this GPU model before: self-checked at startup"
    assert gpu_runs.status(path, "cuda", "NVIDIA H200") == "never run on this GPU model before: unverified on GPU"
    assert gpu_runs.status(path, "cpu", tested="interpreter") == "interpreter"
    assert gpu_runs.status("keyframe_attention:torch", "cuda", "X", reference=True) == "reference"
    monkeypatch.setitem(gpu_runs.RECORDED, path, ("NVIDIA H200",))
    assert gpu_runs.status(path, "cuda", "NVIDIA H200") == "verified on NVIDIA H200 by a recorded GPU run"
    assert gpu_runs.status(path, "cuda", "NVIDIA A100") == \
        "never run on this GPU model before (recorded on: NVIDIA H200): unverified on GPU"


def test_nothing_is_recorded_as_verified_on_a_gpu_yet():
    """No GPU run has been recorded: until one is (bench/results/), every GPU path is unverified."""
    assert not any(gpu_runs.RECORDED.values())
    assert all(gpu_runs.gpu_note(path) == "unverified on GPU" for path in gpu_runs.RECORDED)


def test_help_says_unverified_on_gpu_from_the_one_table(monkeypatch):
    def help_of(flag):
        edit = next(a for a in build_parser()._actions if a.dest == "command").choices["edit"]
        return " ".join(next(a for a in edit._actions if flag in a.option_strings).help.split())

    backend, store = help_of("--backend"), help_of("--keyframe-store")
    assert "compile (torch.compile; CUDA graphs on GPU: unverified on GPU)" in backend
    assert "on CUDA: unverified on GPU" in backend.split("onnx (")[1].split(")")[0] + ")"
    assert "host (pinned memory, staged per chunk; unverified on GPU)" in store
    assert "unverified on GPU" in VERIFIED["compile"] and "unverified on GPU" in VERIFIED["onnx"]
    monkeypatch.setitem(gpu_runs.RECORDED, "backend:compile", ("NVIDIA H200",))
    monkeypatch.setitem(gpu_runs.RECORDED, "keyframe_store:host", ("NVIDIA H200",))
    assert "CUDA graphs on GPU: verified on GPU: NVIDIA H200" in help_of("--backend")
    assert "verified on GPU: NVIDIA H200" in help_of("--keyframe-store")


def test_a_graph_backend_reports_the_kernels_in_its_graphs():
    class Graphs:
        name = "compile"
        kernels = dispatch.KernelChoice("torch", "static")

    ran = what_ran(Graphs(), torch.device("cpu"), torch.float32, {"cosine_nearest": {"faiss": 3}})
    assert ran["unet"] == {"backend": "compile", "status": VERIFIED["compile"]}
    assert [e["backend"] for op in OPS for e in ran["kernels"][op]] == ["torch", "static", "static"]
    assert all(e["calls"] is None for op in OPS for e in ran["kernels"][op])
    assert describe_ran(ran)[2] == "cosine_nearest: static (CPU float32/fp16/bf16 against the torch reference (tests))"


def test_self_checks_are_not_counted_as_the_runs_work():
    from tokenflow.kernels.probe import sample_args

    dispatch.forget_used()
    args, _ = sample_args("gather", torch.device("cpu"), torch.float32)
    with dispatch.unrecorded():
        dispatch.resolve("gather", "torch", *args)
    assert dispatch.used() == {}
    dispatch.resolve("gather", None, *args)
    assert dispatch.used() == {"gather": {"torch": 1}}


# ----------------------------------------------------------------------------- at the CLI


def test_the_done_event_and_the_summary_name_what_ran(tmp_path, tiny_model_dir, sample_clip, capsys):
    out = tmp_path / "o.mp4"
    args = ["edit", str(sample_clip), "--model", str(tiny_model_dir), "--prompt", "p", *FAST, "-o", str(out)]
    assert main(args + ["--log-json"]) == 0
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]
    assert done["event"] == "done"
    ran = done["ran"]
    assert ran["unet"] == {"backend": "eager", "status": "reference"}
    assert set(ran["kernels"]) == set(OPS)
    for op in OPS:
        (entry,) = ran["kernels"][op]   # this tiny edit's searches are too small for faiss: torch throughout
        assert entry["backend"] == "torch" and entry["status"] == "reference" and entry["calls"] > 0, entry

    assert main(args + ["--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "  ran: UNet: eager (reference)" in err
    for op in OPS:
        assert f"{op}: torch (reference)" in err


def test_the_invert_done_event_names_the_unet_and_no_kernels(tmp_path, tiny_model_dir, sample_clip, capsys):
    args = ["invert", str(sample_clip), "--model", str(tiny_model_dir), "--inversion-steps", "4", "--steps", "2",
            "--size", "64x64", "--device", "cpu", "--frames", "4", "--cache-dir", str(tmp_path)]
    assert main(args + ["--log-json"]) == 0
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]
    assert done["ran"]["unet"]["backend"] == "eager" and done["ran"]["kernels"] == {op: [] for op in OPS}
    assert main(args + ["--log-json"]) == 0   # from the cache: nothing ran
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]
    assert done["from_cache"] and done["ran"] is None


def test_the_summary_text_of_several_backends_counts_calls():
    ran = what_ran(None, torch.device("cpu"), torch.float32,
                   {"cosine_nearest": {"faiss": 2, "torch": 6}, "gather": {"torch": 8}, "keyframe_attention": {}})
    lines = describe_ran(ran)
    assert lines[1] == "keyframe_attention: not run"
    assert lines[2].startswith("cosine_nearest: torch (reference) 6 calls; faiss (") and lines[2].endswith("2 calls")
    assert lines[3] == "gather: torch (reference)"


def test_a_passed_self_check_is_what_the_status_says():
    """On a GPU the status says "self-checked at startup" for what passed check_backends' self-check
    (here forced on the CPU, where it is otherwise skipped)."""
    pytest.importorskip("faiss")
    from tokenflow.kernels import check_backends
    from tokenflow.kernels.probe import self_checked

    cpu = torch.device("cpu")
    dispatch.forget_used()
    check_backends(cpu, torch.float32, nearest="faiss", self_check=True)
    assert self_checked(cpu, torch.float32, "cosine_nearest", "faiss")
    assert not self_checked(cpu, torch.float16, "cosine_nearest", "faiss")
    assert dispatch.used() == {}, "the self-check is not the run's work"
