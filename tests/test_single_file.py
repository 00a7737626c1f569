"""Single-file checkpoints (``--model file.safetensors``): the tiny model written in the original LDM
key layout (tests/ldm_layout.py) edits like its folder; which Stable Diffusion a file is comes from
its keys and shapes (tested on the real SD 1.5 / 2.1 / 2-depth shapes, no weights); bad files and a
missing tokenizer vocabulary are one line naming the file and the fix."""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tokenflow.app.cli import main
from tokenflow.errors import ModelError
from tokenflow.models import single_file
from tokenflow.models.load import comparable_identity, component_loader, load_model, major_minor

from .ldm_layout import write_ldm_checkpoint

FAST = ["--inversion-steps", "2", "--steps", "1", "--size", "64x64", "--device", "cpu", "--keyframe-spacing", "2",
        "--frames", "2", "--prompt", "glass", "--inversion-prompt", "shapes", "--no-cache", "-q"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_file(tiny_model_dir, tmp_path_factory):
    """The tiny model as one SD 2-layout (OpenCLIP) safetensors file."""
    return write_ldm_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokenflow: error: "), err
    return err[0]


# ----------------------------------------------------------------------------- end to end


def test_single_file_edits_like_its_folder(tiny_model_dir, tiny_file, sample_clip, tmp_path, capsys):
    folder_latents, file_latents = tmp_path / "folder.npy", tmp_path / "file.npy"
    assert main(["edit", str(sample_clip), "--model", str(tiny_model_dir), *FAST, "-o", str(tmp_path / "a.mp4"),
                 "--save-latents", str(folder_latents)]) == 0
    assert main(["edit", str(sample_clip), "--model", str(tiny_file), "--model-config", str(tiny_model_dir), *FAST,
                 "-o", str(tmp_path / "b.mp4"), "--save-latents", str(file_latents)]) == 0
    assert np.array_equal(np.load(folder_latents), np.load(file_latents))


def test_sd1_layout_and_pickle_checkpoint_load_the_same_weights(tiny_model_dir, tiny_sd, tmp_path):
    sd1 = write_ldm_checkpoint(tiny_model_dir, tmp_path / "sd1.safetensors", text="clip")
    from safetensors.torch import load_file

    ckpt = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": load_file(str(sd1)), "global_step": 1}, ckpt)
    for path in (sd1, ckpt):
        model = load_model(str(path), CPU, torch.float32, model_config=str(tiny_model_dir), allow_pickle=True)
        for part in ("unet", "vae", "text_encoder"):
            ours, theirs = getattr(model, part).state_dict(), getattr(tiny_sd, part).state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
        assert model.identity.startswith("file:sha256:") and "+config:folder:" in model.identity


def test_depth_checkpoint_loads_a_five_channel_unet(tmp_path):
    """A 2-depth file: detected from its 5 input channels; the UNet is built with in_channels=5."""
    from diffusers import UNet2DConditionModel

    from tokenflow.models.tiny import UNET_CONFIG

    from .ldm_layout import unet_to_ldm

    unet = UNet2DConditionModel(**dict(UNET_CONFIG, in_channels=5))
    folder = tmp_path / "configs"
    unet.save_config(folder / "unet")
    for part in ("vae", "text_encoder", "scheduler"):
        (folder / part).mkdir(parents=True)
    (folder / "vae" / "config.json").write_text("{}")
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 32}))
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    state = unet_to_ldm({k: v.detach() for k, v in unet.state_dict().items()})
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    shapes.update({"first_stage_model.encoder.conv_in.weight": (16, 3, 3, 3),
                   "cond_stage_model.model.token_embedding.weight": (514, 32)})
    path = tmp_path / "depth.safetensors"
    choice = single_file.choose_config(str(path), path, shapes, {}, str(folder))
    assert single_file.detect(shapes, "x").family == "sd2-depth"
    loaded = single_file.load_diffusers_part(UNet2DConditionModel, state, choice, "unet", torch.float32,
                                             component_loader("unet")[1], "x")
    assert loaded.config.in_channels == 5 and torch.equal(loaded.conv_in.weight, unet.conv_in.weight)
    with pytest.raises(ModelError, match="does not fit the 2-depth configs: UNet width 32 .config: 320"):
        single_file.choose_config(str(path), path, shapes, {}, "2-depth")


# ----------------------------------------------------------------------------- detection on real shapes


