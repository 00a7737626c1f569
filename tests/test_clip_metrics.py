"""CLIP metrics against an independent computation with transformers' own processor / features.

A tiny random CLIPModel (32 px images, 16-d embeddings) is built and saved with safetensors;
smooth coloured frames give clearly different embeddings (pairwise cosine down to ~0.9), so
a preprocessing mistake (e.g. wrong normalisation: embedding cosine ~0.993) is caught by the
0.9999 threshold, while the processor's uint8 rounding (~1/255) stays far above it.
"""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenflow.errors import ModelError
from tokenflow.models.hf import quiet_hf_libraries
from tokenflow.models.random_weights import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, tokenizer_vocab, write_tokenizer
from tokenflow.quality.clip_metrics import CLIP_SKIPPED, clip_metrics, load_clip_scorer

from .inprocess import run_tokenflow

PROMPT = "a shiny silver robotic wolf"


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    vocab = tokenizer_vocab()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN],
                         pad_token_id=vocab[PAD_TOKEN]),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16, initializer_factor=5.0)
    torch.manual_seed(0)
    with quiet_hf_libraries():
        CLIPModel(config).save_pretrained(folder, safe_serialization=True)
        CLIPImageProcessor(size={"shortest_edge": 32},
                           crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def scorer(clip_dir):
    return load_clip_scorer(str(clip_dir), device="cpu")


@pytest.fixture(scope="session")
def reference(clip_dir):
    """transformers' own path: CLIPImageProcessor pixels, tokenizer ids, get_*_features."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    with quiet_hf_libraries():
        model = CLIPModel.from_pretrained(clip_dir).eval()
        processor = CLIPImageProcessor.from_pretrained(clip_dir)
        tokenizer = AutoTokenizer.from_pretrained(clip_dir)

    def features(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def pixels(frames_uint8):
        arrays = [frame.permute(1, 2, 0).numpy() for frame in frames_uint8]
        with quiet_hf_libraries():
            return processor(images=arrays, return_tensors="pt").pixel_values

    @torch.no_grad()
    def images(frames_uint8):
        output = model.get_image_features(pixel_values=pixels(frames_uint8))
        return F.normalize(features(output), dim=-1)

    @torch.no_grad()
    def text(prompt):
        ids = tokenizer([prompt], return_tensors="pt").input_ids
        return F.normalize(features(model.get_text_features(input_ids=ids)), dim=-1)[0]

    return SimpleNamespace(pixels=pixels, images=images, text=text, std=processor.image_std)


def smooth_frames(n, height=48, width=80, seed=1):
    """uint8 ``[n, 3, height, width]``: bicubic-upsampled 4x6 random colour fields."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 6, generator=generator)
    frames = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("height, width", [(48, 80), (97, 64), (32, 32), (240, 320), (20, 27)])
def test_pixels_match_clip_image_processor(scorer, reference, height, width):
    """PIL rounds to uint8 after each resize pass: at most ~1 level apart (1/255/std ~ 0.015).

    The bound is 1.5 levels; bicubic -> bilinear alone already differs by ~2.6+ levels here.
    """
    frames = smooth_frames(4, height, width, seed=7)
    ours = scorer.preprocess(frames.float() / 255)
    theirs = reference.pixels(frames)
    assert ours.shape == theirs.shape == (4, 3, 32, 32)
    level = 1 / 255 / min(reference.std)
    assert (ours - theirs).abs().max() < 1.5 * level
    assert (ours - theirs).abs().mean() < 0.5 * level


def test_embeddings_match_clip_image_processor(scorer, reference):
    frames = smooth_frames(6)
    ours = scorer.image_embeddings(frames.float() / 255)
    theirs = reference.images(frames)
    assert ours.shape == (6, 16) and ours.dtype == torch.float32
    assert torch.allclose(ours.norm(dim=-1), torch.ones(6), atol=1e-5)
    same = (ours * theirs).sum(-1)
    assert same.min() > 0.9999, same
    # the threshold discriminates: other frames are far below it
    assert (ours @ theirs.T).fill_diagonal_(-1).max() < 0.999


def test_metrics_match_independent_computation(scorer, reference):
    frames = smooth_frames(5, seed=2)
    result = clip_metrics(scorer, frames.float() / 255, PROMPT)
    images, text = reference.images(frames), reference.text(PROMPT)
    per_frame = images @ text
    per_pair = F.cosine_similarity(images[:-1], images[1:], dim=-1)
    assert result["model"] == scorer.name
    assert len(result["per_frame_text_alignment"]) == 5
    assert len(result["per_pair_consistency"]) == 4
    np.testing.assert_allclose(result["per_frame_text_alignment"], per_frame.numpy(), atol=2e-3)
    np.testing.assert_allclose(result["per_pair_consistency"], per_pair.numpy(), atol=2e-4)
    assert result["text_alignment"] == pytest.approx(per_frame.mean().item(), abs=2e-3)
    assert result["frame_consistency"] == pytest.approx(per_pair.mean().item(), abs=2e-4)
    json.dumps(result)


def test_text_embeddings_match_tokenizer_ids(scorer, reference):
    ours = scorer.text_embeddings([PROMPT, "a wolf"])
    assert ours.shape == (2, 16)
    assert torch.allclose(ours[0], reference.text(PROMPT), atol=1e-5)
    assert torch.allclose(ours[1], reference.text("a wolf"), atol=1e-5)  # padded in the batch


def test_identical_frames_are_perfectly_consistent(scorer):
    frames = smooth_frames(1, seed=3).float().div(255).repeat(4, 1, 1, 1)
    result = clip_metrics(scorer, frames, None)
    assert abs(result["frame_consistency"] - 1) < 1e-6
    assert result["text_alignment"] is None and result["per_frame_text_alignment"] == []


def test_single_frame_and_batching(scorer):
    frames = smooth_frames(5, seed=4).float() / 255
    one = clip_metrics(scorer, frames[:1], PROMPT)
    assert one["frame_consistency"] is None and one["per_pair_consistency"] == []
    assert isinstance(one["text_alignment"], float)
    assert torch.allclose(scorer.image_embeddings(frames, batch=2),
                          scorer.image_embeddings(frames), atol=1e-6)


def test_without_a_clip_model_the_metrics_say_how_to_enable_clip():
    """No --clip-model (even with a prompt): no scores, and the entry and the printed table say
    why and which flag adds them."""
    pytest.importorskip("cv2")
    from tokenflow.quality.cli import evaluate, format_metrics, load_scorer

    assert load_scorer(None) is None and load_scorer("") is None
    frames = smooth_frames(3, height=32, width=32).float() / 255
    metrics = evaluate(frames, frames.flip(0), prompt=PROMPT, scorer=load_scorer(None))
    assert metrics["clip"] == {"skipped": CLIP_SKIPPED}
    assert "skipped" in metrics["clip"]["skipped"] and "--clip-model" in metrics["clip"]["skipped"]
    assert format_metrics(metrics).splitlines()[-1] == CLIP_SKIPPED


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_clip_scorer(str(tmp_path / "no-such-clip"))


def test_pickle_weights_are_refused(clip_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    shutil.copytree(clip_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="safetensors") as error:
        load_clip_scorer(str(folder))
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_not_a_clip_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(ModelError, match="not a CLIP model"):
        load_clip_scorer(str(tmp_path))


def test_offline_hub_id():
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE") as error:
        load_clip_scorer("tokenflow-tests/no-such-clip-model")
    assert "tokenflow-tests/no-such-clip-model" in str(error.value)


def test_broken_preprocessor_config(clip_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(clip_dir, folder)
    (folder / "preprocessor_config.json").write_text('{"size": {"longest": 3}}')
    with pytest.raises(ModelError, match="preprocessor_config.json"):
        load_clip_scorer(str(folder))


def test_metrics_and_report_commands_use_the_clip_model(clip_dir, scorer, tmp_path):
    """`tokenflow metrics/report --clip-model`: the scores of the written frames, as the API computes them."""

    pytest.importorskip("cv2")
    from tokenflow.io.read import read_video
    from tokenflow.io.write import write_video

    frames = smooth_frames(6, height=64, width=96)
    write_video(frames, str(tmp_path / "src.mp4"), 8)
    write_video(frames.flip(0), str(tmp_path / "edit.mp4"), 8)
    run = run_tokenflow("metrics", tmp_path / "src.mp4", tmp_path / "edit.mp4", "--clip-model", clip_dir,
                        "--prompt", "a red fox", "--device", "cpu", "--json", tmp_path / "m.json")
    assert run.returncode == 0, run.stderr
    assert "CLIP (" in run.stdout and "skipped" not in run.stdout
    got = json.loads((tmp_path / "m.json").read_text())["clip"]
    written = read_video(str(tmp_path / "edit.mp4"), size=(96, 64)).frames
    want = clip_metrics(scorer, written, "a red fox")
    assert got["text_alignment"] == pytest.approx(want["text_alignment"], abs=1e-6)
    assert got["frame_consistency"] == pytest.approx(want["frame_consistency"], abs=1e-6)
    missing = run_tokenflow("report", tmp_path / "src.mp4", tmp_path / "edit.mp4", "-o", tmp_path / "rep",
                            "--clip-model", tmp_path / "no-such-clip")
    assert missing.returncode == 4 and "no-such-clip" in missing.stderr and not (tmp_path / "rep").exists()
