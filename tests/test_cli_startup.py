"""Parsing flags imports no torch (app/cli.py's promise): `tokenflow --version`, a bad flag and the
help of the light subcommands answer in a fraction of a second, not after torch's ~2 s import.

Each case runs a fresh interpreter, as a user's shell does; the heavy commands (edit, bench, ...)
import torch when they run, not when they parse.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["--version"], ["edit", "--bogus"], ["edit", "--help"], ["run", "--help"],
                                  ["farm", "--help"], ["cache", "--help"], ["metrics", "--help"]])
def test_parsing_flags_imports_neither_torch_nor_diffusers(tmp_path, args):
    code = ("import sys\nfrom tokenflow.app.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'diffusers', 'av', 'transformers') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert "heavy: []" in done.stdout, (done.stdout[-2000:], done.stderr[-2000:])
