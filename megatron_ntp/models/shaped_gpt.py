"""megatron-core's GPTModel with the shaped next-token loss attached at its loss seam.

Two paths, chosen by model.fused_output_loss:

- unfused: megatron-core computes logits [s, b, V_local] with its output layer and calls
  `compute_language_model_loss(labels, logits)`; this class overrides that hook to call
  `vocab_parallel_shaped_loss` over the tensor-parallel group. The logits are transient here, so
  the loss writes its gradient into them (overwrite_logits=True), as megatron-core's own
  cross-entropy does.
- fused: the logits are never materialised. GPTModel._postprocess hands the final hidden states
  to an `output_processor` when one is given (its hook for custom heads); this class passes one
  that calls the fused head with the output-layer weight. With the loss mask given to forward
  (the training step does), it is `fused_linear_shaped_loss_sum`: the loss is the masked sum, so
  the gradients are formed during the forward, chunk by chunk, and backward only scales them
  (no recompute of the logits; on the last pipeline stage each micro-batch in flight holds its
  output-weight gradient until its backward). Without a mask, `fused_linear_shaped_loss`
  (per-token loss, any per-token upstream gradient; backward recomputes the logits). The output layer's
  forward is skipped, so its forward pre-hooks are run by hand first: megatron-core's DDP
  finishes a parameter's all-gather there under overlap_param_gather (the weight would be last
  step's otherwise), as its fused experts do for their submodules (transformer/moe/experts.py).
  Tokens per chunk: `fused_chunk_bytes` (model.fused_output_chunk_mib), else the device's
  default (LossImpl.fused_chunk_bytes).

Forward returns the per-token surrogate loss [b, s] (what GPTModel returns with labels), or,
on the fused head with a loss mask, the masked sum [] (`self.loss_is_summed` says which), and
the per-token loss and statistics of the same reductions (loss, ce, entropy, topk_mass, each
[b, s], detached) are left in `self.loss_stats` for the training step's loss function to read
right after the forward (megatron-core's schedules call the loss function immediately after
each micro-batch's forward on the last stage, so one slot per model chunk is enough).

The loss knobs live in `self.loss_config` and may change between steps (train.loss_schedule):
the trainer calls `set_loss_config` before each step.
"""

import dataclasses

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_ntp.loss import (
    ShapedLossConfig,
    fused_linear_shaped_loss,
    fused_linear_shaped_loss_sum,
    vocab_parallel_shaped_loss,
)
from megatron_ntp.loss.impl import default_impl


class ShapedLossGPTModel(GPTModel):
    """GPTModel whose language-model loss is the shaped loss (cross-entropy with the defaults)."""

    def __init__(self, *args, loss_config: ShapedLossConfig | None = None,
                 fused_output_loss: bool = False, fused_chunk_bytes: int | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config or ShapedLossConfig()
        self.fused_output_loss = fused_output_loss
        self.fused_impl = dataclasses.replace(default_impl(), fused_chunk_bytes=fused_chunk_bytes)
        self.loss_stats: dict | None = None
        self.loss_is_summed = False  # set by each forward: the output is the masked sum

    def set_loss_config(self, loss_config: ShapedLossConfig) -> None:
        self.loss_config = loss_config

    # megatron-core's seam: labels [b, s], logits [s, b, V_local] -> per-token loss [b, s]
    def compute_language_model_loss(self, labels, logits):
        target = labels.transpose(0, 1).contiguous()  # [s, b]
        loss, stats = vocab_parallel_shaped_loss(logits, target, self.loss_config,
                                                 self.tp_group, overwrite_logits=True)
        return self._keep_stats(loss, stats)

    def forward(self, *args, labels=None, **kwargs):
        """GPTModel.forward; labels (and loss_mask) must be given by keyword (they select the
        fused head and its summed form)."""
        self.loss_is_summed = False
        if self.fused_output_loss and labels is not None and self.post_process:
            kwargs.setdefault("output_processor", self._fused_output_loss)
        return super().forward(*args, labels=labels, **kwargs)

    def _fused_output_loss(self, *, hidden_states, output_layer, output_weight, labels,
                           loss_mask=None, **unused):
        # hidden_states: [s, b, h], or [s / tp, b, h] with sequence parallelism.
        if output_layer.sequence_parallel:
            # The output layer would all-gather its input; here the loss does the matmul, so
            # gather first. tensor_parallel_output_grad=False: the backward only splits, because
            # the fused loss already all-reduces the hidden-state gradient over the TP group.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group)
        run_forward_pre_hooks(output_layer)
        weight = output_layer.weight if output_weight is None else output_weight  # [V_local, h]
        target = labels.transpose(0, 1).contiguous()  # [s, b]
        if loss_mask is None:
            loss, stats = fused_linear_shaped_loss(hidden_states, weight, target,
                                                   self.loss_config, self.tp_group,
                                                   impl=self.fused_impl)
            return self._keep_stats(loss, stats)
        mask = loss_mask.transpose(0, 1).to(torch.float32)  # [s, b]
        total, loss, stats = fused_linear_shaped_loss_sum(hidden_states, weight, target, mask,
                                                          self.loss_config, self.tp_group,
                                                          impl=self.fused_impl)
        self._keep_stats(loss, stats)
        self.loss_is_summed = True
        return total

    def _keep_stats(self, loss, stats):
        # [s, b] -> [b, s], the layout GPTModel returns its loss in
        self.loss_stats = {name: value.detach().transpose(0, 1) for name, value in stats.items()}
        self.loss_stats["loss"] = loss.detach().transpose(0, 1)
        return loss.transpose(0, 1).contiguous()


def run_forward_pre_hooks(module) -> None:
    """Call `module`'s forward pre-hooks without its forward (no inputs): megatron-core's DDP
    hooks only wait for the all-gather of the module's parameters."""
    for hook in module._forward_pre_hooks.values():
        if hook(module, None) is not None:
            raise RuntimeError(f"a forward pre-hook of {type(module).__name__} returned new "
                               f"inputs, which the fused output loss cannot pass on")
