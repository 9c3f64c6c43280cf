"""Megatron-LM's H100 recipe, setting by setting, and where a config's GPU run departs from it.

`megatron-ntp plan` prints every departure with its reason. The recipe is Megatron-LM's own,
read at its commit d98e8a6 (August 2026):

- examples/llama/train_llama3_8b_h100_fp8.sh, its H100 FP8 example for a dense model of this
  size class: Transformer Engine layers, bf16 with FP8 (amax history 1024 of max, FP8 weights
  all-gathered), gradients reduced in bf16 (--grad-reduce-in-bf16), the distributed optimizer
  with the gradient reduce-scatter and the parameter all-gather overlapped, TP 1, the fused
  cross-entropy, manual garbage collection, no recomputation. Its Qwen3-4B config
  (examples/rl/model_configs/qwen3_4b.sh) runs at TP 1 too.
- megatron/core/transformer/moe/README.md, megatron-core's MoE guide: EP x TP within the
  NVLink domain of one node, grouped GEMM, the router and permute fusions, the alltoall
  dispatcher, the EP all-to-all overlap (--overlap-moe-expert-parallel-comm
  --delay-wgrad-compute), TP communication overlap where TP > 1, and blockwise FP8 (e4m3) as
  its recommendation for production training on Hopper.

The training hyperparameters (sequence length, batch, learning rate and schedule) are the
paper's and are not compared. Kernel availability (Apex, the Transformer Engine version) is
judged on the machine that plans, and is decided again when the run starts.
"""

from dataclasses import dataclass

from megatron_ntp.models.counting import recompute_modules
from megatron_ntp.models.gpt import fusion_settings

NVLINK_DOMAIN_GPUS = 8  # GPUs of one H100 node, joined by NVLink
RECIPE_FP8 = ("e4m3", "blockwise")  # the MoE guide's recommendation on Hopper
DELAYED_FP8_AMAX = (1024, "max")  # the dense H100 FP8 example's delayed scaling


@dataclass(frozen=True)
class Departure:
    """One setting of the recipe that the config does not follow."""

    setting: str
    """Megatron-LM's / megatron-core's name of the setting."""
    ours: str
    recipe: str
    reason: str


def recipe_departures(config) -> list[Departure]:
    """Every setting of Megatron-LM's H100 recipe that a GPU run of `config` does not follow,
    with the reason."""
    found = []
    for check in (_numerics, _data_parallel, _fp8, _layout, _experts, _kernels, _program):
        found += check(config)
    return found


def _differs(setting: str, ours, recipe, reason: str) -> list[Departure]:
    if ours == recipe:
        return []
    return [Departure(setting, _text(ours), _text(recipe), reason)]


def _text(value) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) \
        else str(value)


def _numerics(config) -> list[Departure]:
    m, p = config.model, config.parallel
    rebuilt = recompute_modules(m, p)
    recompute = p.recompute if p.recompute == "full" or rebuilt else "none"
    if rebuilt:
        recompute += f" {list(rebuilt)}"
    return (
        _differs("transformer_impl", m.transformer_impl, "transformer_engine",
                 "megatron-core's local (torch) layers, the CPU path and the default without "
                 "CUDA: no fused attention, fused norms or FP8")
        + _differs("bf16", m.bf16, True, "fp32 weights and activations, the default without "
                   "CUDA: twice the memory, no bf16 tensor cores")
        + _differs("recompute", recompute, "none", "chosen in this config: activation memory "
                   "for the forward FLOPs of what is rebuilt (FLOPs executed, above)"))


def _data_parallel(config) -> list[Departure]:
    m, p = config.model, config.parallel
    found = _differs("use_distributed_optimizer", p.distributed_optimizer, True,
                     "optimizer state replicated over the data-parallel ranks, the default "
                     "without CUDA")
    found += _differs("overlap_grad_reduce", p.overlap_grad_reduce, True,
                      "parallel.overlap_grad_reduce=false: the gradient reduction runs after "
                      "the backward")
    if p.distributed_optimizer:
        found += _differs("overlap_param_gather", p.overlap_param_gather, True,
                          "parallel.overlap_param_gather=false: the parameter all-gather runs "
                          "before the forward")
    if m.bf16:
        found += _differs("grad_reduce_in_bf16", p.grad_reduce_in_bf16, True,
                          "fp32 gradient buffer and reduction (Megatron-LM's own default): "
                          "twice the gradient memory and data-parallel traffic")
    return found


