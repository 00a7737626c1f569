"""``tokenflow cache ls|clear|prune`` as a user runs it, and the cache root's rule.

A tmp cache holds a fake entry of each kind (in each kind's real layout) and one real inversion
entry (written by ``InversionCache``); file times are set so the least recently used order is known.
"""
import json
import os
import time
from pathlib import Path

import pytest
import torch

from tokenflow.app.cli import main
from tokenflow.io import cache as inversion_cache
from tokenflow.io import caches
from tokenflow.io.cache import InversionCache, InversionKey
from tokenflow.io.outputs import TEMP_MARK

from .inprocess import run_tokenflow
from .test_leftovers import LIVE, kill, python

DAY = 86400.0
KEY = InversionKey("ab" * 32, (64, 64), "tiny", "a wolf", 10, "float32", "cpu")
# (kind, files relative to the root with their sizes, days since last use); oldest first
FAKE = [
    ("tensorrt", {"tensorrt/keyframes-0123456789abcdef.engine": 2000, "tensorrt/keyframes-0123456789abcdef.json": 20}, 9),
    ("onnx", {"onnx/plain-0123456789abcdef/unet.onnx": 1000, "onnx/plain-0123456789abcdef/manifest.json": 30}, 8),
    ("aot", {"aot/propagate-0123456789abcdef0123.pt2": 3000, "aot/propagate-0123456789abcdef0123.json": 40}, 7),
    ("torch-compile", {"torch-compile/fxgraph/ab/entry": 4000}, 6),
    ("models", {"models/tiny-sd21-seed0-r1/model_index.json": 500}, 5),
    ("tensorrt", {"tensorrt/timing-10.0.1-sm89.cache": 50}, 4),
    ("calibration", {"memory-calibration.json": 100}, 3),
]
NOT_OURS = ["onnx/notes.txt", "README-mine.txt", "torch-compile/.hidden"]   # never listed, never removed


