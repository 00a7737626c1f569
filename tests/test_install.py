"""Which torch build ``./run.sh setup`` installs (scripts/torch_command.py). Nothing is installed:
pip configuration, PATH (a fake ``nvidia-smi``) and the venv's python (a logging fake) are faked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "torch_command.py"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"

sys.path.insert(0, str(ROOT / "scripts"))
import torch_command  # noqa: E402

pytestmark = pytest.mark.skipif(os.path.exists("/proc/driver/nvidia") or sys.platform != "linux",
                                reason="the Linux branches need a machine without an NVIDIA driver")


def clean_env(tmp_path, **extra) -> dict:
    """No pip configuration (PIP_CONFIG_FILE=/dev/null, no PIP_* variables), no nvidia-smi on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "TOKENFLOW_TORCH"))}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PATH": SYSTEM_PATH, **extra})
    return env


def command(env) -> list:
    done = subprocess.run([sys.executable, str(SCRIPT), "--args"], capture_output=True, text=True, env=env,
                          check=True, timeout=120)
    return done.stdout.split()


def fake_nvidia_smi(tmp_path) -> str:
    folder = tmp_path / "nvidia-bin"
    folder.mkdir()
    (folder / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (folder / "nvidia-smi").chmod(0o755)
    return f"{folder}:{SYSTEM_PATH}"


def test_linux_without_nvidia_driver_gets_the_cpu_wheel_index(tmp_path):
    assert command(clean_env(tmp_path)) == ["torch==2.13.0", "--index-url", CPU_INDEX]


def test_linux_with_nvidia_driver_gets_the_default_index(tmp_path):
    assert command(clean_env(tmp_path, PATH=fake_nvidia_smi(tmp_path))) == ["torch==2.13.0"]


@pytest.mark.parametrize("name, value", [("PIP_FIND_LINKS", "/opt/wheels"),
                                         ("PIP_INDEX_URL", "https://mirror.example/simple"),
                                         ("PIP_EXTRA_INDEX_URL", "file:///opt/pypi/simple")])
def test_pip_configured_by_environment_is_respected(tmp_path, name, value):
    assert command(clean_env(tmp_path, **{name: value})) == ["torch==2.13.0"]


@pytest.mark.parametrize("key", ["find-links", "index-url", "extra-index-url"])
def test_pip_configured_by_file_is_respected(tmp_path, key):
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\n{key} = /opt/wheels\n")
    assert command(clean_env(tmp_path, PIP_CONFIG_FILE=str(conf))) == ["torch==2.13.0"]


def test_a_pip_file_without_an_index_is_not_a_configured_index(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\ntimeout = 60\n")
    assert command(clean_env(tmp_path, PIP_CONFIG_FILE=str(conf))) == ["torch==2.13.0", "--index-url", CPU_INDEX]


def test_tokenflow_torch_index_wins_and_empty_means_plain_pip(tmp_path):
    env = clean_env(tmp_path, PIP_FIND_LINKS="/opt/wheels", TOKENFLOW_TORCH_INDEX="https://example/whl/cu128")
    assert command(env) == ["torch==2.13.0", "--index-url", "https://example/whl/cu128"]
    assert command(clean_env(tmp_path, TOKENFLOW_TORCH_INDEX="")) == ["torch==2.13.0"]
    assert command(clean_env(tmp_path, TOKENFLOW_TORCH_VERSION="2.9.1"))[0] == "torch==2.9.1"


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_macos_and_windows_get_the_default_index(platform):
    args, why = torch_command.choose("2.13.0", {}, platform, "", has_nvidia=False)
    assert args == ["torch==2.13.0"] and platform in why


def test_run_sh_torch_command_says_why(tmp_path):
    env = clean_env(tmp_path, TOKENFLOW_VENV=str(tmp_path / "no-venv"), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "run.sh"), "torch-command"], capture_output=True, text=True,
                          env=env, check=True, timeout=120)
    assert done.stdout.splitlines() == [f"pip install torch==2.13.0 --index-url {CPU_INDEX}",
                                        "# Linux without an NVIDIA driver: PyTorch's CPU wheel index"]


@pytest.mark.parametrize("nvidia", [False, True])
def test_run_sh_setup_installs_the_chosen_build(tmp_path, nvidia):
    """setup with a fake venv python that logs pip calls (and runs the chooser for real)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = scripts/torch_command.py ]; then exec "{sys.executable}" "$@"; fi\n'
                    f'echo "$*" >> "{log}"\n')
    fake.chmod(0o755)
    path = fake_nvidia_smi(tmp_path) if nvidia else SYSTEM_PATH
    subprocess.run(["bash", str(ROOT / "run.sh"), "setup"], env=clean_env(tmp_path, TOKENFLOW_VENV=str(venv), PATH=path),
                   check=True, timeout=120, capture_output=True)
    calls = log.read_text().splitlines()
    torch_line = "-m pip install -q torch==2.13.0" + ("" if nvidia else f" --index-url {CPU_INDEX}")
    assert calls == ["-m pip install -q --upgrade pip", torch_line, "-m pip install -q -e .[test]"]
    assert (venv / ".tokenflow-installed").exists()
