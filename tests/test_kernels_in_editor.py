"""The kernel backends inside a whole edit (tiny model, CPU): each must reproduce the torch edit.

Triton runs through its interpreter here (TRITON_INTERPRET=1, set by conftest). Same inputs and
seeds, so any difference comes from the backends; nearest indices agreeing exactly makes the
edits agree to float32 rounding.
"""
import pytest
import torch

from tokenflow.cache import InversionCache
from tokenflow.config import EditConfig
from tokenflow.editor import Editor

SMALL = EditConfig(prompt="glass", inversion_prompt="shapes", frames=6, size=(64, 64), inversion_steps=4, steps=2,
                   keyframe_spacing=3, device="cpu", use_cache=False)


@pytest.fixture(scope="module")
def editor(tiny_sd):
    ed = Editor(tiny_sd, cache=InversionCache(enabled=False))
    yield ed
    ed.tokenflow.remove()


@pytest.fixture(scope="module")
def inversion(editor, sample_clip):
    return editor.invert(sample_clip, config=SMALL)


@pytest.fixture(scope="module")
def torch_edit(editor, inversion):
    return editor.edit(inversion, config=SMALL.replace(attention_backend="torch", nearest_backend="torch"),
                       record_correspondences=True)


def _agree(a, b):
    rel = ((a.latents - b.latents).norm() / b.latents.norm()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("attention,nearest", [("triton", "triton"), ("torch", "faiss")])
def test_backend_edit_matches_torch_edit(editor, inversion, torch_edit, attention, nearest):
    if attention == "triton":
        pytest.importorskip("triton")
    else:
        pytest.importorskip("faiss")
    result = editor.edit(inversion, config=SMALL.replace(attention_backend=attention, nearest_backend=nearest),
                         record_correspondences=True)
    same = sum(torch.equal(a[-1], b[-1]) for a, b in zip(result.correspondences, torch_edit.correspondences))
    assert same == len(torch_edit.correspondences) > 0
    _agree(result, torch_edit)
