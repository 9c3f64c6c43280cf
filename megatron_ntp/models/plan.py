"""The text `megatron-ntp plan` prints: parameters, FLOPs per token and per-GPU memory of a
validated config, and the preset table."""

from megatron_ntp.config.batch import BatchLayout
from megatron_ntp.models.counting import (
    GIB,
    count_params,
    flops_per_token,
    memory_per_gpu,
    padded_vocab_size,
    recompute_modules,
)
from megatron_ntp.models.gpt import (
    expert_overlap_settings,
    fp8_settings,
    fusion_settings,
    kernel_installed,
    recompute_settings,
)
from megatron_ntp.models.presets import NOMINAL_PARAMS, PRESETS, preset_model_config
from megatron_ntp.models.recipe import NVLINK_DOMAIN_GPUS, recipe_departures
from megatron_ntp.parallel import overlap_settings


def billions(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _modules(m, p) -> str:
    """' [core_attn, mlp]': the modules selective recompute rebuilds; '' for none/full."""
    return f" [{', '.join(recompute_modules(m, p))}]" if p.recompute == "selective" else ""


def format_plan(config) -> str:
    """Report for a validated Config (parallel.data resolved)."""
    m, p, t = config.model, config.parallel, config.train
    seq = config.data.seq_length
    counts = count_params(m)
    flops = flops_per_token(m, seq, p)
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, p.tensor)
    batch = BatchLayout(config)
    sequences, microbatches = batch.global_sequences, batch.num_microbatches
    shape = (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads / "
             f"{m.num_query_groups} query groups x {m.kv_channels}, ")
    if m.num_experts:
        shape += (f"{m.num_experts} experts x {m.moe_ffn_hidden_size} (top-{m.moe_router_topk}, "
                  f"{m.moe_load_balancing} x {m.moe_aux_loss_coeff:g})")
    else:
        shape += f"ffn {m.ffn_hidden_size}"
    shape += (f", vocab {m.vocab_size} (padded {vocab} at TP={p.tensor}), "
              f"{'tied' if m.tie_embeddings else 'untied'} embeddings")
    precision = "fp8 " + m.fp8 + "/" + m.fp8_recipe if m.fp8 else ("bf16" if m.bf16 else "fp32")
    lines = [
        f"model        {m.preset or '(custom)'}: {shape}",
        f"             {m.transformer_impl} layers, {precision}",
        f"parameters   total {billions(counts.total)} (non-embedding "
        f"{billions(counts.total_non_embedding)}), active {billions(counts.active)} "
        f"(non-embedding {billions(counts.active_non_embedding)})",
        f"FLOPs/token  {flops.model:.3e} train (fwd+bwd; matmul {flops.matmul:.3e} + attention "
        f"{flops.attention:.3e} at seq {seq}), {flops.hardware:.3e} executed with recompute="
        f"{p.recompute}{_modules(m, p)}",
        layout_line(config),
        f"batch        {t.global_batch_tokens:,} tokens = {sequences} sequences of {seq}; "
        f"micro-batch {t.micro_batch_size} -> {microbatches} micro-batches per DP rank per step",
    ]
    lines += gpu_settings_lines(config)
    lines += recipe_lines(config)
    loss = config.loss
    knobs = (f"beta={loss.beta:g} topk={loss.topk} lambda_topk={loss.lambda_topk:g} "
             f"lambda_tail={loss.lambda_tail:g}")
    for name, ramp in t.loss_schedule.items():
        knobs += (f"; {name} {ramp.start:g} -> {ramp.end:g} over steps "
                  f"{ramp.begin_step}-{ramp.end_step}")
    kind = "cross-entropy" if loss.is_cross_entropy and not t.loss_schedule else "shaped"
    lines.append(f"loss         {kind}: {knobs}")
    if t.steps:
        tokens = t.steps * t.global_batch_tokens
        lines.append(f"run          {t.steps} steps = {tokens:.3e} tokens, "
                     f"{tokens * flops.model:.3e} model FLOPs")
    lines += ["", "per-GPU memory, GiB (estimate; add ~10-20% for CUDA context, buffers, "
                  "fragmentation)",
              f"{'stage':>5} {'params/GPU':>12} {'weights':>9} {'grads':>9} {'optimizer':>10} "
              f"{'activations':>12} {'total':>9}"]
    for s in memory_per_gpu(m, p, t.micro_batch_size, seq, microbatches):
        lines.append(f"{s.stage:>5} {billions(s.params):>12} {s.weights / GIB:>9.2f} "
                     f"{s.grads / GIB:>9.2f} {s.optimizer / GIB:>10.2f} "
                     f"{s.activations / GIB:>12.2f} {s.total / GIB:>9.2f}")
    return "\n".join(lines) + "\n"