def sd_shapes(family: str) -> dict:
    """The keys detection reads, with the real shapes of SD 1.5, 2.1 and 2-depth checkpoints."""
    unet = "model.diffusion_model."
    context, in_channels = (768, 4) if family == "sd1" else (1024, 5 if family == "sd2-depth" else 4)
    shapes = {unet + "input_blocks.0.0.weight": (320, in_channels, 3, 3),
              unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, context),
              unet + "out.2.weight": (4, 320, 3, 3),
              "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}
    if family == "sd1":
        shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = (49408, 768)
        shapes[unet + "input_blocks.1.1.proj_in.weight"] = (320, 320, 1, 1)
    else:
        shapes["cond_stage_model.model.token_embedding.weight"] = (49408, 1024)
        shapes["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] = (3072, 1024)
        shapes[unet + "input_blocks.1.1.proj_in.weight"] = (320, 320)
    return shapes


EPSILON = {"modelspec.prediction_type": "epsilon"}


@pytest.mark.parametrize("family, metadata, label", [("sd1", {}, "1.5"), ("sd2", EPSILON, "2.1"),
                                                     ("sd2-depth", {}, "2-depth"),
                                                     ("sd2", {"modelspec.architecture": "stable-diffusion-v2-512"}, "2.1")])
def test_family_and_configs_from_real_shapes(family, metadata, label, tmp_path):
    path = tmp_path / "model.safetensors"
    detected = single_file.detect(sd_shapes(family), "m")
    assert (detected.family, detected.model_channels) == (family, 320)
    assert detected.context_dim == detected.text_width == (768 if family == "sd1" else 1024)
    choice = single_file.choose_config("m", path, sd_shapes(family), metadata, None)
    assert choice.label == label and choice.folder == single_file.CONFIGS / single_file.CONFIG_NAMES[label]


def test_shipped_configs_build_the_real_architectures():
    """Parameter counts of SD 1.5 / 2.x / 2-depth (UNet, VAE, text encoder), built on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    counts = {}
    for name in ("sd15", "sd2-base", "sd2-depth"):
        folder = single_file.CONFIGS / name
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        counts[name] = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == {"sd15": [859_520_964, 83_653_863, 123_060_480],
                      "sd2-base": [865_910_724, 83_653_863, 340_387_840],
                      "sd2-depth": [865_913_604, 83_653_863, 340_387_840]}


def test_sd2_base_or_768_v_is_said_or_asked(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(ModelError, match="nothing in it says whether .* pass --model-config 2.1"):
        single_file.choose_config("m", path, sd_shapes("sd2"), {}, None)
    assert single_file.choose_config("m", path, sd_shapes("sd2"), {}, "2.0").folder.name == "sd2-base"
    for metadata in ({"modelspec.prediction_type": "v"}, {"modelspec.architecture": "stable-diffusion-v2-768-v"}):
        with pytest.raises(ModelError, match="v-prediction checkpoint .from its metadata"):
            single_file.choose_config("m", path, sd_shapes("sd2"), metadata, "2.1")
    with pytest.raises(ModelError, match="v-prediction checkpoint .from its v_pred key"):
        single_file.choose_config("m", path, {**sd_shapes("sd2"), "v_pred": ()}, {}, None)
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    with pytest.raises(ModelError, match=r"v-prediction checkpoint .from model.yaml \(parameterization: v\)"):
        single_file.choose_config("m", path, sd_shapes("sd2"), {}, None)
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")   # no parameterization: eps
    assert single_file.choose_config("m", path, sd_shapes("sd2"), {}, None).label == "2.1"
    with pytest.raises(ModelError, match="v-prediction"):
        single_file.choose_config("m", path, sd_shapes("sd2"), {}, "2.1-768")


@pytest.mark.parametrize("change, needle", [
    (lambda s: {k: v for k, v in s.items() if not k.startswith("model.")} | {"lora_unet_x.lora_up.weight": (4, 1)},
     "not a Stable Diffusion checkpoint: no UNet weights .* pass it with --lora"),
    (lambda s: s | {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)}, "SDXL"),
    (lambda s: s | {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting checkpoint .9 UNet"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("first_stage_model.")}, "lacks first_stage_model"),
    (lambda s: s | {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
     "text encoder is 1024 wide but its UNet expects 768"),
])
def test_checkpoints_tokenflow_cannot_run_are_refused_by_name(change, needle):
    with pytest.raises(ModelError, match=needle) as error:
        single_file.detect(change(sd_shapes("sd2")), "bad.safetensors")
    assert "'bad.safetensors'" in str(error.value)


def test_model_config_for_another_family_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"Stable Diffusion 1.x checkpoint .*not 2.1: pass --model-config 1.5"):
        single_file.choose_config("m", tmp_path / "m.safetensors", sd_shapes("sd1"), {}, "2.1")
    with pytest.raises(ModelError, match="neither 1.5, 2.0, 2.1, 2-depth, xl nor a folder"):
        single_file.choose_config("m", tmp_path / "m.safetensors", sd_shapes("sd1"), {}, "3.0")


# ----------------------------------------------------------------------------- bad files, pickle, tokenizer


def test_model_config_without_a_single_file_is_refused(tiny_model_dir):
    with pytest.raises(ModelError, match="--model-config is for single-file checkpoints .* drop --model-config"):
        load_model(str(tiny_model_dir), CPU, torch.float32, model_config="2.1")


def test_pickle_checkpoint_is_refused_without_allow_pickle(tmp_path, sample_clip, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    assert main(["edit", str(sample_clip), "--model", str(ckpt), *FAST, "-o", str(tmp_path / "o.mp4")]) == 4
    line = one_line_error(capsys)
    assert "model.ckpt' is a pickle checkpoint" in line and "--allow-pickle" in line
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("content, needle", [
    ({"weight": torch.zeros(2)}, "is not a Stable Diffusion checkpoint: no UNet weights"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "is not a readable safetensors file"),
    (None, "does not exist"),
])
def test_bad_files_are_one_line_naming_the_file(content, needle, tmp_path, sample_clip, capsys):
    path = tmp_path / "model.safetensors"
    if isinstance(content, dict):
        save_file(content, str(path))
    elif content is not None:
        path.write_bytes(content)
    assert main(["edit", str(sample_clip), "--model", str(path), "--model-config", "1.5", *FAST,
                 "-o", str(tmp_path / "o.mp4")]) == 4
    line = one_line_error(capsys)
    assert f"'{path}'" in line and needle in line and not (tmp_path / "o.mp4").exists()


def test_a_vocabulary_too_large_for_the_text_encoder_is_one_line(tiny_model_dir, tiny_file, tmp_path, sample_clip,
                                                                  capsys):
    """--model-config DIR without a tokenizer/: the shipped CLIP vocabulary (49,408 tokens) does not
    fit the tiny text encoder; said in one line naming the folder to fix, before the weights load."""
    configs = tmp_path / "configs"
    shutil.copytree(tiny_model_dir, configs, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer"))
    assert main(["edit", str(sample_clip), "--model", str(tiny_file), "--model-config", str(configs), *FAST,
                 "-o", str(tmp_path / "o.mp4")]) == 4
    line = one_line_error(capsys)
    assert "has 49408 tokens but the text encoder of" in line and str(configs / "tokenizer") in line
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("config,pad", [("1.5", "<|endoftext|>"), ("2.1", "!"), ("2-depth", "!")])
def test_the_shipped_tokenizer_gives_clips_ids_offline(config, pad, monkeypatch, tmp_path):
    """No download, no Hugging Face cache: the shipped vocabulary gives CLIP's known token ids, with
    each family's padding (SD 2: '!', id 0; SD 1: the end token); SDXL's two tokenizers likewise."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    tokenizer = single_file.load_tokenizer(single_file.named_config(config), "m")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert tokenizer.pad_token == pad and len(ids) == 77 and ids[4] == tokenizer.convert_tokens_to_ids(pad)
    if config == "1.5":
        xl = single_file.named_config("xl")
        first, second = (single_file.load_tokenizer(xl, "m", part) for part in ("tokenizer", "tokenizer_2"))
        assert (first.pad_token, second.pad_token) == ("<|endoftext|>", "!")
        assert first("a photo of a cat").input_ids == second("a photo of a cat").input_ids


# ----------------------------------------------------------------------------- identity, dtype keyword


def test_file_identity_follows_content_not_copies(tiny_file, tmp_path):
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(tiny_file, copy)
    os.utime(copy, ns=(1, 1))
    assert comparable_identity(str(copy)) == comparable_identity(str(tiny_file))
    assert single_file.file_fingerprint(copy) != single_file.file_fingerprint(tiny_file)   # mtime counts for caches
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF   # same size, other weights
    copy.write_bytes(bytes(data))
    assert comparable_identity(str(copy)) != comparable_identity(str(tiny_file))


def test_diffusers_dtype_keyword_matches_the_installed_version(tiny_model_dir):
    """diffusers 0.40 renamed torch_dtype to dtype: the keyword passed takes effect, without a warning."""
    loader, keyword = component_loader("unet")
    assert keyword == ("dtype" if major_minor("diffusers") >= (0, 40) else "torch_dtype")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unet = loader.from_pretrained(tiny_model_dir, subfolder="unet", **{keyword: torch.bfloat16})
    assert unet.dtype == torch.bfloat16


def test_outputs_never_land_on_the_model_file_or_in_the_model_config_folder(tmp_path):
    from tokenflow.app import paths
    from tokenflow.config import EditConfig

    model, configs = tmp_path / "m.safetensors", tmp_path / "configs"
    model.write_bytes(b"weights")
    configs.mkdir()
    for output, field in ((model, "model"), (configs / "frames", "model_config")):
        cfg = EditConfig(video=str(tmp_path / "v.mp4"), prompt="x", output=str(tmp_path / "o.mp4"), model=str(model),
                         model_config=str(configs), save_frames=str(output))
        found = paths.aliasing_problems(paths.job_output_paths(cfg), paths.job_inputs(cfg))
        assert found and (str(configs) if field == "model_config" else str(model)) in str(found), found


def test_job_file_model_config_is_a_name_or_a_folder_next_to_the_job(tmp_path):
    from tokenflow.app.jobfile.load import parse_job

    (tmp_path / "configs").mkdir()
    (tmp_path / "m.safetensors").write_bytes(b"x")
    job = tmp_path / "job.yaml"
    for given, expected in (("2.1", "2.1"), ("configs", str(tmp_path / "configs"))):
        parsed = parse_job({"video": "v.mp4", "prompt": "x", "output": "o.mp4", "model": "m.safetensors",
                            "model_config": given}, str(job))
        assert not parsed.problems and parsed.config.model_config == expected
        assert parsed.config.model == str(tmp_path / "m.safetensors")
