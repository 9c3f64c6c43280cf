"""Step metrics: the console line, <run_dir>/metrics.jsonl and valid.jsonl, TensorBoard.

Written by global rank 0 only; the values it writes are already global (see step.reduce_sums).
A record's step is the step's number, 1..train.steps (loop.py): the console, both files and
TensorBoard print it as it is, so they agree with each other and with the checkpoint names.
Every training record has at least: step, ce, ppl, entropy, topk_mass, loss, lr, grad_norm,
tokens_per_s; MoE runs add moe_lb_loss; GPU runs add mfu.
"""

import json
import math
import os

import torch

from megatron_ntp.jobs.run_folder import METRICS_FILE, VALID_FILE

# Dense bf16 peak of one GPU, for MFU; H100 SXM (the project's target), by device name.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def moe_load_balancing_loss(config, num_microbatches: int):
    """Mean over MoE layers and micro-batches of the router's load-balancing loss (without its
    coefficient) of the last step, from megatron-core's MoE metrics tracker (which it clears);
    None for dense models. Collective over the pipeline and data-parallel groups: every rank
    must call it."""
    if not config.model.num_experts or config.model.moe_load_balancing == "none":
        return None
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    name = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
            "global_aux_loss": "global_load_balancing_loss"}[config.model.moe_load_balancing]
    totals = {}
    get_moe_metrics_tracker().report(
        loss_scale=1.0 / num_microbatches, iteration=0, force_initialize=True,
        track_names=[name], num_layers=config.model.num_layers, total_loss_dict=totals)
    return float(totals[name])


def clear_moe_metrics(config) -> None:
    """Forget what the router recorded (e.g. during validation, which is not reported)."""
    if config.model.num_experts:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        get_moe_metrics_tracker().clear()


def peak_flops_per_gpu() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class MetricsWriter:
    """Console + JSONL + TensorBoard sink; a no-op object on ranks other than 0."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, log_interval: int,
                 stream=None):
        self.enabled, self.log_interval = enabled, max(1, log_interval)
        self.stream = stream
        self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.train_file = open(os.path.join(run_dir, METRICS_FILE), "a")
        self.valid_file = open(os.path.join(run_dir, VALID_FILE), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))

    def train(self, record: dict, total_steps: int) -> None:
        if not self.enabled:
            return
        self._write(self.train_file, record, "train")
        step = record["step"]
        # step 1 too: the first line shows the run is going (compilation makes it the slowest)
        if step % self.log_interval == 0 or step in (1, total_steps):
            line = (f"step {step}/{total_steps} | loss {record['loss']:.4f} | "
                    f"ce {record['ce']:.4f} | ppl {record['ppl']:.2f} | "
                    f"entropy {record['entropy']:.3f} | topk_mass {record['topk_mass']:.3f} | "
                    f"lr {record['lr']:.3e} | grad_norm {record['grad_norm']:.3f} | "
                    f"tokens/s {record['tokens_per_s']:.0f}")
            if record.get("moe_lb_loss") is not None:
                line += f" | moe_lb_loss {record['moe_lb_loss']:.4f}"
            if record.get("mfu") is not None:
                line += f" | mfu {100 * record['mfu']:.1f}%"
            print(line, file=self.stream, flush=True)

    def valid(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write(self.valid_file, record, "valid")
        print(f"validation at step {record['step']} | ce {record['ce']:.4f} | "
              f"ppl {record['ppl']:.2f} | entropy {record['entropy']:.3f} | "
              f"topk_mass {record['topk_mass']:.3f}", file=self.stream, flush=True)

    def _write(self, file, record: dict, split: str) -> None:
        file.write(json.dumps(record) + "\n")
        file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{split}/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.train_file.close()
            self.valid_file.close()
            if self.tb is not None:
                self.tb.close()
