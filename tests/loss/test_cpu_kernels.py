"""The CPU passes (csrc/passes.cpp) against float64 truth and a stable sort, on both of their
loops (AVX2 + FMA, and the plain loop that CPUs without them run), edge rows included; and the
choice of passes; a build lock left by a killed build."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_ntp.loss import cpu_kernels, passes
from megatron_ntp.loss.impl import LossImpl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INF, NAN = float("inf"), float("nan")
NAN_ROWS, NEG_INF_ROW, CONSTANT_ROW, ONE_LIVE_ROW = [4, 5, 8], 6, 9, 10  # rows of _rows


def _rows(vocab: int, seed: int) -> torch.Tensor:
    """[12, vocab] float32: noise at three scales, then the edge rows."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(4, vocab, generator=gen) * torch.tensor([[0.1], [3.0], [30.0], [300.0]])
    edge = torch.randn(8, vocab, generator=gen)
    edge[0, vocab // 2] = NAN
    edge[1, -1] = -NAN  # what inf - inf gives on x86
    edge[2] = -INF  # -inf everywhere: m = -inf, sums 0
    edge[3, ::2] = -INF  # masked entries add nothing
    edge[4, 0] = INF  # m = +inf, S = NaN
    edge[5] = 7.0  # a constant row: S = V, T = 0
    edge[6, 1:] = -INF  # one live entry: S = 1, T = 0
    edge[7] = torch.linspace(-200.0, 0.0, vocab)  # exp underflows over most of the row
    return torch.cat([noise, edge])


def _truth(logits: torch.Tensor):
    """float64 m [N], S [N], T [N] (rows of -inf: m = -inf, sums 0)."""
    z = logits.double()
    m = z.amax(-1)
    shifted = z - torch.where(m > -INF, m, 0.0)[:, None]
    e = shifted.exp()
    return m, e.sum(-1), torch.where(e > 0, e * shifted, 0.0).sum(-1)


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("vocab, select_block", [(3000, 8), (3000, 3000), (4096, 64), (75968, 64),
                                                 (20, 4), (7, 7), (37, 37)])
def test_shard_stage_sums_equal_float64(vocab, select_block, simd):
    logits = _rows(vocab, seed=vocab)
    select_max, m, sums, _, _, topk_terms, topk_last = cpu_kernels.shard_stage(
        logits, select_block, 0, simd=simd)
    assert torch.equal(topk_terms, torch.tensor([INF, 0.0, 0.0]).expand_as(topk_terms))  # K = {}
    assert (topk_last == -1).all()
    want_select = logits.view(logits.shape[0], -1, select_block).amax(-1)  # NaN where NaN
    assert torch.equal(select_max.isnan(), want_select.isnan())
    assert torch.equal(select_max.nan_to_num(0.0), want_select.nan_to_num(0.0))
    want_m, want_s, want_t = _truth(logits)
    assert torch.equal(m.double().nan_to_num(0.0), want_m.nan_to_num(0.0))
    assert torch.equal(m.isnan(), want_m.isnan())
    finite = [row for row in range(logits.shape[0]) if row not in NAN_ROWS]
    for got, want in ((sums[:, 0], want_s), (sums[:, 1], want_t)):
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-6, atol=1e-6)
    assert sums[NAN_ROWS, 0].isnan().all()  # NaN or +inf logits: refused by stage 3
    assert sums[NEG_INF_ROW].tolist() == [0.0, 0.0] and m[NEG_INF_ROW] == -INF
    assert sums[CONSTANT_ROW].tolist() == [vocab, 0.0]
    assert sums[ONE_LIVE_ROW].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("vocab, select_block, k", [(3000, 8, 37), (4096, 16, 100), (4096, 64, 3),
                                                    (300, 4, 100), (37, 37, 5), (20, 4, 20)])
def test_shard_stage_top_k_is_the_first_k_under_the_tie_rule(vocab, select_block, k, simd):
    """The search inside stage 1 (in the select blocks, or the whole row when k reaches their
    number) equals a stable sort: noise, heavy ties, +-0, -inf; NaN rows get NaN values and
    positions 0..k-1. The terms of those k as K (stage 3 at TP 1) equal float64's."""
    gen = torch.Generator().manual_seed(vocab + k)
    ties = torch.randint(-2, 2, (4, vocab), generator=gen).float()
    signed_zeros = torch.where(torch.rand(2, vocab, generator=gen) < 0.5, 0.0, -0.0)
    logits = torch.cat([_rows(vocab, seed=k), ties, ties.masked_fill(ties < 0, -INF),
                        signed_zeros])
    _, m, _, values, positions, topk_terms, topk_last = cpu_kernels.shard_stage(
        logits, select_block, k, simd=simd)
    nan_rows = logits.isnan().any(-1)
    ok = ~nan_rows
    want = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
    assert torch.equal(positions[ok], want[ok])
    assert torch.equal(values[ok], logits.gather(-1, want)[ok])
    assert values[nan_rows].isnan().all() and (positions[nan_rows] == torch.arange(k)).all()

    top = logits.gather(-1, want).double()
    kth = top.amin(-1)
    assert torch.equal(topk_terms[ok, 0].double(), kth[ok])
    assert torch.equal(topk_last[ok], torch.where(top == kth[:, None], want, -1).amax(-1)[ok])
    shifted = top - m.double().clamp(min=-1e300)[:, None]  # a -inf row: sums 0, as S and T
    e = shifted.exp()
    torch.testing.assert_close(topk_terms[ok, 1].double(), e.sum(-1)[ok], rtol=1e-6, atol=0.0,
                               equal_nan=True)  # NaN: the +inf row, as its S
    torch.testing.assert_close(topk_terms[ok, 2].double(),
                               torch.where(e == 0, 0.0, e * shifted).sum(-1)[ok],
                               rtol=1e-5, atol=1e-6, equal_nan=True)