def _fp8(config) -> list[Departure]:
    m, p = config.model, config.parallel
    if not m.fp8:
        return _differs("fp8", "off", "/".join(RECIPE_FP8), (
            "bf16 throughout: the examples train in bf16, and FP8 through Transformer Engine "
            "has not run on a GPU in this project yet (model.fp8=e4m3 "
            "model.fp8_recipe=blockwise turns the recipe's on)"))
    found = _differs("fp8_recipe", m.fp8_recipe, RECIPE_FP8[1],
                     f"{m.fp8_recipe} scaling chosen in this config; megatron-core's MoE guide "
                     f"recommends blockwise on Hopper for production")
    if m.fp8_recipe == "delayed":
        found += _differs("fp8_amax_history_len/algo",
                          f"{m.fp8_amax_history_len}/{m.fp8_amax_compute_algo}",
                          "/".join(map(str, DELAYED_FP8_AMAX)), "chosen in this config")
    if p.distributed_optimizer:
        found += _differs("fp8_param_gather", m.fp8_param_gather, True,
                          "model.fp8_param_gather=false: weights all-gathered in bf16")
    return found


def _layout(config) -> list[Departure]:
    m, p = config.model, config.parallel
    found = _differs("tensor_model_parallel_size", p.tensor, 1,
                     "chosen in this config; the recipe keeps model parallelism as small as "
                     "the memory allows (MoE guide, guideline 1; TP 1 for Qwen3-4B)")
    if p.tensor > 1:
        found += _differs("sequence_parallel", p.sequence_parallel, True,
                          "parallel.sequence_parallel=false: norms and residuals replicated "
                          "over the TP group")
        found += _differs("tp_comm_overlap", "unavailable", True, (
            "not wired: it needs Transformer Engine's userbuffers set up before the model is "
            "built (Megatron-LM's initialize_tp_communicators); the examples keep TP at 1"))
    if m.num_experts and p.expert * p.tensor > NVLINK_DOMAIN_GPUS:
        found.append(Departure(
            "EP x TP", f"{p.expert} x {p.tensor} = {p.expert * p.tensor}",
            f"<= {NVLINK_DOMAIN_GPUS}", "crosses nodes: the token all-to-all leaves NVLink for "
            "the network; prefer PP across nodes (MoE guide, guideline 2)"))
    return found


def _experts(config) -> list[Departure]:
    m, p = config.model, config.parallel
    if not m.num_experts:
        return []
    found = _differs("moe_grouped_gemm", m.transformer_impl == "transformer_engine", True,
                     "local layers run one GEMM per expert (grouped GEMM is Transformer "
                     "Engine's)")
    found += _differs("moe_token_dispatcher_type", m.moe_token_dispatcher, "alltoall",
                      "allgather chosen in this config: every rank receives every token")
    if p.expert > 1:
        found += _differs("overlap_moe_expert_parallel_comm + delay_wgrad_compute",
                          p.moe_a2a_overlap, True,
                          "parallel.moe_a2a_overlap=false: the all-to-all is exposed (the "
                          "overlap holds one micro-batch more of activations)")
    return found


def _kernels(config) -> list[Departure]:
    """Megatron-LM's fused kernels, on by its defaults, that a GPU run of `config` lacks."""
    m = config.model
    te = m.transformer_impl == "transformer_engine"
    wanted = ["bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
              "gradient_accumulation_fusion"] + ([] if te else ["masked_softmax_fusion"])
    if m.num_experts:
        wanted += ["moe_permute_fusion", "moe_router_fusion"]
    settings = fusion_settings(config, gpu=True)
    return [Departure(name, "off", "on", _missing_kernel_reason(name, m, te))
            for name in wanted if not settings.get(name)]


def _missing_kernel_reason(name: str, m, te: bool) -> str:
    if not m.kernel_fusions:
        return "model.kernel_fusions=false"
    if name in ("apply_rope_fusion", "moe_permute_fusion", "moe_router_fusion") and not te:
        return "a Transformer Engine kernel (local layers)"
    if name == "moe_router_fusion":
        return ("needs Transformer Engine >= 2.7, not found where this plan ran (decided again "
                "at start-up)")
    if name == "gradient_accumulation_fusion":
        return ("needs Apex's kernel (megatron-core's own output layer raises without it), not "
                "importable where this plan ran (decided again at start-up)")
    return ("needs Apex's kernel, not importable where this plan ran (decided again at "
            "start-up)")


def _program(config) -> list[Departure]:
    """What the training program does differently, whatever the config."""
    return [
        Departure("cross_entropy_loss_fusion", "the shaped loss", "on", (
            "the shaped loss replaces megatron-core's cross-entropy, with its own vocab-parallel "
            "kernels (model.fused_output_loss also fuses the output layer)")),
        Departure("manual_gc", "off", "on", (
            "not implemented: Python's collector runs when it will, where Megatron-LM collects "
            "on every rank at the same step")),
    ]


__all__ = ["Departure", "NVLINK_DOMAIN_GPUS", "recipe_departures"]
