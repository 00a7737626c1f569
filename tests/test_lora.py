"""--lora and --embedding through `tokenflow edit` / `tokenflow invert` on the tiny model (CPU).

The LoRAs are made here with PEFT on the tiny model and saved as users get them: diffusers' LoRA
format (``save_lora_weights``: UNet and text encoder) and the kohya/A1111 layout
(``lora_unet_*.lora_down.weight`` with ``.alpha``). Embeddings are {token: vectors} safetensors.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenflow.app.cli import main
from tokenflow.errors import ModelError
from tokenflow.models import adapters
from tokenflow.models.load import encode_prompt, load_model

FAST = ["--frames", "4", "--size", "64x64", "--inversion-steps", "8", "--steps", "2", "--device", "cpu",
        "--inversion-prompt", "shapes"]


def make_lora(model_dir: Path, folder: Path, seed: int, text_encoder: bool = False) -> Path:
    """A random LoRA (rank 4) on the tiny model's attention, made with PEFT, in diffusers' format."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    sd = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    torch.manual_seed(seed)
    layers = {}
    for name, module, targets in (("unet", sd.unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]),
                                  ("text_encoder", sd.text_encoder, ["q_proj", "v_proj"])):
        if name == "text_encoder" and not text_encoder:
            continue
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets),
                                module)
        with torch.no_grad():
            for parameter_name, parameter in module.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(0, 0.1)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(module)
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, safe_serialization=True, **layers)
    return folder / "pytorch_lora_weights.safetensors"


def to_kohya(diffusers_file: Path, out: Path, alpha: float) -> Path:
    """The same LoRA in the kohya/A1111 layout, with a network alpha."""
    tensors = {}
    for key, value in load_file(str(diffusers_file)).items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        name = ("lora_unet_" if component == "unet" else "lora_te_text_model_") + module.replace(".", "_")
        tensors[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(out))
    return out


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    first = make_lora(tiny_model_dir, root / "first", seed=1, text_encoder=True)
    second = make_lora(tiny_model_dir, root / "second", seed=2)
    return {"first": first, "second": second, "kohya": to_kohya(first, root / "first_kohya.safetensors", alpha=8.0)}


def edit(tmp_path, clip, model_dir, name, *extra, prompt="a glass <wolf>", cache=None):
    """`tokenflow edit` -> (exit code, latents or None, the output path)."""
    out, lat = tmp_path / f"{name}.mp4", tmp_path / f"{name}.npy"
    code = main(["edit", str(clip), "--model", str(model_dir), "--prompt", prompt, *FAST, "--keyframe-spacing", "2",
                 "-o", str(out), "--save-latents", str(lat), "--cache-dir", str(cache or tmp_path / "cache"),
                 "--quiet", *map(str, extra)])
    return code, (np.load(lat) if lat.exists() else None), out


@pytest.fixture(scope="module")
def edits(tiny_model_dir, sample_clip, loras, tmp_path_factory):
    """Edits by name, run once for the module (one shared inversion cache: a model identity's
    inversion is made once)."""
    folder, done = tmp_path_factory.mktemp("edits"), {}
    flags = {"base": [], "zero": ["--lora", f"{loras['first']}:0"], "one": ["--lora", loras["first"]],
             "both": ["--lora", f"{loras['first']}:1.0", "--lora", f"{loras['second']}:0.7"]}

    def run(name):
        if name not in done:
            code, done[name], _ = edit(folder, sample_clip, tiny_model_dir, name, *flags[name], cache=folder / "cache")
            assert code == 0
        return done[name]
    return run


def test_scale_zero_is_the_base_model_and_scales_and_loras_add_up(edits):
    assert np.array_equal(edits("zero"), edits("base")), "a LoRA at scale 0 is exactly the base model"
    assert np.abs(edits("one") - edits("base")).max() > 1e-3
    assert np.abs(edits("both") - edits("one")).max() > 1e-3


