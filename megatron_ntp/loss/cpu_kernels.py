"""The shaped loss's CPU kernels (csrc/), compiled as one extension on first use.

- The top-k scan (csrc/first_k.cpp) instead of torch.topk: torch.topk on CPU partially sorts
  each row (~16 ns per entry); the scan bounds the k-th value by block maxima and then touches
  each entry about once (~1 ns). Same set K, same tie rule (position ascending among equal
  values) as the "keys" selection in megatron_ntp/loss/topk.py (GPUs).
- The two passes over the logits (csrc/passes.cpp), float32: the exp-sums pass of stage 1 and
  the gradient pass of stage 4, the functions megatron_ntp/loss/passes.py defines in torch.
  torch.compile's CPU loops spend most of their time in Sleef's expf; these loops use a
  cheaper polynomial of the same accuracy (<= 1.25 ulp) and sum in double: ~2.5x faster
  stage 1 and ~2x faster stage 4 on an AVX2 core, results equal to rounding. Stage 1 also
  runs the scan's block search on each row while the row is in cache (shard_stage).
Together they keep the shaped loss near the cost of cross-entropy on CPU.

The extension is built with the C++ compiler torch.compile already needs and the ninja installed
beside this interpreter (a dependency), whatever ninja comes first on PATH: ninja versions hash
command lines differently (1.13 changed the hash), so a build folder written by one looks
out of date to another, and switching between an activated venv and a plain shell rebuilt the
kernels each time. Built once per source and compiler (44 s on 2 idle AMD EPYC cores; tools/install.sh
builds them), cached under torch's extension folder ($TORCH_EXTENSIONS_DIR); a build says so on
stderr, with the time it took.
LossImpl(selection="keys") and LossImpl(passes="compiled") use the torch paths on CPU too; if
the build fails, those are used with a warning.

torch guards a build folder with a `lock` file that only the builder removes: a build killed
midway (Ctrl-C, scancel, a preempted job) leaves it, and every later load waits on it forever,
even where the library is built. Here every process that builds or loads the extension first
takes an flock on the folder (released by the kernel when its holder dies), so a `lock` file
found while holding it is such a leftover and is removed, with a warning. The guarantee is as
wide as the file system's flock: where it is local to a node (Lustre's localflock, NFS with
nolock), multi-node CPU runs should point $TORCH_EXTENSIONS_DIR at a node-local folder.
"""

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import sys
import time
import warnings

import torch

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCES = [os.path.join(_CSRC, name) for name in ("bindings.cpp", "first_k.cpp", "passes.cpp")]
_HEADERS = [os.path.join(_CSRC, "kernels.h")]


def extension_name() -> str:
    """The extension's name, with the sources' hash in it: two checkouts with different sources
    (or versions) get their own build folders instead of rebuilding over each other."""
    digest = hashlib.sha256()
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            digest.update(f.read())
    return f"megatron_ntp_cpu_kernels_{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _interpreters_ninja():
    """PATH with this interpreter's folder first while torch builds, where a ninja is installed
    there (the venv's: torch runs the first `ninja` on PATH)."""
    here = os.path.dirname(sys.executable)
    if shutil.which("ninja", path=here) is None:
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = here + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _needs_build(build_directory: str, name: str) -> bool:
    """No library yet, or one older than a source or header (ninja would rebuild it)."""
    library = os.path.join(build_directory, f"{name}.so")
    if not os.path.exists(library):
        return True
    return os.path.getmtime(library) < max(map(os.path.getmtime, _SOURCES + _HEADERS))


@functools.cache
def _extension():
    from torch.utils.cpp_extension import _get_build_directory, load

    name = extension_name()
    try:
        build_directory = _get_build_directory(name, verbose=False)  # created if absent
        with _only_builder(build_directory), _interpreters_ninja():
            building = _needs_build(build_directory, name)
            if building:
                print(f"megatron_ntp: compiling the CPU loss kernels into {build_directory} "
                      f"(once per source and compiler, about a minute on 2 cores)", file=sys.stderr,
                      flush=True)
            start = time.perf_counter()
            module = load(name=name, sources=_SOURCES, build_directory=build_directory,
                          extra_include_paths=[_CSRC], extra_cflags=["-O3", "-fopenmp"],
                          extra_ldflags=["-fopenmp"])
            if building:
                seconds = time.perf_counter() - start
                print(f"megatron_ntp: CPU loss kernels built in {seconds:.0f} s",
                      file=sys.stderr, flush=True)
            return module
    except Exception as err:  # no compiler, headers, ...: the torch paths still work
        warnings.warn(f"megatron_ntp: building the CPU kernels ({_CSRC}) failed, using "
                      f"torch.topk and torch.compile instead (slower): {err}")
        return None


