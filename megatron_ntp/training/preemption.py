"""SIGTERM (Slurm preemption, scancel, a wall-time limit) -> finish the step, save, exit 75.

The signal handler only sets a flag; the training loop asks `PreemptionWatch.requested()`
after every optimizer step. That call is collective: it all-reduces the flag (MAX) over all
ranks, so every rank stops after the same step even when only some of them received the signal
(torchrun forwards SIGTERM to its workers one by one; Slurm signals every task but not at the
same instant). The trainer then saves a checkpoint and raises `TrainingPreempted`, a SystemExit
whose code is PREEMPTED_EXIT_CODE = 75 (EX_TEMPFAIL of sysexits.h: "try again later"), so the
process exits with 75 unless a caller catches it; a job script that sees 75 requeues the job
and the same command resumes from the checkpoint.

Under plain torchrun the launcher itself exits 1 after its workers exit 75 (it lists their exit
codes), and when it is the one signalled it kills its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT
seconds (default 30) after forwarding SIGTERM: the save must fit in that time.
megatron_ntp.jobs.launch (used by slurm/train.sbatch) passes the workers' 75 on.
"""

import signal
import threading

import torch
import torch.distributed as dist

from megatron_ntp.session import local_device
from megatron_ntp.training import PREEMPTED_EXIT_CODE


class TrainingPreempted(SystemExit):
    """Raised by the trainer after the checkpoint of a preempted run is saved. `step`: the
    number of completed steps (the checkpoint's iteration)."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


class PreemptionWatch:
    """Context manager that turns SIGTERM into a flag for the duration of training.

    Outside the main thread (where Python cannot install handlers) it watches nothing: the
    flag stays down, and requested() still takes part in the collective.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = signals
        self.received = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        self.received = True

    def requested(self) -> bool:
        """True on every rank when any rank has received the signal (collective)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        device = local_device()
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