def _no_entries(logits):
    """gradient's (candidates, target) when no entry is written."""
    rows = logits.shape[0]
    empty = torch.empty(rows, 0)
    return (empty.long(), empty, empty), (torch.full((rows,), -1), torch.zeros(rows))


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("inplace", [True, False])
def test_gradient_entries_equal_the_scatters(simd, inplace):
    """The candidate and target entries written in the C++ pass equal the torch passes'
    scatters: strided candidate values (a view of stage 1's buffer), coefs expanded from
    [N, 1] or per entry, a target among the candidates (the target's value wins), rows
    without a target (column -1); an out-of-range column raises instead of writing."""
    gen = torch.Generator().manual_seed(7)
    rows, vocab, k = 6, 500, 9
    logits = torch.randn(rows, vocab, generator=gen) * 3
    log_normalizer = torch.logsumexp(logits, -1)
    coef = torch.randn(rows, generator=gen)
    columns = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)])
    packed = torch.cat([torch.randn(rows, 4), logits.gather(-1, columns)], -1)  # strided view
    values = packed[:, 4:]
    target_column = torch.tensor([columns[0, 3], -1, 17, columns[3, 0], 499, -1])
    target_value = torch.randn(rows, generator=gen)
    for coefs in (torch.randn(rows, generator=gen)[:, None].expand(-1, k),
                  torch.randn(rows, k, generator=gen)):
        want = passes._gradient(logits, log_normalizer, coef)
        passes._write_entries(want, log_normalizer, (columns, values, coefs),
                              (target_column, target_value))
        source = logits.clone()
        out = source if inplace else torch.empty_like(source)
        got = cpu_kernels.gradient(source, log_normalizer, coef, out, (columns, values, coefs),
                                   (target_column, target_value), simd=simd)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0.0)
        assert torch.equal(got[[0, 3], [columns[0, 3], columns[3, 0]]], target_value[[0, 3]])
    bad = columns.clone()
    bad[2, 5] = vocab
    with pytest.raises(RuntimeError, match="candidate column 500 outside"):
        cpu_kernels.gradient(logits, log_normalizer, coef, torch.empty_like(logits),
                             (bad, values, coefs), (target_column, target_value), simd=simd)


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("vocab", [3000, 75968, 7])
def test_gradient_equals_float64_in_place_too(vocab, simd):
    logits = _rows(vocab, seed=vocab + 1)
    gen = torch.Generator().manual_seed(vocab)
    log_normalizer = torch.logsumexp(logits, -1).nan_to_num(0.0, 0.0, 0.0)
    coef = torch.randn(logits.shape[0], generator=gen)
    # the float32 difference, as every pass takes it (its rounding is the input's, not exp's)
    want = (logits - log_normalizer[:, None]).double().exp() * coef.double()[:, None]
    out = cpu_kernels.gradient(logits, log_normalizer, coef, torch.empty_like(logits),
                               *_no_entries(logits), simd=simd)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-30, equal_nan=True)
    inplace = logits.clone()
    assert cpu_kernels.gradient(inplace, log_normalizer, coef, inplace, *_no_entries(logits),
                                simd=simd) is inplace
    assert torch.equal(inplace.nan_to_num(0.0), out.nan_to_num(0.0))


def test_exp_polynomial_is_within_two_ulp():
    """Every float32 step of exp's argument over [-88, 1], through the gradient pass (coef 1)."""
    x = torch.linspace(-88.0, 1.0, 1 << 20)[None]
    got = cpu_kernels.gradient(x, torch.zeros(1), torch.ones(1), torch.empty_like(x),
                               *_no_entries(x))
    want = x.double().exp()
    ulp = torch.tensor(2.0).pow(torch.floor(torch.log2(want)) - 23)
    normal = want > torch.finfo(torch.float32).tiny
    assert ((got.double() - want).abs() / ulp)[normal].max() <= 2.0
    assert got[0, 0] == 0.0  # exp(-88) = 6e-39 is flushed: -inf logits add exactly nothing


