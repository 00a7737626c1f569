"""Plots of ``tokenflow bench`` documents: the per-variant figure, its atomic PNG, bench/plot_results.py.

Documents are the real CPU result in bench/results (four variants, memory measured) and variations
of it: memory dropped, a failed variant, a single variant.
"""
import copy
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tokenflow.benchmark import plots, report
from tokenflow.errors import OutputError

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "bench" / "results" / "backends_cpu_tiny_wolf40.json"
SCRIPT = REPO / "bench" / "plot_results.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_doc():
    return json.loads(REAL.read_text())


@pytest.fixture
def doc(real_doc):
    return copy.deepcopy(real_doc)


def without_memory(doc):
    for entry in doc["variants"]:
        for stage in entry["stages"].values():
            stage["peak_memory_bytes"] = None
        entry["memory_method"] = None
    return doc


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


# ----------------------------------------------------------------------------- one document


def test_panels_follow_what_the_document_records(doc):
    assert plots.panels(doc) == ["time", "samples", "frames", "memory"]
    assert plots.panels(without_memory(doc)) == ["time", "samples", "frames"]
    for entry in doc["variants"]:
        for stage in entry["stages"].values():
            stage["samples_per_s"] = stage["frames_per_s"] = None
    assert plots.panels(doc) == ["time"]


def test_the_figure_has_one_titled_axes_per_panel(doc):
    titles = plots.axes_titles(plots.figure(doc))
    assert titles[:3] == ["median seconds per stage", "UNet samples/s per stage", "end-to-end frames/s"]
    assert len(titles) == 4 and titles[3].startswith("peak memory") and "GiB" in titles[3]
    titles = plots.axes_titles(plots.figure(without_memory(doc)))
    assert len(titles) == 3 and not any("memory" in t for t in titles)


def test_bars_and_labels_carry_values_and_ratios_to_the_first_variant(doc):
    fig = plots.figure(doc)
    time_ax = fig.axes[0]
    stages = [t.get_text() for t in time_ax.get_yticklabels()]
    assert stages == ["encode", "inversion", "keyframe pass", "propagation", "edit (kf+prop)", "decode", "total"]
    assert len(time_ax.patches) == len(stages) * len(doc["variants"])
    texts = [t.get_text() for t in time_ax.texts]
    onnx_total = doc["variants"][3]["stages"]["total"]["seconds"]
    speedup = doc["ratios"]["onnx"]["total"]
    assert f" {onnx_total:.3g} ({speedup:.2f}\u00d7)" in texts
    memory_ax = fig.axes[3]
    assert [round(p.get_width(), 3) for p in memory_ax.patches] == [
        round(e["stages"]["total"]["peak_memory_bytes"] / 2 ** 30, 3) for e in doc["variants"]]


def test_memory_below_a_gib_is_in_mib(doc):
    for entry in doc["variants"]:
        for stage in entry["stages"].values():
            stage["peak_memory_bytes"] = 300 * 2 ** 20
    assert "MiB" in plots.axes_titles(plots.figure(doc))[3]


