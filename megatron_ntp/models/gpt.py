"""megatron-core's GPTModel built from the config tree (Qwen3-style, local or TE layers).

Why GPTModel and not HybridModel (which megatron-core 0.19 recommends): HybridModel's stock
layer specs are assembled from Transformer Engine modules, which cannot be imported without a
GPU, while GPTModel with `get_gpt_layer_local_spec` is the path verified on CPU (TP, PP, EP,
SP on gloo) and GPTModel with the TE spec is the established GPU path. One model class keeps
the CPU tests and the GPU runs on the same code.
"""

import importlib.util

import torch
import torch.nn.functional as F

from megatron_ntp.config.schema import Config
from megatron_ntp.models.counting import padded_vocab_size, recompute_modules
from megatron_ntp.session import local_device


def transformer_config(config: Config, **overrides):
    """megatron-core TransformerConfig for `config` (validated; parallel.data resolved);
    `overrides` set further TransformerConfig fields (e.g. calculate_per_token_loss)."""
    from megatron.core.transformer import TransformerConfig

    m, p = config.model, config.parallel
    dtype = torch.bfloat16 if m.bf16 else torch.float32
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size or None,
        # Qwen3: pre-RMSNorm, SwiGLU, no linear biases, QK-norm, no dropout.
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        bf16=m.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # CPU initialisation draws the full master weight from the default generator on every
        # rank and keeps this rank's slice: identical weights whatever the TP size. On GPU the
        # per-rank initialisation (faster) is used.
        use_cpu_initialization=not torch.cuda.is_available(),
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline if p.virtual_pipeline > 1 else None,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor,
        sequence_parallel=p.sequence_parallel,
    )
    if m.num_experts:
        kwargs.update(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_router_topk=m.moe_router_topk,
            moe_router_load_balancing_type=m.moe_load_balancing,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_token_dispatcher_type=m.moe_token_dispatcher,
            moe_router_dtype="fp32",
            # Grouped GEMM needs Transformer Engine; the local spec uses SequentialMLP.
            moe_grouped_gemm=m.transformer_impl == "transformer_engine",
        )
    kwargs.update(recompute_settings(config))
    kwargs.update(expert_overlap_settings(config))
    kwargs.update(fp8_settings(config))
    kwargs.update(fusion_settings(config))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def recompute_settings(config: Config) -> dict:
    """TransformerConfig fields of parallel.recompute. Selective recomputation defaults to the
    attention core with local layers; Transformer Engine's fused attention keeps no [s, s]
    scores, so under it the default recomputes nothing (parallel.recompute_modules chooses)."""
    m, p = config.model, config.parallel
    if p.recompute == "selective":
        return dict(recompute_granularity="selective",
                    recompute_modules=list(recompute_modules(m, p)))
    if p.recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=p.recompute_num_layers)
    return {}


def expert_overlap_settings(config: Config) -> dict:
    """TransformerConfig fields of parallel.moe_a2a_overlap: megatron-core's EP all-to-all
    overlap as its MoE guide sets it (the combined 1F1B schedule, and the weight gradients
    delayed so that they fill the time of the other micro-batch's all-to-all)."""
    if not config.parallel.moe_a2a_overlap:
        return {}
    return dict(overlap_moe_expert_parallel_comm=True, delay_wgrad_compute=True)


def fp8_settings(config: Config) -> dict:
    """TransformerConfig fields of model.fp8: format, recipe, amax history and FP8 weights
    (fp8_param, all-gathered in FP8 by the distributed optimizer)."""
    m = config.model
    if not m.fp8:
        return {}
    return dict(fp8=m.fp8, fp8_recipe=m.fp8_recipe, fp8_amax_history_len=m.fp8_amax_history_len,
                fp8_amax_compute_algo=m.fp8_amax_compute_algo,
                fp8_param=m.fp8_param_gather and config.parallel.distributed_optimizer)


def fusion_settings(config: Config, gpu: bool | None = None) -> dict:
    """TransformerConfig fields of Megatron-LM's fused kernels (its command-line defaults), on a
    GPU with model.kernel_fusions; none on CPU, where megatron-core's fusions have no kernels.
    gpu: whether the run is on a GPU (default: whether CUDA is available here)."""
    m = config.model
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if not (m.kernel_fusions and gpu):
        return {}
    te = m.transformer_impl == "transformer_engine"
    settings = dict(
        bias_activation_fusion=True,  # SwiGLU (megatron-core's bias_swiglu_impl)
        # local attention's fused softmax imports Apex's kernel at the first forward
        masked_softmax_fusion=kernel_installed("scaled_upper_triang_masked_softmax_cuda"),
        bias_dropout_fusion=True,
        apply_rope_fusion=te,  # the fused RoPE kernel is Transformer Engine's
        # megatron-core's own output layer (ColumnParallelLinear) raises without Apex's kernel
        gradient_accumulation_fusion=kernel_installed("fused_weight_gradient_mlp_cuda"),
    )
    if m.num_experts and te:
        settings.update(moe_permute_fusion=True,
                        moe_router_fusion=te_version_at_least("2.7.0"))
    return settings


def kernel_installed(module: str) -> bool:
    """Whether an extension module of fused kernels (Apex builds them) can be imported."""
    return importlib.util.find_spec(module) is not None


def te_version_at_least(version: str) -> bool:
    """Transformer Engine is installed at `version` or newer (megatron-core's router fusion
    needs 2.7)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    from megatron.core.utils import is_te_min_version

    return is_te_min_version(version)


def layer_spec(config: Config):
    """The layer spec: megatron-core's local (torch) modules or Transformer Engine modules."""
    from megatron.core.models.gpt import gpt_layer_specs

    m = config.model
    num_experts = m.num_experts or None
    if m.transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=m.num_experts > 0,
            qk_layernorm=m.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, qk_layernorm=m.qk_layernorm, normalization="RMSNorm")


def build_gpt_model(config: Config, pre_process: bool | None = None,
                    post_process: bool | None = None, vp_stage: int | None = None,
                    model_class=None, mcore_config=None, **model_kwargs):
    """GPTModel (or subclass `model_class`, e.g. one with the shaped loss) for this rank.

    mcore_config: a TransformerConfig to use (model chunks of one rank share one, as the
    schedules read it from the first chunk); default: transformer_config(config).
    model_kwargs go to the model class (e.g. ShapedLossGPTModel's loss_config).

    Call after megatron_ntp.parallel.initialize_parallel. pre_process/post_process default to
    whether this rank is the first/last pipeline stage (for chunk `vp_stage` when interleaved).
    The vocabulary is padded as counted in megatron_ntp.models.counting. The model is moved to
    this rank's device (its GPU), as Megatron-LM's get_model does before any wrapper sees it:
    megatron-core creates some weights on the CPU whatever the device (the MoE router's).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    m, p = config.model, config.parallel
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    rotary_base = int(m.rotary_base) if float(m.rotary_base).is_integer() else m.rotary_base
    model = (model_class or GPTModel)(
        config=mcore_config or transformer_config(config),
        transformer_layer_spec=layer_spec(config),
        vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, p.tensor),
        max_sequence_length=config.data.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        vp_stage=vp_stage,
        **model_kwargs,
    )
    return model.to(local_device())
