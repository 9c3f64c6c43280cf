"""How the shaped loss is computed: the `impl=` argument of the public loss functions.

Every choice gives the same loss, statistics and gradient (tested); they differ in speed and
in where they can run. The environment variables MEGATRON_NTP_CPU_TOPK=0 (selection "keys" on
CPU too) and MEGATRON_NTP_COMPILE=0 (passes "eager") only change the defaults used when no
`impl` is given.
"""

import os

import torch
from dataclasses import dataclass

SELECTIONS = ("auto", "cpu_scan", "keys")
# LossImpl.chunk_bytes when None, by device type (accelerators: the "cuda" entry)
DEFAULT_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 512 << 20}
# LossImpl.fused_chunk_bytes when None, by device type. CPU: 64 MiB (~110 tokens of fp32 logits
# at V = 151,936) keeps the fused head's peak within its fp32 weight gradient + 96 MiB
# (benchmarks/README.md); GPUs: ~590 tokens at V = 151,936 with bf16 inputs (6 bytes a logit),
# so the matmuls' token dimension spans several tensor-core tiles.
DEFAULT_FUSED_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}
PASSES = ("auto", "cpu_kernel", "compiled", "eager")


@dataclass(frozen=True)
class LossImpl:
    """Implementation switches of the shaped loss (none of them changes a result)."""

    selection: str = "auto"
    """Top-k selection of stage 1 and 3. "cpu_scan": the compiled C++ scan (CPU tensors only);
    "keys": one torch.topk over int64 keys (value order, then lower id), no host sync: the GPU
    path; "auto": cpu_scan for CPU tensors when its extension builds, else keys."""

    passes: str = "auto"
    """The elementwise passes over the logits. "cpu_kernel": hand-written C++ loops (contiguous
    CPU float32 logits only); "compiled": torch.compile (one fused loop per pass, the GPU path);
    "eager": plain torch over row chunks of `chunk_bytes`; "auto": cpu_kernel where it serves
    the logits and its extension builds, else compiled."""

    chunk_bytes: int | None = None
    """Memory budget of the temporaries of one row chunk (stage 1's block sums and top-k
    candidates, the int64 selection keys, the eager passes' intermediates); rows per chunk
    follow from it and the shard width. None: DEFAULT_CHUNK_BYTES for the tensors' device
    (small on CPU, where the loss must not add to megatron-core's peak; large on GPUs, where
    each chunk costs kernel launches)."""

    fused_chunk_bytes: int | None = None
    """Memory budget of one token chunk of the fused output head (megatron_ntp/loss/fused.py):
    the chunk's logits in the compute dtype (fp32) and, for bf16/fp16 inputs, their copy in
    the input dtype that the matmuls use; tokens per chunk follow from it and V_local. Larger
    chunks run the three matmuls faster and hold more memory. None: DEFAULT_FUSED_CHUNK_BYTES
    for the tensors' device."""

    def __post_init__(self):
        for name, allowed in (("selection", SELECTIONS), ("passes", PASSES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LossImpl.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("chunk_bytes", "fused_chunk_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"LossImpl.{name} must be a positive integer, got {value!r}")

    def rows_per_chunk(self, bytes_per_row: int, device) -> int:
        """Rows whose temporaries (bytes_per_row each) fit chunk_bytes; at least one."""
        return _rows(self.chunk_bytes, DEFAULT_CHUNK_BYTES, bytes_per_row, device)

    def fused_tokens_per_chunk(self, bytes_per_token: int, device) -> int:
        """Tokens of the fused head whose logits (bytes_per_token each) fit fused_chunk_bytes;
        at least one."""
        return _rows(self.fused_chunk_bytes, DEFAULT_FUSED_CHUNK_BYTES, bytes_per_token, device)


def _rows(budget: int | None, defaults: dict, bytes_per_row: int, device) -> int:
    if budget is None:
        budget = defaults.get(torch.device(device).type, defaults["cuda"])
    return max(1, budget // max(1, bytes_per_row))


def choose(impl: LossImpl, switch: str, cpu_choice: str, cpu_serves, default: str,
           tensor: torch.Tensor, needs: str) -> str:
    """What serves `tensor` for one of impl's switches ("selection" or "passes"): the switch's
    value if it names another choice; else cpu_choice where cpu_serves(tensor) (the tensor
    suits the CPU kernels and they built; asked only here, so another choice builds nothing);
    else `default`, or a ValueError when cpu_choice was asked for."""
    requested = getattr(impl, switch)
    if requested not in ("auto", cpu_choice):
        return requested
    if cpu_serves(tensor):
        return cpu_choice
    if requested == cpu_choice:
        raise ValueError(f"LossImpl({switch}='{cpu_choice}') needs {needs} and the built CPU "
                         f"kernels; got {tensor.dtype} on {tensor.device}")
    return default


def default_impl() -> LossImpl:
    """The implementation used when `impl` is None: auto, unless an environment variable says
    otherwise (MEGATRON_NTP_CPU_TOPK=0, MEGATRON_NTP_COMPILE=0)."""
    return LossImpl(
        selection="keys" if os.environ.get("MEGATRON_NTP_CPU_TOPK", "1") == "0" else "auto",
        passes="eager" if os.environ.get("MEGATRON_NTP_COMPILE", "1") == "0" else "auto",
    )


def resolve(impl: LossImpl | None) -> LossImpl:
    if impl is None:
        return default_impl()
    if not isinstance(impl, LossImpl):
        raise TypeError(f"impl must be a megatron_ntp.loss.LossImpl or None, got {impl!r}")
    return impl