def test_passes_choice():
    logits = torch.randn(4, 64)
    assert passes.passes_for(logits, LossImpl()) == "cpu_kernel"  # the kernels are built
    assert passes.passes_for(logits.double(), LossImpl()) == "compiled"
    assert passes.passes_for(logits.t(), LossImpl()) == "compiled"  # not contiguous
    assert passes.passes_for(logits, LossImpl(passes="compiled")) == "compiled"
    with pytest.raises(ValueError, match="passes='cpu_kernel'.*float64"):
        passes.passes_for(logits.double(), LossImpl(passes="cpu_kernel"))


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_run(tmp_path):
    """torch waits on a build folder's `lock` file until its builder removes it; a build killed
    midway (Ctrl-C, scancel) leaves it. The next process must load the built kernels, remove
    the file and say so (torch alone waits forever: the subprocess would time out)."""
    from torch.utils.cpp_extension import _get_build_directory

    assert cpu_kernels._extension() is not None  # built (or loaded) in torch's usual folder
    name = cpu_kernels.extension_name()
    root = tmp_path / "torch_extensions"
    # a copy of the built folder (times kept: ninja finds nothing to rebuild) and a stale lock
    folder = shutil.copytree(_get_build_directory(name, verbose=False), root / name)
    (folder / "lock").touch()
    run = subprocess.run(
        [sys.executable, "-c", "from megatron_ntp.loss import cpu_kernels\n"
         "assert cpu_kernels._extension() is not None, 'the kernels did not load'"],
        cwd=ROOT,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)},
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"megatron_ntp: removing {folder / 'lock'}, left by a build" in run.stderr
    assert not (folder / "lock").exists()


def _load_in_subprocess(root, path):
    return subprocess.run(
        [sys.executable, "-c", "from megatron_ntp.loss import cpu_kernels\n"
         "assert cpu_kernels._extension() is not None, 'the kernels did not load'"],
        cwd=ROOT, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root), "PATH": path},
        capture_output=True, text=True, timeout=900)


def test_the_build_is_reused_whatever_ninja_comes_first_on_path(tmp_path):
    """Another ninja first on PATH (a system ninja outside the venv, whose command hashes differ:
    ninja 1.13 changed them) must not rebuild the kernels: the interpreter's own ninja builds
    and checks them. The other ninja here only records that it was run."""
    from torch.utils.cpp_extension import _get_build_directory

    assert cpu_kernels._extension() is not None
    name = cpu_kernels.extension_name()
    root = tmp_path / "torch_extensions"
    folder = shutil.copytree(_get_build_directory(name, verbose=False), root / name)
    library = folder / f"{name}.so"
    built = library.stat().st_mtime_ns
    other = tmp_path / "other_bin"
    other.mkdir()
    (other / "ninja").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/other_ninja_ran\n"
                                 f"exit 1\n")
    (other / "ninja").chmod(0o755)
    venv_first = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    for path in (str(other) + os.pathsep + os.environ["PATH"], venv_first):
        run = _load_in_subprocess(root, path)
        assert run.returncode == 0, run.stderr
        assert "compiling the CPU loss kernels" not in run.stderr
    assert not (tmp_path / "other_ninja_ran").exists()
    assert library.stat().st_mtime_ns == built  # not rebuilt


def test_a_build_says_so_with_its_time(tmp_path, monkeypatch, capsys):
    """A build (no library yet, or one older than its sources) is announced before it starts
    and timed; a load of a fresh library prints nothing. torch's build is stubbed: this checks
    the decision and the messages, the real build is the other tests'."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    loads = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: loads.append(kwargs) or "module")
    assert cpu_kernels._extension.__wrapped__() == "module"
    err = capsys.readouterr().err
    folder = tmp_path / cpu_kernels.extension_name()
    assert f"megatron_ntp: compiling the CPU loss kernels into {folder}" in err
    assert re.search(r"megatron_ntp: CPU loss kernels built in \d+ s", err), err
    library = folder / f"{cpu_kernels.extension_name()}.so"
    library.touch()  # newer than the sources: nothing to build
    assert cpu_kernels._extension.__wrapped__() == "module" and len(loads) == 2
    assert capsys.readouterr().err == ""
    os.utime(library, (0, 0))  # older than the sources: ninja would rebuild it
    cpu_kernels._extension.__wrapped__()
    assert "compiling the CPU loss kernels" in capsys.readouterr().err


def test_without_flock_the_build_lock_is_left_to_torch(tmp_path, monkeypatch):
    """A file system without flock (e.g. Lustre without -o flock): the extension still loads
    under torch's own lock, which is then not cleared (another node may be building)."""
    def no_flock(*args):
        raise OSError(38, "Function not implemented")

    (tmp_path / "lock").touch()
    monkeypatch.setattr(cpu_kernels.fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="no flock on .*megatron_ntp.flock"):
        with cpu_kernels._only_builder(str(tmp_path)):
            pass
    assert (tmp_path / "lock").exists()
