"""The offloaded keyframe store's staging (engine.store): values, padding, one upload per chunk.

CPU only: the events are CUDA's (unverified on a GPU); here the copies are synchronous and the
same code path must still give exactly what direct indexing of the store gives.
"""
import pytest
import torch

from tokenflow.engine.store import KeyframeStore, staging_slots
from tokenflow.method.keyframes import groups, original_plan, paper_plan, plan_rows

SHAPES = {"a": (6, 4), "b": (3, 8)}


def _filled(keyframes=7, branches=3, staging=4, on_host=True):
    store = KeyframeStore(SHAPES, keyframes, branches, dtype=torch.float32, device=torch.device("cpu"),
                          on_host=on_host, staging_slots=staging)
    g = torch.Generator().manual_seed(0)
    for layer, (s, c) in SHAPES.items():   # written as the keyframe pass does: windows at offsets
        for a, b in ((0, 3), (3, 7)):
            store.write(layer, a, torch.randn(b - a, s, c, generator=g), torch.randn(branches, b - a, s, c, generator=g))
    return store


def _check(store, pairs):
    view, local = store.staged(pairs)
    assert view.features["a"].shape[0] == store.staging_slots, "the view is padded to the staging capacity"
    assert local.shape == pairs.shape and torch.equal(local < 0, pairs < 0), "-1 stays -1"
    real = local[local >= 0]
    assert int(real.max()) < len(torch.unique(pairs[pairs >= 0])), "padding slots are never named"
    for layer in SHAPES:
        for (i, j), slot in zip(torch.nonzero(pairs >= 0).tolist(), real.tolist()):
            assert torch.equal(view.features[layer][slot], store.features[layer][pairs[i, j]])
            assert torch.equal(view.outputs[layer][:, slot], store.outputs[layer][:, pairs[i, j]])
    return view


def test_staged_values_equal_direct_indexing_for_random_pairs_and_reuse_one_buffer():
    store = _filled()
    g = torch.Generator().manual_seed(1)
    flat = store.staging_buffer
    views = []
    for _ in range(6):   # repeated chunks with different slot sets (at most 4, the capacity), -1 included
        base = int(torch.randint(0, 4, (1,), generator=g))
        pairs = base + torch.randint(0, 4, (5, 2), generator=g)
        pairs[torch.rand(5, generator=g) < 0.3, 1] = -1
        views.append(_check(store, pairs))
    assert store.uploads == len(views), "one upload per chunk"
    for view in views:   # every chunk's view is the same tensors in the one device staging buffer
        assert view is views[0]
        for t in view.graph_tensors(list(SHAPES)):
            assert t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert store.staging_buffer is flat and store.staging_slots == 4


def test_staging_grows_only_past_the_bound_and_a_device_store_is_its_own_view():
    store = _filled(staging=2)
    pairs = torch.tensor([[0, 1], [2, -1], [4, 5]])
    _check(store, pairs)
    assert store.staging_slots == 5, "grown to the 5 slots this chunk reads"
    device = _filled(on_host=False)
    view, local = device.staged(pairs)
    assert view is device and local is pairs and device.staging_buffer is None


@pytest.mark.parametrize("n_frames,spacing,chunk", [(23, 4, 5), (40, 8, 16), (9, 1, 3), (17, 3, 1), (12, 12, 5)])
def test_staging_slots_bound_every_chunk_of_both_plans(n_frames, spacing, chunk):
    """The capacity the denoiser asks for covers every chunk's slots (original and paper plans)."""
    g = torch.Generator().manual_seed(n_frames)
    n_groups = len(groups(n_frames, spacing))
    bound = staging_slots(chunk, spacing, n_groups)
    for _ in range(5):
        keyframes = torch.tensor([a + int(torch.randint(b - a, (1,), generator=g)) for a, b in groups(n_frames, spacing)])
        for plans in ([original_plan(i, n_frames, spacing) for i in range(n_groups)],
                      [paper_plan(i, n_frames, spacing, keyframes) for i in range(n_groups)]):
            for a, b in groups(n_frames, chunk):
                pairs, _ = plan_rows(plans, a, b)
                assert len(torch.unique(pairs[pairs >= 0])) <= bound


def test_staging_gathers_into_the_pinned_buffer_in_place():
    """Issue 18, defect 4: the slots are gathered straight into the (pinned) host staging buffer with
    ``index_select(..., out=)`` (fancy indexing would make pageable temporaries, and the upload then
    synchronous), and the whole buffer goes up in one copy per chunk."""
    from torch.utils._python_dispatch import TorchDispatchMode

    store = _filled()
    host = store._host_flat
    pointer = host.untyped_storage().data_ptr()
    stored = {t.untyped_storage().data_ptr() for part in (store.features, store.outputs) for t in part.values()}

    class Ops(TorchDispatchMode):   # every op that reads the store, or reads the staging buffer
        def __init__(self):
            super().__init__()
            self.on_store, self.from_staging = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            name = func.overloadpacket.__name__ + ("(out)" if "out" in kwargs else "")
            if any(t.untyped_storage().data_ptr() in stored for t in tensors):
                self.on_store.append(name)
            if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == pointer for t in args[1:]):
                self.from_staging.append(name)
            return func(*args, **kwargs)

    for view in (store._pinned.features["a"], store._pinned.outputs["b"]):   # the pinned views live in it
        assert view.untyped_storage().data_ptr() == pointer
    for pairs in (torch.tensor([[0, 1], [2, -1]]), torch.tensor([[3, 4], [5, 6]])):
        with Ops() as ops:
            store.staged(pairs)
        assert ops.on_store == ["index_select(out)"] * (2 * len(SHAPES)), ops.on_store
        assert ops.from_staging == ["copy_"], ops.from_staging   # one upload of the whole staging buffer
        assert store._host_flat is host and host.untyped_storage().data_ptr() == pointer
