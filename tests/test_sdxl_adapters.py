"""SDXL single files, LoRAs, embeddings and ControlNets on the tiny SDXL (``tiny-xl``, CPU).

The single file is the tiny-xl folder written in the original SGM key layout (tests/ldm_layout.py:
UNet, VAE, CLIP-L and the OpenCLIP layout of the second encoder); LoRAs are made with PEFT and saved
in diffusers' SDXL format and in kohya's (original UNet names, ``lora_te1_``/``lora_te2_``); the
ControlNet is ``ControlNetModel.from_unet`` of the tiny-xl UNet with random weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenflow.app.cli import main
from tokenflow.errors import ModelError
from tokenflow.models import single_file
from tokenflow.models.load import encode_prompt, load_model
from tokenflow.models.text import unet_keywords

from .ldm_layout import unet_to_ldm, write_sdxl_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny-model calls: see tests/conftest.py
CPU = torch.device("cpu")
SIZE = (64, 64)


def unet_call(model, seed=0):
    """One UNet call of ``model`` on fixed inputs: ``[2,4,8,8]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.cat([encode_prompt(model, "a fox", SIZE), encode_prompt(model, "", SIZE, negative=True)])
    return model.unet(x, torch.tensor(500), **unet_keywords(model.unet, text)).sample


def same_weights(a, b, parts=("unet", "vae", "text_encoder", "text_encoder_2")):
    for part in parts:
        ours, theirs = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part


# ----------------------------------------------------------------------------- single file


@pytest.fixture(scope="module")
def xl_file(tiny_xl_dir, tmp_path_factory):
    return write_sdxl_checkpoint(tiny_xl_dir, tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors")


def test_sdxl_single_file_loads_as_its_folder(xl_file, tiny_xl_dir, tiny_xl):
    """UNet, VAE and both text encoders converted from the SGM layout equal the folder's: same
    weights, same UNet output, same text rows; the identity is the file's and the configs'."""
    model = load_model(str(xl_file), CPU, torch.float32, model_config=str(tiny_xl_dir))
    assert model.family == "sdxl" and model.force_zeros_for_empty_prompt
    same_weights(model, tiny_xl)
    with torch.no_grad():
        assert torch.equal(unet_call(model), unet_call(tiny_xl))
    assert model.identity.startswith("file:sha256:") and "+config:folder:" in model.identity


def test_a_single_files_header_tells_its_family_before_the_load(xl_file, tmp_path):
    """The default size is chosen before the frames are read: from the safetensors header alone."""
    from safetensors.torch import save_file

    from tokenflow.models.load import family_of

    sd_file = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sd_file))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a header")
    assert family_of(str(xl_file)) == "sdxl"
    assert family_of(str(sd_file)) == family_of(str(broken)) == "sd"   # a broken file: the load says why


def xl_shapes(refiner=False):
    """Key -> shape of a real SDXL base single file, from the shipped configs on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = single_file.CONFIGS / "sdxl"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    shapes = {k: tuple(v.shape) for k, v in unet_to_ldm(unet.state_dict(), levels=3).items()}
    shapes["first_stage_model.encoder.conv_in.weight"] = (128, 3, 3, 3)
    if not refiner:
        shapes.update({f"conditioner.embedders.0.transformer.text_model.{k.removeprefix('text_model.')}": tuple(v.shape)
                       for k, v in clip_l.state_dict().items()})
    g = "conditioner.embedders.0.model." if refiner else single_file.XL_OPEN_CLIP
    shapes[g + "token_embedding.weight"] = (49408, 1280)
    return shapes


def test_shipped_xl_configs_build_sdxl_base():
    """Parameter counts of SDXL base 1.0 (UNet, VAE, CLIP-L, OpenCLIP bigG with projection), on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = single_file.CONFIGS / "sdxl"
    with torch.device("meta"):
        modules = (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                   AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                   CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
                   CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    counts = [sum(p.numel() for p in m.parameters()) for m in modules]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]


