"""tokenflow: TokenFlow video editing (Geyer, Bar-Tal, Bagon, Dekel, ICLR 2024) as a clean, device-agnostic engine.

    from tokenflow import Editor
    editor = Editor.from_pretrained("stabilityai/stable-diffusion-2-1-base", device="cuda", dtype="float16")
    result = editor.edit("clip.mp4", "a shiny silver robotic wolf", inversion_prompt="a wolf")
    result.frames   # [N, 3, H, W] float32 in [0, 1]
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "Editor": ("tokenflow.method.editor", "Editor"),
    "EditResult": ("tokenflow.method.editor", "EditResult"),
    "Inversion": ("tokenflow.method.editor", "Inversion"),
    "EditConfig": ("tokenflow.config", "EditConfig"),
    "PRESETS": ("tokenflow.config", "PRESETS"),
    "TokenFlowError": ("tokenflow.errors", "TokenFlowError"),
    "read_video": ("tokenflow.io.read", "read_video"),
    "write_video": ("tokenflow.io.write", "write_video"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):  # imports torch/diffusers only when the API is used, so `--version` is instant
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'tokenflow' has no attribute {name!r}")
