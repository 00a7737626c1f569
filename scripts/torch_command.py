"""Which torch build ``./run.sh setup`` installs: the pip arguments for ``torch==VERSION``.

Runs with any Python >= 3.8 and the standard library only (before the project's venv has
anything in it). The choice, first match wins:

1. ``TOKENFLOW_TORCH_INDEX`` set: that index (``--index-url``); set but empty: plain pip.
2. pip already configured with an index or wheel folder (``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``,
   ``PIP_FIND_LINKS``, or ``index-url`` / ``extra-index-url`` / ``find-links`` in
   ``pip config list``): plain pip, so that configuration (a local CPU wheel, a mirror) decides.
3. Linux without an NVIDIA driver (no ``nvidia-smi`` on PATH, no ``/proc/driver/nvidia``):
   PyTorch's CPU wheel index, ``https://download.pytorch.org/whl/cpu`` (the default index's Linux
   wheel pulls several GB of CUDA packages).
4. Otherwise (macOS, Windows, Linux with an NVIDIA driver): plain pip, the default index.

    python3 scripts/torch_command.py [--version 2.13.0] [--python PY]       # the command and why
    python3 scripts/torch_command.py --args                                  # pip's arguments, one a line
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import List, Mapping, Optional, Tuple

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PIP_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS")
PIP_KEYS = ("index-url", "extra-index-url", "find-links")
NVIDIA_PROC = "/proc/driver/nvidia"
DEFAULT_VERSION = "2.13.0"


def choose(version: str, env: Mapping[str, str], platform: str, pip_config: str,
           has_nvidia: bool) -> Tuple[List[str], str]:
    """(pip install arguments, the reason) for ``torch==version``. ``pip_config``: the output of
    ``pip config list``; ``platform``: ``sys.platform``."""
    spec = [f"torch=={version}"]
    if "TOKENFLOW_TORCH_INDEX" in env:
        index = env["TOKENFLOW_TORCH_INDEX"].strip()
        if index:
            return spec + ["--index-url", index], "TOKENFLOW_TORCH_INDEX is set"
        return spec, "TOKENFLOW_TORCH_INDEX is set but empty: pip as configured"
    configured = [name for name in PIP_ENV if env.get(name, "").strip()]
    configured += [line.split("=", 1)[0] for line in pip_config.splitlines()
                   if "=" in line and line.split("=", 1)[0].rsplit(".", 1)[-1].strip() in PIP_KEYS]
    if configured:
        return spec, f"pip is configured with an index or wheel folder ({', '.join(configured)})"
    if platform.startswith("linux") and not has_nvidia:
        return spec + ["--index-url", CPU_INDEX], "Linux without an NVIDIA driver: PyTorch's CPU wheel index"
    where = "an NVIDIA driver" if platform.startswith("linux") else platform
    return spec, f"{where}: the default index"


def pip_config_list(python: str) -> str:
    """``python -m pip config list`` ("" when there is no pip or it fails)."""
    try:
        done = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def nvidia_driver(env: Mapping[str, str]) -> bool:
    return shutil.which("nvidia-smi", path=env.get("PATH")) is not None or os.path.exists(NVIDIA_PROC)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=os.environ.get("TOKENFLOW_TORCH_VERSION") or DEFAULT_VERSION)
    parser.add_argument("--python", default=sys.executable, help="the Python whose pip configuration counts")
    parser.add_argument("--args", action="store_true", help="print only pip's arguments, one a line")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    pip_args, why = choose(args.version, env, sys.platform, pip_config_list(args.python), nvidia_driver(env))
    if args.args:
        print("\n".join(pip_args))
    else:
        print(" ".join(["pip", "install", *pip_args]))
        print(f"# {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