def layout_line(config) -> str:
    """TP x PP x DP = GPUs, and with experts EP x TP against one node's NVLink domain."""
    p = config.parallel
    gpus = p.tensor * p.pipeline * p.data
    virtual = f" (x{p.virtual_pipeline} virtual)" if p.virtual_pipeline > 1 else ""
    line = (f"layout       TP {p.tensor} x PP {p.pipeline}{virtual} x DP {p.data} = {gpus} "
            f"GPU{'s' if gpus != 1 else ''}; ")
    if config.model.num_experts:
        span = p.expert * p.tensor
        within = "within" if span <= NVLINK_DOMAIN_GPUS else "beyond"
        line += (f"EP {p.expert} x TP {p.tensor} = {span} ({within} one {NVLINK_DOMAIN_GPUS}-GPU "
                 f"node), expert TP {p.expert_tensor}; ")
    return line + (f"sequence parallel {'on' if p.sequence_parallel else 'off'}, distributed "
                   f"optimizer {'on' if p.distributed_optimizer else 'off'}, recompute "
                   f"{p.recompute}")


def on_names(settings: dict) -> str:
    return ", ".join(name for name, value in settings.items() if value is True) or "none"


def gpu_settings_lines(config) -> list[str]:
    """What a GPU run of `config` gets (megatron-core field names), whatever machine plans it."""
    m, p = config.model, config.parallel
    recompute = recompute_settings(config)
    fusions = fusion_settings(config, gpu=True)
    overlaps = {**overlap_settings(config, gpu=True), **expert_overlap_settings(config)}
    reduction = "bf16" if p.grad_reduce_in_bf16 else ("fp32" if m.bf16 else "fp32 (fp32 model)")
    lines = [
        f"on GPU       fusions: {on_names(fusions)}{_kernels_decided_at_start(config, fusions)}",
        f"             overlap: {on_names(overlaps)}; gradients reduced in {reduction}; "
        f"recompute_modules: {recompute.get('recompute_modules', '-')}; "
        f"distributed timeout {p.distributed_timeout_minutes} min",
    ]
    fp8 = fp8_settings(config)
    if fp8:
        lines.append(f"             fp8: {fp8['fp8']}, {fp8['fp8_recipe']} scaling"
                     + (f", amax history {fp8['fp8_amax_history_len']} "
                        f"({fp8['fp8_amax_compute_algo']})" if fp8['fp8_recipe'] == "delayed"
                        else "")
                     + f", fp8_param {'on' if fp8['fp8_param'] else 'off'}")
    return lines


def _kernels_decided_at_start(config, fusions: dict) -> str:
    """The fused kernels a GPU run gets only where their library is installed (not found where
    this plan runs): Apex's, and Transformer Engine's router fusion (MoE)."""
    m = config.model
    if not m.kernel_fusions:
        return ""
    pending = [] if fusions.get("gradient_accumulation_fusion") else [
        "gradient_accumulation_fusion"]
    if m.transformer_impl == "local" and not kernel_installed(
            "scaled_upper_triang_masked_softmax_cuda"):
        pending.append("masked_softmax_fusion")
    notes = [f"with Apex also {' and '.join(pending)}"] if pending else []
    if m.num_experts and m.transformer_impl == "transformer_engine" and not fusions.get(
            "moe_router_fusion"):
        notes.append("moe_router_fusion with TE >= 2.7")
    return "".join(f"; {note}" for note in notes)


def recipe_lines(config) -> list[str]:
    """The settings of Megatron-LM's H100 recipe (megatron_ntp.models.recipe) that this config
    departs from, each with its reason."""
    departures = recipe_departures(config)
    lines = [f"vs recipe    {len(departures)} settings differ from Megatron-LM's H100 recipe "
             f"(megatron_ntp/models/recipe.py):"]
    for d in departures:
        lines.append(f"             - {d.setting}: {d.ours} (recipe: {d.recipe}): {d.reason}")
    return lines


def format_presets() -> str:
    """Markdown table of the presets: shapes and counted parameters."""
    lines = ["| preset | layers | hidden | heads / groups | MLP | embeddings | total | active |"
             " total non-emb. | active non-emb. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in PRESETS:
        m = preset_model_config(name)
        c = count_params(m)
        mlp = (f"{m.num_experts} x {m.moe_ffn_hidden_size}, top-{m.moe_router_topk}"
               if m.num_experts else f"{m.ffn_hidden_size}")
        lines.append(
            f"| {name} | {m.num_layers} | {m.hidden_size} | {m.num_attention_heads} / "
            f"{m.num_query_groups} | {mlp} | {'tied' if m.tie_embeddings else 'untied'}, "
            f"V={m.vocab_size} | {billions(c.total)} | {billions(c.active)} | "
            f"{billions(c.total_non_embedding)} | {billions(c.active_non_embedding)} |")
    return "\n".join(lines) + "\n"


__all__ = ["format_plan", "format_presets", "NOMINAL_PARAMS"]
