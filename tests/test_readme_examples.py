"""Every ```python block of README.md runs, as written, with the tiny model on the CPU.

The blocks run in the order they appear, in one namespace (as a reader would run them in one
session), in a temporary working folder. Only the things in SUBSTITUTIONS and DEFAULT_SIZE change;
anything else a block does (its step counts, its keywords, its outputs) runs unchanged, and an
exception in a block fails the test with the block's README line.
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(?:python|py)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)

# (text in the README, what the test puts there, why). Each must occur in some block: a stale
# entry fails the test rather than letting a block reach for the real model or a GPU.
SUBSTITUTIONS = [
    ('"stabilityai/stable-diffusion-2-1-base"', "{tiny_model!r}",
     "the real model is a 5 GB download; the tiny random-weight model has its architecture"),
    ('device="cuda"', 'device="cpu"', "the tests run without a GPU"),
    ('dtype="float16"', 'dtype="float32"', "the CPU computes in float32"),
    ('"wolf.mp4"', "{clip!r}", "the reader's video: a synthetic 2-frame clip"),
]
# Cost only: frames the README reads at the default size (512x512 for square input) are read at
# this size, so 50 + 10 steps of the tiny model take seconds.
DEFAULT_SIZE = (64, 64)


def readme_blocks(text: str):
    """[(line number of the block's first code line, code)] of every ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_block_finder_finds_python_blocks_only():
    text = "intro\n```bash\nls\n```\n```python\nx = 1\n```\ntext\n```py\ny = 2\n```\n"
    assert readme_blocks(text) == [(6, "x = 1\n"), (10, "y = 2\n")]


def test_readme_python_blocks_run(tiny_model_dir, tmp_path, monkeypatch):
    from tokenflow.io import read
    from tokenflow.io.samples import make_sample_clip

    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python block"
    clip = make_sample_clip(str(tmp_path / "clip.mp4"), n_frames=2, size=DEFAULT_SIZE, fps=8)
    values = {"tiny_model": str(tiny_model_dir), "clip": clip}
    unused = [old for old, _, _ in SUBSTITUTIONS if not any(old in code for _, code in blocks)]
    assert not unused, f"SUBSTITUTIONS lists {unused}, which no README python block contains: update the table"

    monkeypatch.setattr(read, "default_size", lambda width, height, family="sd": DEFAULT_SIZE)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace = {"__name__": "readme"}
    for line, code in blocks:
        for old, new, _ in SUBSTITUTIONS:
            code = code.replace(old, new.format(**values))
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - any failure of the README's code fails the test
            pytest.fail(f"the README's python block at line {line} raised {type(exc).__name__}: {exc}\n"
                        f"--- the block as run ---\n{code}", pytrace=False)