@contextlib.contextmanager
def _only_builder(build_directory: str):
    """Hold an exclusive flock on `build_directory`; remove torch's build lock if one is there
    (with the flock held, no live process is building: the file outlived a killed build)."""
    with open(os.path.join(build_directory, "megatron_ntp.flock"), "a") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)  # blocks while another process builds or loads
        except OSError as err:  # e.g. Lustre mounted without flock: torch's lock alone
            warnings.warn(f"megatron_ntp: no flock on {guard.name} ({err}); a build lock left "
                          f"there by a killed build is not cleared")
        else:
            stale = os.path.join(build_directory, "lock")
            if os.path.exists(stale):
                warnings.warn(f"megatron_ntp: removing {stale}, left by a build of the CPU "
                              f"kernels that did not finish")
                os.remove(stale)
        yield  # the flock goes with the file's closing


def build() -> bool:
    """Build (or load) the kernels now; False where they cannot be built (tools/install.sh)."""
    return _extension() is not None


def available_for(values: torch.Tensor) -> bool:
    """Whether the top-k scan serves `values` (a CPU float32/float64 tensor, kernels built)."""
    return (values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)
            and _extension() is not None)


def passes_available_for(logits: torch.Tensor) -> bool:
    """Whether shard_stage and gradient serve `logits` (a contiguous CPU float32 tensor, kernels
    built)."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32
            and logits.is_contiguous() and _extension() is not None)


def first_k(values: torch.Tensor, k: int):
    """values [N, C] (CPU) -> (values [N, k], positions [N, k] ascending, ok [N] bool): each
    row's first k entries under (value descending, position ascending). A row holding NaN has
    no such set: ok is False there, its values NaN and its positions 0..k-1."""
    return _extension().first_k(values.contiguous(), k)


def first_k_by_block_max(values: torch.Tensor, block_max: torch.Tensor, block: int, k: int):
    """first_k, scanning only the blocks that can hold the first k: values [N, C] (CPU),
    block_max [N, C / block] the max of each block of `block` consecutive entries (NaN where the
    block holds one) -> (values [N, k], positions [N, k] ascending, ok [N] bool), as first_k."""
    return _extension().first_k_by_block_max(values.contiguous(), block_max.contiguous(), block, k)


def shard_stage(logits: torch.Tensor, select_block: int, k: int, simd: bool = True):
    """Stage 1 of a CPU float32 shard [N, V_local] in one pass per row: (select maxima [N,
    V_local / select_block], m [N], sums [N, 2] (passes.exp_sums), values [N, k], positions
    [N, k] ascending (topk.block_topk; NaN rows: NaN values, positions 0..k-1), topk_terms
    [N, 3], topk_last_position [N]); each row is summed at its exact max and searched while it
    is in cache. topk_terms are stage 3's terms of those k as K (for a shard that is the whole
    vocabulary): the value of K's last member (the smallest; its position, the largest among
    equal values, in topk_last_position) and S_K, T_K at m as sums holds S, T (k = 0: +inf,
    0, 0 and -1). simd=False runs the plain loops that CPUs without AVX2 + FMA run (for
    tests)."""
    return tuple(_extension().shard_stage(logits.contiguous(), select_block, k, simd))


def gradient(logits: torch.Tensor, log_normalizer: torch.Tensor, coef: torch.Tensor,
             out: torch.Tensor, candidates, target, simd: bool = True) -> torch.Tensor:
    """out [N, V_local] = exp(logits - log_normalizer[:, None]) * coef[:, None] (CPU float32;
    out may be logits itself), then per row, while it is in cache, the entries of
    candidates = (columns [N, c] int64, values [N, c], coefs [N, c]) get
    exp(value - log_normalizer) * coef, and target = (column [N] int64, value [N]) writes the
    value where the column is >= 0. simd as in shard_stage."""
    columns, values, coefs = candidates
    column, value = target
    _extension().gradient(logits.contiguous(), log_normalizer.float().contiguous(),
                          coef.float().contiguous(), out, columns, values.float(), coefs.float(),
                          column.contiguous(), value.float().contiguous(), simd)
    return out
