"""The top-k selection on CPU: a compiled scan (csrc/first_k.cpp) instead of torch.topk.

torch.topk on CPU partially sorts each row (~16 ns per entry); the scan bounds the k-th value
by strided block maxima and then touches each entry about once (~1 ns), which is what keeps
the shaped loss near the cost of cross-entropy on CPU. Same set K, same tie rule (position
ascending among equal values) as the "keys" selection in megatron_ntp/loss/topk.py (GPUs).

The extension is compiled on first use with the C++ compiler torch.compile already needs and
ninja (a dependency; about 20 s, cached under torch's extension folder, $TORCH_EXTENSIONS_DIR).
LossImpl(selection="keys") uses the torch path on CPU too; if the build fails, the torch path is
used with a warning.
"""

import functools
import hashlib
import os
import shutil
import sys
import warnings

import torch

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "first_k.cpp")


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load

    # torch runs `ninja` from PATH; the pip-installed one sits beside this interpreter, which is
    # not on PATH when the venv is used without activating it (.venv/bin/python -m pytest).
    venv_bin = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    # The source's hash in the name: two checkouts with different sources (or versions) get
    # their own build folders instead of rebuilding over each other under one build lock.
    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    try:
        return load(name=f"megatron_ntp_first_k_{digest}", sources=[_SOURCE],
                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as err:  # no compiler, headers, ...: the torch path still works
        warnings.warn(f"megatron_ntp: building the CPU top-k scan ({_SOURCE}) failed, using "
                      f"torch.topk instead (slower): {err}")
        return None


def available_for(values: torch.Tensor) -> bool:
    """Whether first_k serves `values` (a CPU float32/float64 tensor, kernel built)."""
    return (values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)
            and _extension() is not None)


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
