"""tools/install.sh's decisions, without installing anything: its functions are sourced and run
against fake interpreters (shell scripts answering as a CUDA, CPU or missing torch would)."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALL = os.path.join(ROOT, "tools", "install.sh")


def fake_python(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def pythons(tmp_path):
    return {
        "cuda": fake_python(tmp_path, "cuda", 'echo "12.9"'),  # torch.version.cuda
        "cpu": fake_python(tmp_path, "cpu", 'echo ""'),  # a CPU torch prints None -> ""
        "missing": fake_python(tmp_path, "missing",
                               'echo "ModuleNotFoundError: torch" >&2; exit 1'),
    }


def call(function, *args, env=None):
    command = f'source "{INSTALL}"; {function} "$@"'
    return subprocess.run(["bash", "-c", command, "install.sh", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=30)


@pytest.mark.parametrize("python, kind", [("cuda", "gpu"), ("cpu", "cpu"), ("missing", "cpu")])
def test_cuda_torch_decides_the_install(pythons, python, kind):
    result = call("install_kind", pythons[python], env={"NTP_INSTALL": "auto"})
    assert result.returncode == 0 and result.stdout.strip() == kind


def test_ntp_install_forces_the_kind(pythons):
    assert call("install_kind", pythons["cuda"], env={"NTP_INSTALL": "cpu"}).stdout.strip() == "cpu"
    assert call("install_kind", pythons["cpu"], env={"NTP_INSTALL": "gpu"}).stdout.strip() == "gpu"
    bad = call("install_kind", pythons["cpu"], env={"NTP_INSTALL": "cuda"})
    assert bad.returncode != 0 and "NTP_INSTALL=cuda must be cpu, gpu or auto" in bad.stderr


def test_gpu_venv_must_see_the_container_packages(tmp_path):
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    assert call("venv_sees_system_packages", str(tmp_path)).returncode != 0
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = true\n")
    assert call("venv_sees_system_packages", str(tmp_path)).returncode == 0


def test_cpu_pins_live_in_the_constraints_file():
    with open(os.path.join(ROOT, "tools", "constraints-cpu.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line)
    assert pins["torch"] == "2.13.0" and pins["megatron-core"] == "0.19.2"
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "torch==" not in f.read()  # a range: a container's torch is kept
