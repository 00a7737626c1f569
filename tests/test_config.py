"""Config defaults, validation and the original repository's YAML keys."""
import pytest

from tokenflow.config import EditConfig, default_size, from_mapping, load_yaml, parse_size
from tokenflow.errors import ConfigError

ORIGINAL_PNP_YAML = """# general
seed: 1
device: 'cuda'
output_path: 'tokenflow-results'
data_path: 'data/woman-running'
latents_path: 'latents'
n_inversion_steps: 500
n_frames: 40
sd_version: '2.1'
guidance_scale: 7.5
n_timesteps: 50
prompt: "a marble sculpture of a woman running, Venus de Milo"
negative_prompt: "ugly, blurry, low res, unrealistic, unaesthetic"
batch_size: 8
pnp_attn_t: 0.5
pnp_f_t: 0.8
"""


def test_defaults_are_the_originals():
    c = EditConfig()
    assert (c.model, c.inversion_steps, c.steps, c.keyframe_spacing, c.guidance_scale, c.pnp_attn_t, c.pnp_f_t,
            c.frames, c.seed) == ("stabilityai/stable-diffusion-2-1-base", 500, 50, 8, 7.5, 0.5, 0.8, 40, 1)
    assert c.negative_prompt == "ugly, blurry, low res, unrealistic, unaesthetic"
    assert default_size(1920, 1080) == (672, 384) and default_size(1080, 1920) == (384, 672)
    assert default_size(720, 720) == (512, 512)


def test_original_pnp_config_keys(tmp_path):
    p = tmp_path / "config_pnp.yaml"
    p.write_text(ORIGINAL_PNP_YAML)
    c = load_yaml(str(p))
    assert (c.video, c.inversion_steps, c.steps, c.keyframe_spacing, c.cache_dir, c.device, c.method) == \
        ("data/woman-running", 500, 50, 8, "latents", "cuda", "pnp")
    assert c.model == "stabilityai/stable-diffusion-2-1-base" and c.prompt.startswith("a marble")


def test_original_sdedit_config_selects_sdedit():
    c = from_mapping({"start": 0.9, "use_ddim_noise": True, "n_inversion_steps": 100, "sd_version": "1.5"})
    assert c.method == "sdedit" and c.sdedit_start == 0.9 and c.inversion_steps == 100


def test_preprocess_flags_H_W():
    assert from_mapping({"H": 384, "W": 672}).size == (672, 384)


@pytest.mark.parametrize("data,match", [({"bogus": 1}, "unknown key 'bogus'"), ({"sd_version": "depth"}, "sd_version")])
def test_bad_keys(data, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(data)


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("change,match", [
    ({"steps": -1}, "steps"), ({"inversion_steps": 0}, "inversion_steps"), ({"pnp_attn_t": 1.5}, "pnp_attn_t"),
    ({"pnp_f_t": -0.1}, "pnp_f_t"), ({"keyframe_spacing": 0}, "keyframe_spacing"), ({"sdedit_start": 0}, "sdedit_start"),
    ({"size": (100, 100)}, "multiple of 8"), ({"prompt": "  "}, "prompt is empty"), ({"method": "ddim"}, "method"),
    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"steps": 60, "inversion_steps": 50}, "exceeds"),
    ({"dtype": "float64"}, "dtype"), ({"frames": 0}, "frames"), ({"stride": 0}, "stride"),
])
def test_validation_names_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        EditConfig(prompt="x").replace(**change).validate()


def test_parse_size():
    assert parse_size("672x384") == (672, 384)
    with pytest.raises(ConfigError):
        parse_size("big")
