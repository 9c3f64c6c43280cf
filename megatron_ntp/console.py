"""A quiet console: the known-benign warnings of megatron-core and torch, filtered in one place.

A 100-step run would otherwise print about twenty warnings per rank before its first progress
line. Each filter below matches one message (by its text) and says why the message is benign
for this project; anything not listed still prints. `megatron_ntp` installs the filters when it
is imported (before megatron-core is), so every program and every torchrun worker gets them.
MEGATRON_NTP_ALL_WARNINGS=1 turns them off.
"""

import logging
import os
import warnings

# (message regex, category, why it is benign here)
BENIGN_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", UserWarning,
     "megatron-core falls back to its torch optimizer and multi-tensor helpers; that is the CPU "
     "path by design, and the GPU install (slurm/README.md) brings Transformer Engine"),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning,
     "the local layer spec's torch RMSNorm is the intended CPU norm"),
    (r"full scope is deprecated", UserWarning,
     "raised by megatron-core 0.19.2's own TransformerConfig default (cuda_graph_scope); the "
     "project sets no CUDA-graph scope"),
    (r"MimoModelConfig is experimental", UserWarning,
     "raised when megatron.core.models is imported; the project does not use MIMO models"),
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     FutureWarning,
     "torch 2.13 renamed these collectives; megatron-core 0.19.2 calls the old names, which "
     "still work (the project's own code uses the new ones)"),
    # Every checkpoint load (resume, eval, generate, passk, export) raises the next three.
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
     r"load in a single process", UserWarning,
     "megatron-core 0.19.2 calls torch.distributed.checkpoint.load with no_dist=True "
     "(serialization.load_common_state_dict, the torch_dist load strategy): each rank reads "
     "its own shards and megatron-core coordinates the ranks itself"),
    (r"The argument order of load has been changed", UserWarning,
     "megatron-core 0.19.2's torch_dist load strategy passes the storage reader to "
     "torch.distributed.checkpoint.load by position; torch takes it as the keyword it now is"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
     "megatron-core 0.19.2's torch_dist checkpoint format is built on torch's ShardedTensor, "
     "which torch 2.13 still reads and writes"),
)

# Only without CUDA: on a GPU the advice matters (slurm/train.sbatch sets the variable).
BENIGN_WITHOUT_CUDA = (
    (r"When using sequence parallelism it is recommended to set the environment variable "
     r"CUDA_DEVICE_MAX_CONNECTIONS", UserWarning,
     "CUDA stream advice from megatron-core's tensor-parallel layers; a CPU has no streams"),
)

# megatron-core log records (logger name, message prefix, why)
BENIGN_LOG_RECORDS = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED",
     "megatron-core 0.19.2 steers new code to HybridModel, which has no GPTModel loss hook yet; "
     "GPTModel is what megatron-core's own GPT training uses"),
    ("megatron.core.rerun_state_machine", "Implicit initialization of Rerun State Machine",
     "check_for_nan_in_grad asks megatron-core's rerun state machine, which starts in its default "
     "mode, DISABLED (no re-runs of suspicious steps), as Megatron-LM's --rerun-mode does"),
    ("megatron.core.rerun_state_machine", "RerunStateMachine initialized in mode",
     "the same default mode, announced once"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated",
     "megatron-core 0.19.2's synchronous torch_dist save (TorchDistSaveShardedStrategy.save) "
     "runs its own async path with async_strategy='mcore'; the project saves synchronously"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_warnings() -> None:
    """Install the filters above (idempotent; skipped with MEGATRON_NTP_ALL_WARNINGS=1)."""
    if os.environ.get("MEGATRON_NTP_ALL_WARNINGS") == "1":
        return
    rules = BENIGN_WARNINGS
    if not _cuda_available():
        rules = rules + BENIGN_WITHOUT_CUDA
    for message, category, _why in rules:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefix, _why in BENIGN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