def test_kohya_layout_and_alpha_fuse_the_same_weights_and_loras_add_up(tiny_model_dir, loras):
    """alpha 8 on rank 4 doubles the LoRA: the kohya file at 0.5 is the diffusers file at 1 (UNet
    and text encoder); two LoRAs add their scaled deltas; the adapter modules are gone after the fuse."""
    cpu = torch.device("cpu")

    def weights(*flags):
        sd = load_model(str(tiny_model_dir), cpu, torch.float32, loras=[str(f) for f in flags])
        return sd.identity, {f"{m}.{k}": v for m in ("unet", "text_encoder") for k, v in getattr(sd, m).state_dict().items()}

    (base_id, base), (first_id, first) = weights(), weights(loras["first"])
    (kohya_id, kohya), (_, second) = weights(f"{loras['kohya']}:0.5"), weights(f"{loras['second']}:0.7")
    _, both = weights(loras["first"], f"{loras['second']}:0.7")
    assert first.keys() == base.keys() == both.keys(), "only the base layers remain"
    assert any(not torch.equal(first[k], base[k]) for k in base if k.startswith("text_encoder."))
    assert all(torch.allclose(first[k], kohya[k], atol=1e-6) for k in base)
    assert all(torch.allclose(both[k] - base[k], (first[k] - base[k]) + (second[k] - base[k]), atol=1e-5) for k in base)
    assert len({base_id, first_id, kohya_id}) == 3 and first_id.startswith(base_id + "+lora:sha256:")


def test_compiled_backend_gives_eager_result_with_a_lora(edits, tiny_model_dir, sample_clip, loras, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("TOKENFLOW_COMPILER", "eager")   # dynamo captures the graphs (fused weights), runs them eagerly
    eager = edits("one")
    code, compiled, _ = edit(tmp_path, sample_clip, tiny_model_dir, "compiled", "--lora", loras["first"],
                             "--backend", "compile")
    assert code == 0
    rel = float(np.linalg.norm(compiled - eager) / np.linalg.norm(eager))
    assert rel < 1e-4


def test_exported_graph_keys_name_the_lora_and_its_scale(tiny_model_dir, loras):
    """ONNX / AOTInductor / TensorRT graphs are cached by a key holding the model identity, which
    names each fused LoRA's content and scale: another LoRA or scale never reuses a graph."""
    from tokenflow.engine.backends.onnx import graph_spec, spec_key
    from tokenflow.engine.processors import TokenFlowUNet
    from tokenflow.kernels import KernelChoice

    keys = {}
    for flags in ((), (loras["first"],), (f"{loras['first']}:0.5",), (loras["second"],)):
        sd = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32, loras=[str(f) for f in flags])
        tf = TokenFlowUNet(sd.unet)
        try:
            keys[flags] = spec_key(graph_spec(tf, "propagate", latent_size=(8, 8), n_branches=3, match_on="input",
                                              model_identity=sd.identity, kernels=KernelChoice("torch", "static")))
        finally:
            tf.remove()
    assert len(set(keys.values())) == 4, keys


def test_the_lora_and_its_scale_are_part_of_the_inversion_cache_key(tiny_model_dir, sample_clip, loras, tmp_path,
                                                                   capsys):
    def invert(*extra):
        code = main(["invert", str(sample_clip), "--model", str(tiny_model_dir), *FAST, "--cache-dir",
                     str(tmp_path / "cache"), "--log-json", *map(str, extra)])
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert code == 0
        return next(e for e in events if e["event"] == "done")["from_cache"]

    assert invert("--lora", f"{loras['first']}:0.5") is False
    assert invert("--lora", f"{loras['first']}:0.5") is True
    assert invert("--lora", f"{loras['first']}:1") is False, "another scale is another inversion"


