"""tools/gpu_check.sh without a GPU: its modes through --dry-run (what each would run and its
expected duration), its argument errors, the stop before any work where CUDA is missing (a fake
interpreter answering as a CPU torch), and that `--quick`'s marker expression selects the tests
marked for it (pytest's collection, nothing run)."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


def gpu_check(*args, python="/opt/fake/python"):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, "NTP_PYTHON": python}, timeout=120)


def would_run(result) -> dict:
    """{part: command line} of a --dry-run's output."""
    return dict(re.findall(r"^\[gpu_check\] would run \((\w+)\): (.*?) ?$", result.stdout,
                           re.MULTILINE))


def expected_minutes(result) -> float:
    return float(re.search(r"expected about ([\d.]+) minutes", result.stdout).group(1))


def test_full_mode_runs_every_gpu_test_then_the_benchmark():
    result = gpu_check("--dry-run")
    assert result.returncode == 0, result.stderr
    commands = would_run(result)
    assert list(commands) == ["tests", "bench"]
    assert commands["tests"] == ("/opt/fake/python -m pytest tests/gpu -m gpu -v -rs "
                                 "-p no:cacheprovider")
    assert commands["bench"] == ("/opt/fake/python benchmarks/gpu_throughput.py --warmup 2 "
                                 "--rounds 10")
    assert "full check" in result.stdout and expected_minutes(result) > 0


def test_quick_mode_states_a_duration_within_five_minutes():
    result = gpu_check("--quick", "--dry-run", "-k", "fp8")
    assert result.returncode == 0, result.stderr
    commands = would_run(result)
    assert commands["tests"].endswith(r"-m gpu\ and\ quick -v -rs -p no:cacheprovider -k fp8")
    assert commands["bench"].endswith("--warmup 2 --rounds 3")
    assert 0 < expected_minutes(result) < 5
    assert expected_minutes(result) < expected_minutes(gpu_check("--dry-run"))


@pytest.mark.parametrize("only, part", [("--tests-only", "tests"), ("--bench-only", "bench")])
def test_one_part_only(only, part):
    result = gpu_check(only, "--dry-run")
    assert result.returncode == 0 and list(would_run(result)) == [part]


@pytest.mark.parametrize("args, message", [
    (("--tests-only", "--bench-only"), "exclude each other"),
    (("--bench-only", "-k", "fp8"), "pytest arguments (-k fp8) given with --bench-only"),
])
def test_argument_errors(args, message):
    result = gpu_check(*args, "--dry-run")
    assert result.returncode == 2 and message in result.stderr and not would_run(result)


def test_help_describes_the_modes():
    result = gpu_check("--help")
    assert result.returncode == 0
    for option in ("--quick", "--dry-run", "--tests-only", "--bench-only", "NTP_PYTHON"):
        assert option in result.stdout


def test_stops_before_any_work_without_cuda(tmp_path):
    python = tmp_path / "python"  # answers the CUDA question as a CPU torch does
    python.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\nexit 1\n")
    python.chmod(0o755)
    result = gpu_check("--quick", python=str(python))
    assert result.returncode == 2
    assert "no CUDA GPU visible" in result.stderr and "nothing was run" in result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 and "torch.cuda.is_available()" in calls[0]  # no pytest, no bench


def test_missing_interpreter_is_named(tmp_path):
    result = gpu_check(python=str(tmp_path / "nowhere" / "python"))
    assert result.returncode == 2 and "run bash tools/install.sh first" in result.stderr


def test_quick_marker_selects_the_quick_tests():
    collected = subprocess.run(
        [VENV_PYTHON, "-m", "pytest", "tests/gpu", "-m", "gpu and quick", "--collect-only",
         "-q", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    tests = sorted(line.split("::", 1)[1] for line in collected.stdout.splitlines()
                   if "::" in line)
    assert tests == ["test_fp8_trains[e4m3]", "test_fused_head_equals_unfused",
                     "test_te_and_local_layers_agree_from_the_same_weights",
                     "test_tensor_parallel_invariant_on_bf16_ties",
                     "test_unfused_and_fused_loss_equal_the_reference"]


def fake_gpu_python(folder, tests_status, bench_status):
    """An interpreter that reports a CUDA GPU, logs each call and ends pytest and the benchmark
    with the given statuses."""
    python = folder / "python"
    python.write_text(f"""#!/bin/sh
echo "$*" >> "{folder}/calls"
case "$1" in
  -m) exit {tests_status} ;;
  benchmarks/gpu_throughput.py) exit {bench_status} ;;
  -) cat > /dev/null; echo "torch fake" ;;
esac
exit 0
""")
    python.chmod(0o755)
    return str(python)


@pytest.mark.parametrize("tests_status, bench_status, status", [(0, 0, 0), (1, 0, 1), (0, 3, 3)])
def test_both_parts_run_and_the_first_failure_decides(tmp_path, tests_status, bench_status,
                                                      status):
    result = gpu_check("--quick", python=fake_gpu_python(tmp_path, tests_status, bench_status))
    assert result.returncode == status, result.stdout + result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[0] for call in calls[2:]] == ["-m", "benchmarks/gpu_throughput.py"]
    summary = result.stdout.strip().splitlines()[-1]
    for part, code in (("tests", tests_status), ("bench", bench_status)):
        assert (f"{part} passed in" if code == 0 else
                f"{part} failed (exit status {code}) in") in summary
    assert "quick check" in summary and "expected about 3.5 minutes" in summary
