"""tools/install.sh's decisions, without installing anything: its functions are sourced and run
against fake interpreters (shell scripts answering as a CUDA, CPU or missing torch would)."""

import os
import subprocess
import sys

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


FAKE_INTERPRETER = r'''#!/bin/sh
# Answers as a python would for what install.sh asks; logs every call (and PIP_CONSTRAINT).
echo "[PIP_CONSTRAINT=${PIP_CONSTRAINT:-}] $0 $*" >> "$INSTALL_LOG"
case "$1" in
  -c) case "$2" in
        *torch.version.cuda*) echo "$FAKE_CUDA" ;;
        *torch.__version__*) echo "torch==$FAKE_TORCH" ;;
      esac ;;
  -) cat > /dev/null; echo "torch $FAKE_TORCH (CUDA $FAKE_CUDA)" ;;
  -m) if [ "$2" = venv ]; then
        for last in "$@"; do :; done
        mkdir -p "$last/bin"; cp "$0" "$last/bin/python"
        case "$*" in
          *--system-site-packages*) echo "include-system-site-packages = true" > "$last/pyvenv.cfg" ;;
          *) echo "include-system-site-packages = false" > "$last/pyvenv.cfg" ;;
        esac
      fi ;;
esac
'''


def run_install(tmp_path, cuda, pip_constraint=""):
    """tools/install.sh in a copy of the repository's install files, with a fake base python;
    returns the logged calls of the venv's python (pip) and the base python (venv)."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    for name in ("tools/install.sh", "tools/constraints-cpu.txt", "setup.py"):
        (repo / name).write_text(open(os.path.join(ROOT, name)).read())
    base = fake_python(tmp_path, "python3", FAKE_INTERPRETER.split("\n", 1)[1])
    log = tmp_path / "log"
    env = {"PYTHON": base, "INSTALL_LOG": str(log), "FAKE_CUDA": cuda,
           "FAKE_TORCH": "2.9.0a0+50eac811a6", "NTP_INSTALL": "auto",
           "PIP_CONSTRAINT": pip_constraint}
    result = subprocess.run(["bash", str(repo / "tools" / "install.sh")], capture_output=True,
                            text=True, env={**os.environ, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    return repo, log.read_text().splitlines()


def pip_installs(calls):
    return [call.split(" install ", 1)[1] for call in calls if " -m pip " in call]


def test_cpu_install_uses_the_exact_pins(tmp_path):
    repo, calls = run_install(tmp_path, cuda="")
    assert any(call.endswith(f"-m venv {repo}/.venv") for call in calls)  # no system packages
    constraints = f"-c {repo}/tools/constraints-cpu.txt"
    assert pip_installs(calls) == [
        f"{constraints} torch numpy<3",
        "--no-deps --ignore-requires-python megatron-core==0.19.2",
        f"--no-deps {constraints} triton",
        "packaging>=24.2 psutil einops",
        f"{constraints} -e {repo}[dev]",
    ]


def test_container_install_keeps_the_container_torch(tmp_path):
    repo, calls = run_install(tmp_path, cuda="12.9")
    assert any(call.endswith(f"-m venv --system-site-packages {repo}/.venv") for call in calls)
    keep = f"{repo}/.venv/.megatron_ntp_keep_torch.txt"
    assert open(keep).read().strip() == "torch==2.9.0a0+50eac811a6"
    installs = pip_installs(calls)
    assert installs == [
        "--no-deps --ignore-requires-python megatron-core==0.19.2",
        f"-c {keep} packaging>=24.2 psutil einops",
        f"-c {keep} -e {repo}[dev]",
    ]
    assert not any(" torch" in line.split(" -e ")[0].replace(keep, "") for line in installs)


NGC_CONSTRAINT = "packaging==23.2\ntorch==2.9.0a0+50eac811a6\n"  # as NGC 25.09's file pins


def _wheel(folder, name, version):
    """A minimal pure-Python wheel (metadata only) for pip to resolve against, offline."""
    import zipfile

    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                                           f"Version: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def test_container_install_runs_pip_without_the_images_constraint(tmp_path):
    """NGC images set PIP_CONSTRAINT to a file pinning their packages: the real pip cannot then
    resolve megatron-core's packaging>=24.2, and install.sh stopped there. Here its container
    path runs every pip call without it (and keeps the container's torch by its own file)."""
    constraint = tmp_path / "constraint.txt"
    constraint.write_text(NGC_CONSTRAINT)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "packaging", "24.2")
    real_pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                "--no-index", "--find-links", str(wheels), "--disable-pip-version-check",
                "packaging>=24.2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    blocked = subprocess.run(real_pip, capture_output=True, text=True, timeout=120,
                             env={**env, "PIP_CONSTRAINT": str(constraint)})
    assert blocked.returncode != 0 and "packaging" in blocked.stderr  # what NGC users hit
    command = 'source "$1"; drop_container_constraint; shift; "$@"'
    cleared = subprocess.run(["bash", "-c", command, "x", INSTALL, *real_pip],
                             capture_output=True, text=True, timeout=120,
                             env={**env, "PIP_CONSTRAINT": str(constraint)})
    assert cleared.returncode == 0, cleared.stderr
    assert "Would install packaging-24.2" in cleared.stdout
    assert "not using the container's PIP_CONSTRAINT" in cleared.stdout
    repo, calls = run_install(tmp_path / "container", cuda="12.9", pip_constraint=str(constraint))
    pip_calls = [call for call in calls if " -m pip " in call]
    assert pip_calls and all(call.startswith("[PIP_CONSTRAINT=] ") for call in pip_calls)


def test_container_install_refuses_a_venv_without_system_packages(tmp_path):
    run_install(tmp_path, cuda="")  # a CPU venv first
    repo = tmp_path / "repo"
    result = subprocess.run(["bash", str(repo / "tools" / "install.sh")], capture_output=True,
                            text=True, timeout=60, env={
                                **os.environ, "PYTHON": str(tmp_path / "python3"),
                                "INSTALL_LOG": str(tmp_path / "log"), "FAKE_CUDA": "12.9",
                                "FAKE_TORCH": "2.9.0", "NTP_INSTALL": "auto"})
    assert result.returncode == 2 and "without --system-site-packages" in result.stderr