def test_an_embedding_token_changes_the_edit_and_multi_vector_tokens_expand(tiny_model_dir, sample_clip, tmp_path):
    torch.manual_seed(3)
    single = tmp_path / "wolf.safetensors"
    save_file({"<wolf>": torch.randn(1, 32)}, str(single))
    _, plain, _ = edit(tmp_path, sample_clip, tiny_model_dir, "plain", "--embedding", single, prompt="a glass wolf")
    code, token, _ = edit(tmp_path, sample_clip, tiny_model_dir, "token", "--embedding", single)
    assert code == 0 and np.abs(token - plain).max() > 1e-3
    multi = tmp_path / "style.safetensors"
    save_file({"emb_params": torch.randn(3, 32)}, str(multi))
    sd = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32, embeddings=[f"{multi}:<sty>"])
    assert sd.embedding_tokens == {"<sty>": ("<sty>", "<sty>_1", "<sty>_2")}
    ids = sd.tokenizer("in <sty> <sty>_1 <sty>_2 style", padding="max_length", return_tensors="pt").input_ids
    assert torch.equal(encode_prompt(sd, "in <sty> style"), sd.text_encoder(ids)[0])
    vectors = sd.text_encoder.get_input_embeddings().weight[sd.tokenizer.convert_tokens_to_ids(["<sty>_2"])]
    assert torch.equal(vectors[0], load_file(str(multi))["emb_params"][2])


def test_flag_values_keep_windows_paths_and_hub_ids_whole():
    assert adapters.parse_lora("C:\\loras\\x.safetensors") == adapters.LoraSpec("C:\\loras\\x.safetensors", 1.0)
    assert adapters.parse_lora("C:\\loras\\x.safetensors:0.5") == adapters.LoraSpec("C:\\loras\\x.safetensors", 0.5)
    assert adapters.parse_lora("owner/name:-.5") == adapters.LoraSpec("owner/name", -0.5)
    assert adapters.parse_lora("owner/name") == adapters.LoraSpec("owner/name", 1.0)
    assert adapters.parse_embedding("C:\\emb.pt") == adapters.EmbeddingSpec("C:\\emb.pt", None)
    assert adapters.parse_embedding("e.safetensors:<cat>") == adapters.EmbeddingSpec("e.safetensors", "<cat>")
    with pytest.raises(ModelError, match="finite"):
        adapters.parse_lora("x.safetensors:1e999")


def other_base_lora(loras, tmp_path) -> Path:
    """The first LoRA with its cross-attention keys widened to SD 1.x's 768 (a LoRA for another base)."""
    tensors = load_file(str(loras["first"]))
    for key in [k for k in tensors if "attn2.to_k.lora_A" in k]:
        tensors[key] = torch.randn(4, 768)
    save_file(tensors, str(tmp_path / "sd15.safetensors"))
    return tmp_path / "sd15.safetensors"


