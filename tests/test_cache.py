"""Inversion cache: keyed, atomic, verified."""
import dataclasses
import json
import os
import time

import pytest
import torch

from tokenflow.io.cache import InversionCache, InversionKey

KEY = InversionKey("abc", (64, 64), "model-x", "a wolf", 50, "float32", "cpu")


def _latents():
    g = torch.Generator().manual_seed(0)
    return {t: torch.randn(3, 4, 8, 8, generator=g) for t in (1, 101, 981)}


def test_round_trip(tmp_path):
    cache = InversionCache(tmp_path)
    cache.save(KEY, _latents())
    loaded = cache.load(KEY, {1, 101})
    assert loaded is not None and all(torch.equal(loaded[t], v) for t, v in _latents().items())
    assert not [p for p in (tmp_path / "inversions").iterdir() if p.name.startswith(".")]  # no temp left


def test_a_hit_marks_the_entry_used_and_a_miss_does_not(tmp_path):
    """`tokenflow cache prune` removes least recently used entries first; file access times are
    not kept on every mount, so a hit sets the entry folder's mtime."""
    cache = InversionCache(tmp_path)
    entry = cache.save(KEY, _latents())
    old = time.time() - 30 * 86400
    os.utime(entry, (old, old))
    assert cache.load(KEY, {1, 5}) is None and entry.stat().st_mtime == pytest.approx(old)   # incomplete: a miss
    assert cache.load(KEY, {1}) is not None and entry.stat().st_mtime > time.time() - 600


@pytest.mark.parametrize("field,value", [("frames_sha256", "abd"), ("size", (64, 72)), ("model", "model-y"),
                                         ("prompt", "a dog"), ("steps", 500), ("dtype", "float16"),
                                         ("device", "cuda")])
def test_every_field_is_part_of_the_key(tmp_path, field, value):
    cache = InversionCache(tmp_path)
    cache.save(KEY, _latents())
    assert cache.load(dataclasses.replace(KEY, **{field: value}), {1}) is None


def test_missing_timesteps_are_a_miss(tmp_path):
    cache = InversionCache(tmp_path)
    cache.save(KEY, _latents())
    assert cache.load(KEY, {1, 201}) is None


def test_corrupt_entry_is_dropped_not_used(tmp_path):
    cache = InversionCache(tmp_path)
    entry = cache.save(KEY, _latents())
    data = entry / "latents.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="corrupt"):
        assert cache.load(KEY, {1}) is None
    cache.save(KEY, _latents())  # the recomputed entry replaces it
    assert cache.load(KEY, {1}) is not None


def test_tampered_meta_is_dropped(tmp_path):
    cache = InversionCache(tmp_path)
    entry = cache.save(KEY, _latents())
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["prompt"] = "something else"
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning):
        assert cache.load(KEY, {1}) is None


def test_disabled_cache_neither_reads_nor_writes(tmp_path):
    cache = InversionCache(tmp_path, enabled=False)
    assert cache.save(KEY, _latents()) is None and cache.load(KEY, {1}) is None
    assert not (tmp_path / "inversions").exists()