def cli(capsys, *args):
    code = main(["cache", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def ls(capsys, root, *kinds):
    code, out, err = cli(capsys, "ls", *kinds, "--cache-dir", root, "--json")
    assert code == 0, err
    return json.loads(out)


def set_age(path: Path, days: float) -> None:
    then = time.time() - days * DAY
    for inner in [*path.rglob("*")] if path.is_dir() else []:
        os.utime(inner, (then, then), follow_symlinks=False)
    os.utime(path, (then, then), follow_symlinks=False)


def populate(root: Path, inversion_days: float = 1) -> Path:
    for _, files, days in FAKE:
        for rel, size in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x" * size)
        for rel in files:
            set_age(root / rel.split("/")[0] / rel.split("/")[1] if "/" in rel else root / rel, days)
    for rel in NOT_OURS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("mine")
    entry = InversionCache(root).save(KEY, {1: torch.ones(2, 4, 8, 8), 101: torch.zeros(2, 4, 8, 8)})
    set_age(entry, inversion_days)
    return entry


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def test_ls_shows_each_kind_with_its_path_entries_and_sizes(tmp_path, capsys):
    root = tmp_path / "cache"
    entry = populate(root)
    doc = ls(capsys, root)
    kinds = {k["kind"]: k for k in doc["kinds"]}
    assert list(kinds) == list(caches.KIND_NAMES) and doc["root"] == str(root) and doc["root_from"] == "--cache-dir"
    expected = {"inversions": (1, folder_bytes(entry)), "onnx": (1, 1030), "tensorrt": (2, 2070), "aot": (1, 3040),
                "torch-compile": (1, 4000), "calibration": (1, 100), "models": (1, 500)}
    assert {k: (v["entries"], v["bytes"]) for k, v in kinds.items()} == expected
    assert kinds["onnx"]["others"] == 1 and kinds["onnx"]["path"] == str(root / "onnx")
    assert kinds["calibration"]["path"] == str(root / "memory-calibration.json")
    assert doc["total_bytes"] == sum(b for _, b in expected.values())
    code, text, _ = cli(capsys, "ls", "--cache-dir", root)
    assert code == 0 and "cache root: " + str(root) in text
    assert "  aot                 1    3.04 kB  " + str(root / "aot") in text and "  total               8   " in text
    assert ls(capsys, root, "onnx", "aot")["total_bytes"] == 1030 + 3040


def test_prune_removes_least_recently_used_entries_until_under_the_size(tmp_path, capsys):
    root = tmp_path / "cache"
    entry = populate(root, inversion_days=30)            # written long ago ...
    assert InversionCache(root).load(KEY, {1, 101})      # ... but used now: a hit marks it
    total = ls(capsys, root)["total_bytes"]
    limit = total - 2020 - 1030 - 1                      # the two oldest entries (tensorrt, onnx) are not enough
    code, out, err = cli(capsys, "prune", "--max-size", f"{limit}B", "--cache-dir", root, "--dry-run")
    assert code == 0 and "would remove 3 entries" in out and (root / "tensorrt").exists(), err
    code, out, err = cli(capsys, "prune", "--max-size", f"{limit}B", "--cache-dir", root, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [(e["kind"], e["name"]) for e in doc["removed"]] == [
        ("tensorrt", "keyframes-0123456789abcdef"), ("onnx", "plain-0123456789abcdef"),
        ("aot", "propagate-0123456789abcdef0123")]
    assert doc["bytes_before"] == total and doc["bytes_after"] == total - 2020 - 1030 - 3040 <= limit
    after = ls(capsys, root)
    assert after["total_bytes"] == doc["bytes_after"]
    assert not (root / "onnx" / "plain-0123456789abcdef").exists() and (root / "tensorrt" / "timing-10.0.1-sm89.cache").exists()
    assert InversionCache(root).load(KEY, {1, 101}) is not None and entry.exists()
    for rel in NOT_OURS:
        assert (root / rel).read_text() == "mine"
    code, out, _ = cli(capsys, "prune", "--max-size", "1B", "--cache-dir", root)   # down to nothing of ours
    assert code == 0 and ls(capsys, root)["total_bytes"] == 0 and not entry.exists()


def test_clear_removes_the_kinds_named_or_all_and_nothing_else(tmp_path, capsys):
    root = tmp_path / "cache"
    entry = populate(root)
    code, out, _ = cli(capsys, "clear", "onnx", "aot", "--cache-dir", root)
    assert code == 0 and "removed 2 entries, 4.07 kB" in out
    kinds = {k["kind"]: k["entries"] for k in ls(capsys, root)["kinds"]}
    assert kinds["onnx"] == kinds["aot"] == 0 and kinds["inversions"] == 1 and kinds["tensorrt"] == 2
    code, out, _ = cli(capsys, "clear", "--cache-dir", root, "--dry-run")
    assert code == 0 and "would remove 6 entries" in out and entry.exists()
    code, out, _ = cli(capsys, "clear", "--cache-dir", root)
    assert code == 0 and ls(capsys, root)["total_bytes"] == 0 and not entry.exists()
    assert sorted(p.name for p in (root / "inversions").iterdir()) == []      # no temp left behind either
    for rel in NOT_OURS:
        assert (root / rel).read_text() == "mine"


def test_the_root_follows_xdg_cache_home_when_tokenflow_cache_is_unset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TOKENFLOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert inversion_cache.default_cache_root is caches.default_cache_root   # one rule
    assert InversionCache().root == tmp_path / "xdg" / "tokenflow"
    code, out, _ = cli(capsys, "ls", "--json")
    assert json.loads(out)["root"] == str(tmp_path / "xdg" / "tokenflow") and json.loads(out)["root_from"] == "$XDG_CACHE_HOME"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")                 # the XDG spec: ignored
    assert caches.default_cache_root() == tmp_path / "home" / ".cache" / "tokenflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert caches.cache_root_and_source() == (tmp_path / "home" / ".cache" / "tokenflow", "default")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TOKENFLOW_CACHE", str(tmp_path / "tf"))
    assert caches.default_cache_root() == tmp_path / "tf"
    code, out, _ = cli(capsys, "ls", "--json", "--cache-dir", tmp_path / "flag")
    assert json.loads(out)["root"] == str(tmp_path / "flag")


def test_links_are_never_followed_out_of_the_root(tmp_path, capsys):
    root, outside = tmp_path / "cache", tmp_path / "precious"
    populate(root)
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"p" * 10_000)
    (root / "inversions" / ("cd" * 16)).symlink_to(outside)                 # looks like an entry
    (root / "onnx" / "plain-0123456789abcdef" / "external.bin").symlink_to(outside / "data.bin")
    (root / "aot").rename(tmp_path / "aot-elsewhere")
    (root / "aot").symlink_to(tmp_path / "aot-elsewhere")                    # a whole kind folder
    (root / "torch-compile" / "ab").symlink_to(outside)
    kinds = {k["kind"]: k for k in ls(capsys, root)["kinds"]}
    assert kinds["inversions"]["entries"] == 1 and kinds["inversions"]["links_skipped"] == 1
    assert kinds["onnx"]["bytes"] == 1030                                  # the link inside counts nothing
    assert kinds["aot"]["not_followed"] == str(tmp_path / "aot-elsewhere") and kinds["aot"]["entries"] == 0
    code, text, _ = cli(capsys, "ls", "--cache-dir", root)
    assert "not followed" in text and "links skipped" in text
    code, _, err = cli(capsys, "clear", "--cache-dir", root)
    assert code == 0, err
    assert (outside / "data.bin").read_bytes() == b"p" * 10_000
    assert sorted(p.name for p in (tmp_path / "aot-elsewhere").iterdir()) == ["propagate-0123456789abcdef0123.json",
                                                                            "propagate-0123456789abcdef0123.pt2"]
    assert (root / "inversions" / ("cd" * 16)).is_symlink() and not (root / "onnx" / "plain-0123456789abcdef").exists()


def test_a_real_inversion_is_listed_and_pruned(tmp_path, tiny_model_dir, sample_clip, capsys):
    """`tokenflow invert` writes where `tokenflow cache` looks (the entry and calibration names)."""
    root = tmp_path / "cache"
    run = run_tokenflow("invert", sample_clip, "--model", tiny_model_dir, "--frames", "4", "--size", "64x64",
                        "--inversion-steps", "5", "--steps", "5", "--device", "cpu", "-q", env={"TOKENFLOW_CACHE": str(root)})
    assert run.returncode == 0, run.stderr
    kinds = {k["kind"]: k for k in ls(capsys, root)["kinds"]}
    assert kinds["inversions"]["entries"] == 1 and kinds["inversions"]["bytes"] > 4 * 4 * 8 * 8 * 4
    assert kinds["inversions"]["others"] == kinds["inversions"]["temps"] == 0
    code, out, _ = cli(capsys, "prune", "--max-size", "1B", "inversions", "--cache-dir", root)
    assert code == 0 and "removed 1 entry" in out and not list((root / "inversions").iterdir())


WRITER = LIVE.replace("with atomic_file(sys.argv[1], \"wb\") as f:", """
from pathlib import Path
from tokenflow.io.outputs import atomic_path
with atomic_path(Path(sys.argv[2]), make_parents=True) as new, atomic_file(sys.argv[1], "wb") as f:
    new.mkdir()
    (new / "latents.safetensors").write_bytes(b"half")""")


def test_a_live_writers_temps_and_the_entry_it_replaces_survive(tmp_path, capsys):
    """A writer mid-way: an optimised ORT model staged inside an ONNX entry, and a new inversion
    entry staged next to its folder. Neither is removed, nor the entries they belong to."""
    root = tmp_path / "cache"
    entry = populate(root, inversion_days=30)
    onnx_entry = root / "onnx" / "plain-0123456789abcdef"
    child = python(WRITER, onnx_entry / "unet.cpu-0123.ort", entry)
    try:
        temps = [p for p in (root / "inversions").iterdir() if TEMP_MARK in p.name]
        staged = [p for p in onnx_entry.iterdir() if TEMP_MARK in p.name]
        assert len(temps) == len(staged) == 1
        set_age(temps[0], 30)
        code, out, err = cli(capsys, "clear", "--cache-dir", root)
        assert code == 0, err
        assert f"left inversions/{entry.name}: a live process is writing its replacement" in out
        assert "left onnx/plain-0123456789abcdef: a live writer's temp" in out
        assert temps[0].is_dir() and staged[0].exists() and entry.is_dir() and onnx_entry.is_dir()
        code, out, _ = cli(capsys, "prune", "--max-size", "1B", "--cache-dir", root)
        assert code == 0 and "still over the limit" in out and entry.is_dir() and onnx_entry.is_dir()
    finally:
        kill(child)
    code, out, _ = cli(capsys, "clear", "--cache-dir", root)             # its writer is gone: all goes
    assert code == 0 and not entry.exists() and not temps[0].exists() and not onnx_entry.exists()


@pytest.mark.parametrize("args, message", [
    (["prune"], "the following arguments are required: --max-size"),
    (["prune", "--max-size", "lots"], "--max-size='lots' is not a size: use e.g. 12GB, 16GiB or 800MB"),
    (["clear", "graphs"], "unknown cache kind 'graphs': choose from inversions, onnx, tensorrt, aot"),
    ([], "tokenflow cache needs an action: ls, clear or prune"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    root = tmp_path / "cache"
    entry = populate(root)
    try:
        code = main(["cache", *args, "--cache-dir", str(root)] if args else ["cache"])
    except SystemExit as exc:   # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("tokenflow: error:") and err.count("\n") == 1
    assert entry.exists() and ls(capsys, root)["total_bytes"] > 0


def test_a_file_as_the_root_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, "ls", "--cache-dir", tmp_path / "file")
    assert code == 2 and "is not a folder" in err