def test_real_sdxl_shapes_choose_the_shipped_xl_configs(tmp_path, xl_file, sample_clip, capsys):
    path = tmp_path / "x.safetensors"
    choice = single_file.choose_config("x", path, xl_shapes(), {}, None)
    assert choice.label == "xl" and single_file.detect(xl_shapes(), "x").text_width == 2048
    assert single_file.choose_config("x", path, xl_shapes(), {}, "xl").label == "xl"
    with pytest.raises(ModelError, match="SDXL checkpoint .*not 1.5: pass --model-config xl"):
        single_file.choose_config("x", path, xl_shapes(), {}, "1.5")
    with pytest.raises(ModelError, match="refiner"):
        single_file.detect(xl_shapes(refiner=True), "r")
    # the tiny file with the real SDXL configs: widths named, one line on the CLI
    assert main(["edit", str(sample_clip), "--model", str(xl_file), "--model-config", "xl", "--prompt", "x",
                 "-o", str(tmp_path / "o.mp4"), "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the xl configs" in err[0] and "context width 64 (config: 2048)" in err[0], err


# ----------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def xl_loras(tiny_xl_dir, tiny_xl, tmp_path_factory):
    """A random PEFT LoRA on the UNet (attention, a resnet conv), both text encoders; the PEFT-injected
    modules (the reference) and the LoRA saved in diffusers' SDXL format and kohya's."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("xl-loras")
    reference = load_model(str(tiny_xl_dir), CPU, torch.float32)
    torch.manual_seed(3)
    layers = {}
    for part, targets in (("unet", ["to_q", "to_v", "to_out.0", "conv1", "proj_in"]),
                          ("text_encoder", ["q_proj", "v_proj"]), ("text_encoder_2", ["k_proj", "fc1"])):
        module = getattr(reference, part)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets),
                                module)
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(module)
    StableDiffusionXLLoraLoaderMixin.save_lora_weights(root / "diffusers", safe_serialization=True, **layers)
    diffusers_file = root / "diffusers" / "pytorch_lora_weights.safetensors"
    # kohya: the UNet by its original (SGM) module names, alpha 8 on rank 4 (twice the diffusers LoRA)
    unet_keys = list(tiny_xl.unet.state_dict())
    ldm = dict(zip(unet_keys, unet_to_ldm({k: torch.zeros(1) for k in unet_keys}, levels=3)))
    kohya = {}
    for key, value in load_file(str(diffusers_file)).items():
        part, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        if part == "unet":
            name = "lora_unet_" + ldm[module + ".weight"].removeprefix("model.diffusion_model.").removesuffix(".weight")
        else:
            name = ("lora_te1_" if part == "text_encoder" else "lora_te2_") + "text_model." + module.removeprefix("text_model.")
        name = name.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)
    assert any(k.startswith("lora_unet_output_blocks_") and "_in_layers_2." in k for k in kohya)
    save_file(kohya, str(root / "kohya.safetensors"))
    return {"reference": reference, "diffusers": diffusers_file, "kohya": root / "kohya.safetensors"}


def test_sdxl_lora_fused_equals_the_peft_reference_in_both_layouts(tiny_xl_dir, tiny_xl, xl_loras):
    reference = xl_loras["reference"]
    with torch.no_grad():
        want = unet_call(reference)
        want_text = encode_prompt(reference, "a fox", SIZE)
    identities = {tiny_xl.identity}
    for spec in (str(xl_loras["diffusers"]), f"{xl_loras['kohya']}:0.5"):
        fused = load_model(str(tiny_xl_dir), CPU, torch.float32, loras=[spec])
        assert not any("lora" in k for k in fused.unet.state_dict()), "the adapter modules are gone"
        with torch.no_grad():
            assert torch.allclose(unet_call(fused), want, atol=1e-5), spec
            assert torch.allclose(encode_prompt(fused, "a fox", SIZE), want_text, atol=1e-5), spec
        for part in ("text_encoder", "text_encoder_2"):
            assert any(not torch.equal(a, b) for a, b in zip(getattr(fused, part).state_dict().values(),
                                                             getattr(tiny_xl, part).state_dict().values())), part
        identities.add(fused.identity)
    assert len(identities) == 3, "the identity (cache keys) names the LoRA and its scale"


def test_an_sdxl_lora_on_an_sd_model_is_refused(tiny_model_dir, xl_loras, tmp_path, sample_clip, capsys):
    code = main(["edit", str(sample_clip), "--model", str(tiny_model_dir), "--prompt", "x", "--lora",
                 str(xl_loras["kohya"]), "-o", str(tmp_path / "o.mp4"), "--device", "cpu", "--frames", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "LoRA for SDXL" in err[0] and not (tmp_path / "o.mp4").exists(), err


# ----------------------------------------------------------------------------- embeddings


def test_sdxl_embedding_goes_to_both_encoders_and_sd_files_are_refused(tiny_xl_dir, tiny_model_dir, tiny_xl,
                                                                      tmp_path):
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 32)
    xl_file = tmp_path / "toy-xl.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(xl_file))
    model = load_model(str(tiny_xl_dir), CPU, torch.float32, embeddings=[f"{xl_file}:<toy>"])
    for tokenizer, encoder, vectors in ((model.tokenizer, model.text_encoder, clip_l),
                                        (model.tokenizer_2, model.text_encoder_2, clip_g)):
        ids = tokenizer.convert_tokens_to_ids(["<toy>", "<toy>_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors)
    assert model.embedding_tokens == {"<toy>": ("<toy>", "<toy>_1")} and model.identity != tiny_xl.identity
    with torch.no_grad():
        assert not torch.equal(encode_prompt(model, "a <toy>", SIZE), encode_prompt(model, "a", SIZE))
    sd_file = tmp_path / "toy-sd.safetensors"
    save_file({"<toy>": torch.randn(1, 32)}, str(sd_file))
    with pytest.raises(ModelError, match="no SDXL embedding .* the model is SDXL"):
        load_model(str(tiny_xl_dir), CPU, torch.float32, embeddings=[str(sd_file)])
    with pytest.raises(ModelError, match="is an SDXL embedding .* the model is Stable Diffusion 1.x/2.x"):
        load_model(str(tiny_model_dir), CPU, torch.float32, embeddings=[str(xl_file)])


# ----------------------------------------------------------------------------- ControlNet


@pytest.fixture(scope="module")
def xl_controlnet(tiny_xl, tmp_path_factory):
    from diffusers import ControlNetModel

    from tokenflow.models.random_weights import build_random

    folder = tmp_path_factory.mktemp("xl-controlnet") / "net"
    net = build_random(lambda: ControlNetModel.from_unet(tiny_xl.unet, load_weights_from_unet=False), 5, "controlnet")
    assert net.config.addition_embed_type == "text_time"
    net.save_pretrained(folder, safe_serialization=True)
    return folder


def test_an_sdxl_controlnet_single_file_loads_as_its_folder(tiny_xl, tiny_sd, xl_controlnet, tmp_path):
    """The original layout (control_model.*, with label_emb) converted offline with the SDXL UNet's
    architecture; the same file on an SD model is refused naming both."""
    from diffusers import ControlNetModel

    from tokenflow.models.controlnet import load_controlnet

    from .test_controlnet import write_ldm_file

    folder_net = ControlNetModel.from_pretrained(str(xl_controlnet))
    path = tmp_path / "xl-net.safetensors"
    write_ldm_file(folder_net, path)
    assert any(".label_emb.0.0." in k for k in load_file(str(path)))
    net, _ = load_controlnet(str(path), tiny_xl.unet, CPU, torch.float32, model_name="tiny-xl")
    ours, theirs = net.state_dict(), folder_net.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(ModelError, match="is an SDXL ControlNet but model 'tiny' is Stable Diffusion 1.x/2.x"):
        load_controlnet(str(path), tiny_sd.unet, CPU, torch.float32, model_name="tiny")


def test_sdxl_controlnet_residuals_are_diffusers_with_explicit_added_conditioning(tiny_xl, xl_controlnet):
    from diffusers import ControlNetModel

    from tokenflow.engine.conditioning import ControlUnit, UNetConditions
    from tokenflow.models.controlnet import load_controlnet

    net, _ = load_controlnet(str(xl_controlnet), tiny_xl.unet, CPU, torch.float32, model_name="tiny-xl")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor(400)
    with torch.no_grad():
        rows = torch.cat([encode_prompt(tiny_xl, "a", SIZE)] * 2 + [encode_prompt(tiny_xl, "b", SIZE)] * 2)
        got = UNetConditions(controls=(ControlUnit(net, images, 0.7, "xl"),)).residuals(
            x, t, rows, slice(0, 2), n_branches=2, plain=True)
        hidden = rows[:, :77]
        flat = rows[:, 77:].reshape(4, -1)
        added = {"text_embeds": flat[:, :32], "time_ids": flat[:, 32:38]}
        assert torch.equal(added["time_ids"][0], torch.tensor([64.0, 64, 0, 0, 64, 64]))
        reference = ControlNetModel.from_pretrained(str(xl_controlnet))
        down, mid = reference(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added,
                              controlnet_cond=images.repeat(2, 1, 1, 1) / 255.0, conditioning_scale=0.7,
                              return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(got["down_block_additional_residuals"], down))
    assert torch.equal(got["mid_block_additional_residual"], mid)


def test_sdxl_controlnet_edits_on_the_cli_and_other_families_are_refused(tiny_xl, tiny_sd, tiny_xl_dir,
                                                                         xl_controlnet, sample_clip, tmp_path, capsys):
    from tokenflow.models.controlnet import load_controlnet

    out = tmp_path / "e.mp4"
    base = ["edit", str(sample_clip), "--model", str(tiny_xl_dir), "--prompt", "glass", "--inversion-prompt", "shapes",
            "--size", "64x64", "--frames", "2", "--keyframe-spacing", "2", "--steps", "1", "--inversion-steps", "1",
            "--device", "cpu", "--backend", "eager", "--no-cache", "-q"]
    assert main([*base, "--controlnet", f"{xl_controlnet}:0.8", "--control", "canny", "-o", str(out),
                 "--save-latents", str(tmp_path / "c.npy")]) == 0
    assert out.exists()
    with pytest.raises(ModelError, match=r"'\S+net' is an SDXL ControlNet but model 'tiny' is Stable Diffusion"):
        load_controlnet(str(xl_controlnet), tiny_sd.unet, CPU, torch.float32, model_name="tiny")
    from diffusers import ControlNetModel

    sd_net = tmp_path / "sd-net"
    ControlNetModel.from_unet(tiny_sd.unet).save_pretrained(sd_net, safe_serialization=True)
    with pytest.raises(ModelError, match=r"'\S+sd-net' is a Stable Diffusion 1.x/2.x ControlNet but model "
                                         r"'tiny-xl' is SDXL: use a ControlNet made for SDXL"):
        load_controlnet(str(sd_net), tiny_xl.unet, CPU, torch.float32, model_name="tiny-xl")
    capsys.readouterr()
    # SD 2 depth options have no SDXL model to feed
    maps = tmp_path / "depth.npy"
    np.save(maps, np.ones((2, 64, 64), np.float32))
    assert main([*base, "--depth-maps", str(maps), "-o", str(tmp_path / "d.mp4")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (f"tokenflow: error: --depth-maps {maps} given, but model {tiny_xl_dir} is SDXL: "
                                        "depth maps feed SD 2's depth model (--model 2-depth) and SDXL has none; drop "
                                        "--depth-maps, or add --controlnet MODEL --control depth"), err
    assert not (tmp_path / "d.mp4").exists() and not (tmp_path / "x.mp4").exists()
