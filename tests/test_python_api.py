"""The Python API as a user meets it: ``Editor.invert`` then ``Editor.edit(inversion, prompt)``
with non-default steps (tiny model, CPU, float32)."""
import dataclasses

import pytest
import torch

from tokenflow.errors import ConfigError
from tokenflow.io.cache import InversionCache
from tokenflow.method import schedule
from tokenflow.method.editor import Editor

# the frames and kernels: small and exact; the step counts are each test's
CLIP = dict(frames=4, size=(64, 64), keyframe_spacing=2, attention_backend="torch", nearest_backend="torch")
EDIT = dict(keyframe_spacing=2, attention_backend="torch", nearest_backend="torch")   # the frames are the inversion's


@pytest.fixture(scope="module")
def editor(tiny_sd, tmp_path_factory):
    ed = Editor(tiny_sd, cache=InversionCache(tmp_path_factory.mktemp("inversions")))
    yield ed
    ed.tokenflow.remove()


@pytest.fixture(scope="module")
def inversion(editor, sample_clip):
    """Inverted in 10 DDIM steps for a 5-step edit (neither is a default)."""
    return editor.invert(sample_clip, inversion_prompt="shapes", inversion_steps=10, steps=5, **CLIP)


def test_an_inversion_carries_the_edit_it_was_made_for(editor, inversion, sample_clip):
    assert (inversion.inversion_prompt, inversion.inversion_steps, inversion.steps, inversion.method) == \
        ("shapes", 10, 5, "pnp")
    assert inversion.model == editor.model.identity
    result = editor.edit(inversion, "glass", **EDIT)   # no steps given: the 5 it was made for
    assert result.timesteps == schedule.timesteps_of(editor.model.scheduler_config, 5)
    assert result.frames.shape == (4, 3, 64, 64) and torch.isfinite(result.latents).all()
    # the cached inversion carries them too
    again = editor.invert(sample_clip, inversion_prompt="shapes", inversion_steps=10, steps=5, **CLIP)
    assert again.from_cache and (again.steps, again.inversion_steps) == (5, 10)


def test_fewer_steps_it_holds_are_served(editor, inversion):
    # 1000 // 1 = 1000: the 1-step schedule is [1], a timestep of every DDIM schedule
    result = editor.edit(inversion, "glass", steps=1, **EDIT)
    assert result.timesteps == [1]


def test_steps_it_cannot_serve_are_refused_naming_what_it_serves(editor, inversion):
    with pytest.raises(ConfigError) as caught:
        editor.edit(inversion, "glass", steps=2, **EDIT)
    message = str(caught.value)
    assert "made for steps=5" in message and "which steps=2 needs" in message
    assert "it serves steps 5, 1" in message and "invert again with steps=2" in message
    # a config= names its steps (the default 50) too
    from tokenflow.config import EditConfig

    with pytest.raises(ConfigError, match="which steps=50 needs"):
        editor.edit(inversion, config=EditConfig(prompt="glass", **CLIP))


def test_an_inversion_of_another_model_is_refused(editor, inversion):
    other = dataclasses.replace(inversion, model="another-model@0")
    with pytest.raises(ConfigError, match="made with model another-model@0"):
        editor.edit(other, "glass")


@pytest.mark.parametrize("keywords", [dict(frames=2), dict(size=(32, 32)), dict(stride=2, crop=True)])
def test_clip_keywords_with_an_inversion_are_refused_not_ignored(editor, inversion, keywords):
    """The inversion's clip is what gets edited: a keyword that would select or size another clip
    is an error before any work, never silently dropped."""
    with pytest.raises(ConfigError, match=r"given with an Inversion, whose clip is fixed \(4 frames at 64x64\)"):
        editor.edit(inversion, "glass", **EDIT, **keywords)