def test_a_failed_variant_and_a_single_variant_still_plot(doc, tmp_path):
    failed = {"name": "broken", "overrides": {}, "error": "out of memory", "notes": ["failed: out of memory"],
              "memory_method": None,
              "stages": {s: {"seconds": None, "repeats_s": [], "error": "out of memory"}
                         for s in doc["variants"][0]["stages"]}}
    doc["variants"].append(failed)
    fig = plots.figure(doc)
    assert " n/a" in [t.get_text() for t in fig.axes[0].texts]
    png_size(plots.write(doc, tmp_path / "failed.png"))
    doc["variants"] = doc["variants"][:1]
    fig = plots.figure(doc)
    assert len(fig.axes) == 4 and not any("\u00d7" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_write_plot_writes_a_plausible_png_atomically(doc, tmp_path):
    path = report.write_plot(doc, str(tmp_path / "sub" / "bench.png"))
    assert path == tmp_path / "sub" / "bench.png"
    width, height = png_size(path)
    assert 800 <= width <= 2000 and 800 <= height <= 3000 and path.stat().st_size > 20_000
    assert leftovers(path.parent) == []
    before = path.read_bytes()
    report.write_plot(without_memory(doc), str(path))              # replaces the old one
    assert path.read_bytes() != before and png_size(path) == (width, height) and leftovers(path.parent) == []


def test_an_unwritable_path_is_an_output_error_and_leaves_nothing(doc, tmp_path):
    folder = tmp_path / "is-a-folder.png"
    folder.mkdir()
    with pytest.raises(OutputError, match="cannot write the plot"):
        report.write_plot(doc, str(folder))
    assert leftovers(tmp_path) == [] and list(folder.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError):
        report.write_plot(doc, str(blocker / "plot.png"))


def test_a_failing_render_leaves_no_temp_file(doc, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OutputError, match="No space left"):
        report.write_plot(doc, str(tmp_path / "plot.png"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- several documents


def test_comparison_groups_by_setup_and_compares_within_a_schedule(doc):
    other = copy.deepcopy(doc)
    other["settings"]["inversion_steps"] = 50                      # same setup, another schedule
    gpu = copy.deepcopy(doc)
    gpu["device"]["name"] = "NVIDIA H200"                          # another setup
    rows = plots.comparison_rows([("a", doc), ("b", other), ("c", gpu)])
    headers = [i for i, r in enumerate(rows) if "header" in r]
    assert headers == [0, 9]                                       # 1 + 4 + 4 rows, then the GPU's
    assert rows[2]["baseline"] is rows[1] and rows[5]["baseline"] is rows[5] and rows[11]["baseline"] is rows[10]
    fig = plots.comparison_figure([("a", doc), ("b", other), ("c", gpu)])
    assert [ax.get_title() for ax in fig.axes] == ["total seconds", "end-to-end frames/s",
                                                   "UNet samples/s (whole edit)", "peak memory of the edit (GiB)"]
    assert len(fig.axes[0].texts) == 12                            # one labelled bar per variant
    fig = plots.comparison_figure([("a", without_memory(doc)), ("b", without_memory(other))])
    assert len(fig.axes) == 3


def test_document_problem_names_what_is_missing(doc):
    assert plots.document_problem(doc) is None
    assert "keyframe_attention" in plots.document_problem({"benchmark": "keyframe_attention"})
    assert "benchmark" in plots.document_problem({"what": "parity"})
    assert "list" in plots.document_problem([1, 2])
    del doc["variants"][0]["stages"]
    assert "variant 0" in plots.document_problem(doc)


# ----------------------------------------------------------------------------- bench/plot_results.py


def run_script(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_script_plots_bench_documents_and_skips_others(real_doc, tmp_path):
    inputs = tmp_path / "results"
    inputs.mkdir()
    (inputs / "backends.json").write_text(json.dumps(real_doc))
    edit = copy.deepcopy(real_doc)
    edit["settings"]["inversion_steps"] = 50
    (inputs / "edit.json").write_text(json.dumps(edit))
    (inputs / "parity.json").write_text(json.dumps({"what": "parity", "report": {}}))
    (inputs / "broken.json").write_text("{not json")
    out = tmp_path / "plots"
    done = run_script(*sorted(inputs.glob("*.json")), "--out", out)
    assert done.returncode == 0, done.stderr
    written = sorted(Path(line) for line in done.stdout.split())
    assert written == sorted(out / n for n in ("backends.png", "edit.png", "comparison.png"))
    for path in written:
        png_size(path)
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2
    assert any("parity.json" in s and "not a tokenflow bench document" in s for s in skipped)
    assert any("broken.json" in s and "not JSON" in s for s in skipped)
    assert leftovers(out) == []


def test_script_fails_without_a_bench_document_or_a_writable_folder(real_doc, tmp_path):
    other = tmp_path / "parity.json"
    other.write_text(json.dumps({"what": "parity"}))
    done = run_script(other, "--out", tmp_path / "plots")
    assert done.returncode == 1 and "none of the 1 input(s) is a tokenflow bench document" in done.stderr
    assert not (tmp_path / "plots").exists()
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(real_doc))
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    done = run_script(bench, "--out", blocker / "plots")
    assert done.returncode == 1 and "cannot write plots" in done.stderr and done.stdout == ""