@pytest.mark.parametrize("case, flag, message", [
    ("wrong width", "--embedding", "has vectors of width 768 (SD 1.x), but model"),
    ("taken token", "--embedding", "is already in the tokenizer's vocabulary"),
    ("missing", "--lora", "does not exist"),
    ("another base", "--lora", "is for another base model"),
    ("no matching layer", "--lora", "matches no layer of the unet"),
    ("pickle", "--lora", "--allow-pickle"),
    ("not a lora", "--lora", "is not a LoRA"),
    ("offline hub id", "--lora", "hf download someone/a-lora --local-dir DIR"),
])
def test_bad_adapters_are_refused_in_one_line_before_any_output(case, flag, message, tiny_model_dir, sample_clip,
                                                                loras, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    value = {"missing": tmp_path / "nope.safetensors", "offline hub id": "someone/a-lora"}.get(case)
    if case == "wrong width":
        save_file({"<x>": torch.randn(1, 768)}, str(tmp_path / "sd15.safetensors"))
        value = tmp_path / "sd15.safetensors"
    elif case == "taken token":
        save_file({"<x>": torch.randn(1, 32)}, str(tmp_path / "e.safetensors"))
        value = f"{tmp_path / 'e.safetensors'}:a"
    elif case == "another base":
        value = other_base_lora(loras, tmp_path)
    elif case == "no matching layer":
        tensors = {k.replace("up_blocks.1", "up_blocks.9"): v for k, v in load_file(str(loras["second"])).items()}
        save_file(tensors, str(tmp_path / "xl.safetensors"))
        value = tmp_path / "xl.safetensors"
    elif case == "pickle":
        torch.save(load_file(str(loras["second"])), tmp_path / "lora.bin")
        value = tmp_path / "lora.bin"
    elif case == "not a lora":
        value = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    capsys.readouterr()
    code, latents, out = edit(tmp_path, sample_clip, tiny_model_dir, "bad", flag, value)
    err = capsys.readouterr().err.strip()
    assert code == 4 and latents is None and not out.exists(), err
    assert len(err.splitlines()) == 1 and err.startswith("tokenflow: error:") and message in err, err
    assert str(value).split(":")[0] in err or case == "taken token" and str(tmp_path / "e.safetensors") in err


def test_pickle_lora_loads_with_allow_pickle(tiny_model_dir, loras, tmp_path):
    torch.save(load_file(str(loras["second"])), tmp_path / "lora.bin")
    cpu = torch.device("cpu")
    pickled = load_model(str(tiny_model_dir), cpu, torch.float32, loras=[str(tmp_path / "lora.bin")], allow_pickle=True)
    plain = load_model(str(tiny_model_dir), cpu, torch.float32, loras=[str(loras["second"])])
    assert all(torch.equal(a, b) for a, b in zip(pickled.unet.state_dict().values(), plain.unet.state_dict().values()))


def test_the_skip_rule_compares_adapter_contents_not_only_paths(loras, sample_clip, tmp_path):
    from tokenflow.app.skip import job_fields
    from tokenflow.config import EditConfig

    lora = tmp_path / "style.safetensors"
    lora.write_bytes(loras["second"].read_bytes())
    config = EditConfig(video=sample_clip, prompt="a glass wolf", lora=(f"{lora}:0.7",))
    before = job_fields(config)
    assert before["adapters"] == [f"lora:sha256:{adapters.sha256_of(loras['second'])}*0.7"]
    copy = tmp_path / "copy" / "style.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(lora.read_bytes())
    assert job_fields(config.replace(lora=(f"{copy}:0.7",)))["adapters"] == before["adapters"], "a copy is the same"
    lora.write_bytes(loras["first"].read_bytes())   # another LoRA under the same name: another job
    assert job_fields(config)["adapters"] != before["adapters"]
    assert "adapters" not in job_fields(config.replace(lora=())), "jobs without adapters record what they did"


def test_a_hub_lora_is_its_cached_snapshot_named_by_commit(tiny_model_dir, loras, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(loras["second"], snapshot / "pytorch_lora_weights.safetensors")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32, loras=["someone/style-lora:0.5"])
    assert calls == [("someone/style-lora", {"allow_patterns": ["*.safetensors", "*.json"], "local_files_only": True})]
    assert sd.identity.endswith(f"+lora:someone/style-lora@{commit}/pytorch_lora_weights.safetensors*0.5")


def test_yaml_lora_and_embedding_keys_reach_the_loader(tiny_model_dir, sample_clip, loras, tmp_path, capsys):
    config = tmp_path / "edit.yaml"
    config.write_text(f"lora:\n  - {loras['first']}:0.5\n  - {tmp_path / 'gone.safetensors'}:0.3\n"
                      f"embedding: {tmp_path / 'emb.safetensors'}\n")
    code = main(["edit", str(sample_clip), "--config", str(config), "--model", str(tiny_model_dir), "--prompt", "x",
                 *FAST, "-o", str(tmp_path / "out.mp4")])
    err = capsys.readouterr().err
    assert code == 4 and f"LoRA '{tmp_path / 'gone.safetensors'}' does not exist" in err, err
    assert not (tmp_path / "out.mp4").exists()


def test_a1111_embedding_names_its_token_and_needs_allow_pickle(tiny_model_dir, tmp_path):
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "toy"}, tmp_path / "a1111.pt")
    cpu = torch.device("cpu")
    with pytest.raises(ModelError, match="is a pickle file.*--allow-pickle"):
        load_model(str(tiny_model_dir), cpu, torch.float32, embeddings=[str(tmp_path / "a1111.pt")])
    sd = load_model(str(tiny_model_dir), cpu, torch.float32, embeddings=[str(tmp_path / "a1111.pt")], allow_pickle=True)
    assert sd.embedding_tokens == {"toy": ("toy", "toy_1")} and sd.identity.endswith("=toy")
