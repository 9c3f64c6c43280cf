"""The typed config tree: one dataclass per section, each field documented where it is declared.

The field docstrings are the `--help` text (see megatron_ntp.config.help). Sections owned by a
component live beside its code and are composed here: the loss knobs are
megatron_ntp.loss.ShapedLossConfig, the data section is megatron_ntp.data.config.DataConfig.
Checks that involve more than one field (divisibility of the parallel layout, the batch) are in
megatron_ntp.config.validate, run before any process group starts.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from megatron_ntp.data.config import DataConfig
from megatron_ntp.loss import ShapedLossConfig

# Qwen3's vocabulary; the tokenizer that matches the real presets.
QWEN3_VOCAB_SIZE = 151936

# Section -> field -> the default on a machine with CUDA, in place of the dataclass default
# (which is the CPU one, the path every CPU test runs): Megatron-LM's GPU numerics and
# optimizer, so that a preset run on a GPU without an example YAML trains in bf16 on
# Transformer Engine layers with the distributed optimizer. megatron_ntp.config.load applies
# them below the preset, the YAML file and the overrides.
GPU_DEFAULTS: dict[str, dict[str, object]] = {
    "model": {"transformer_impl": "transformer_engine", "bf16": True},
    "parallel": {"distributed_optimizer": True},
}


def device_defaults(cuda_available: bool) -> dict[str, dict[str, object]]:
    """The defaults that differ from the dataclass defaults on this kind of machine: a copy of
    GPU_DEFAULTS with CUDA, none without."""
    if not cuda_available:
        return {}
    return {section: dict(fields) for section, fields in GPU_DEFAULTS.items()}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Qwen3-style decoder (pre-RMSNorm, SwiGLU, RoPE, QK-norm, GQA,
    no linear biases). With `preset` set, the preset's fields are the defaults and any field
    given explicitly (in the YAML file or on the command line) overrides them."""

    preset: str = ""
    """Name of a preset in megatron_ntp.models.presets (e.g. dense-1b, moe-20b-a1b, tiny-dense);
    "" = every shape field comes from this section."""

    num_layers: int = 2
    """Transformer layers."""

    hidden_size: int = 128
    """Model width h."""

    ffn_hidden_size: int = 384
    """Width of the dense SwiGLU MLP (each of its gate and up projections); unused by MoE layers."""

    num_attention_heads: int = 4
    """Query heads."""

    num_query_groups: int = 2
    """Key/value heads (GQA groups); must divide num_attention_heads."""

    kv_channels: int = 32
    """Head dimension (Qwen3 uses 128 whatever the width, so q has heads * 128 channels)."""

    vocab_size: int = 8192
    """Tokenizer vocabulary; the embedding is padded to a multiple of
    make_vocab_size_divisible_by * parallel.tensor as Megatron does."""

    make_vocab_size_divisible_by: int = 128
    """Padding granularity of the vocabulary (per tensor-parallel rank)."""

    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""

    rotary_base: float = 10000.0
    """RoPE base (the paper: 1e4 in pre-training, 1e6 in mid-training)."""

    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""

    qk_layernorm: bool = True
    """RMSNorm on each query and key head (Qwen3's QK-norm)."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    num_experts: int = 0
    """Routed experts per MoE layer; 0 = dense model (every layer has the dense MLP)."""

    moe_ffn_hidden_size: int = 0
    """Width of each expert's SwiGLU MLP."""

    moe_router_topk: int = 2
    """Experts each token is routed to."""

    moe_load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    """Router load balancing: aux_loss (per micro-batch), seq_aux_loss, global_aux_loss, none."""

    moe_aux_loss_coeff: float = 1e-3
    """Weight of the load-balancing loss."""

    moe_token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """Token dispatcher: alltoall or allgather."""

    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer implementation: local (torch, runs on CPU) or transformer_engine (GPU; needed for
    fp8). Default transformer_engine on a machine with CUDA (GPU_DEFAULTS)."""

    bf16: bool = False
    """bf16 weights and activations with fp32 master weights and gradients (mixed precision).
    Default true on a machine with CUDA (GPU_DEFAULTS)."""

    fp8: Literal["", "e4m3", "hybrid"] = ""
    """FP8 format through Transformer Engine: "" (off), e4m3 or hybrid. Needs
    transformer_impl=transformer_engine and a GPU."""

    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """Transformer Engine FP8 recipe: delayed, tensorwise, mxfp8 or blockwise. fp8 needs a GPU of
    compute capability >= 8.9 (Ada, Hopper); mxfp8 needs >= 10.0 (Blackwell)."""

    fp8_amax_history_len: int = 1024
    """With fp8 and the delayed recipe: steps of amax history behind each scaling factor
    (Megatron-LM's H100 FP8 example uses 1024; megatron-core's own default is 1)."""

    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """With fp8 and the delayed recipe: scaling from the max of the amax history, or its
    most_recent entry."""

    fp8_param_gather: bool = True
    """With fp8 and parallel.distributed_optimizer: keep the layer weights in FP8 and all-gather
    them in FP8 (half the parameter all-gather volume; megatron-core's fp8_param)."""

    kernel_fusions: bool = True
    """On a GPU, Megatron-LM's fused kernels: SwiGLU bias-activation, bias-dropout-add; with
    transformer_engine layers RoPE and the MoE permute and router fusions; where Apex's kernels
    are installed, gradient-accumulation fusion and (local layers) the masked softmax. Ignored
    on CPU (the unfused torch code runs there)."""

    fused_output_loss: bool = False
    """Fuse the output layer with the shaped loss, chunked over tokens, so the [tokens, vocab]
    logits never exist (saves memory at large vocabularies). In training (the loss mask is
    known in the forward) each chunk's gradients are formed in the forward; a forward without
    a loss mask (e.g. scoring) keeps no gradients, its backward would recompute the logits."""

    fused_output_chunk_mib: int = 0
    """With fused_output_loss: the memory budget of one token chunk (its fp32 logits and their
    bf16 copy) in MiB; larger chunks run the output layer's matmuls faster and hold more.
    0: 64 MiB on CPU, 512 MiB on GPUs (megatron_ntp.loss.impl.DEFAULT_FUSED_CHUNK_BYTES)."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout. world size = tensor * pipeline * data; experts are spread over
    expert * expert_tensor ranks inside each pipeline stage."""

    tensor: int = 1
    """Tensor-parallel size (TP)."""

    pipeline: int = 1
    """Pipeline-parallel size (PP)."""

    virtual_pipeline: int = 1
    """Model chunks per pipeline rank for the interleaved schedule; 1 = no interleaving."""

    data: int = 0
    """Data-parallel size; 0 = derived at launch as WORLD_SIZE / (tensor * pipeline)."""

    expert: int = 1
    """Expert-parallel size (EP); must divide model.num_experts."""

    expert_tensor: int = 1
    """Tensor-parallel size inside the experts (1 is usual for fine-grained MoE)."""

    sequence_parallel: bool = False
    """Shard norms, dropout and residual activations along the sequence over the TP group."""

    moe_a2a_overlap: bool = False
    """With expert > 1 on a GPU: hide the experts' token all-to-all behind computation, as
    megatron-core's MoE guide sets it (overlap_moe_expert_parallel_comm with
    delay_wgrad_compute): the forward of one micro-batch runs layer by layer beside the backward
    of the previous one, which holds one micro-batch more of activations (plan counts it).
    Needs model.transformer_impl=transformer_engine (TE >= 2.3), model.bf16, the alltoall
    dispatcher, no full recompute and no 'moe' in recompute_modules, virtual_pipeline > 1 when
    pipeline > 1, no model.fused_output_loss, and CUDA_DEVICE_MAX_CONNECTIONS > 1 (several
    hardware queues, so that the all-to-all and the computation run at once)."""

    distributed_optimizer: bool = False
    """Shard fp32 master weights and Adam state over data-parallel ranks (ZeRO-1). Default
    true on a machine with CUDA (GPU_DEFAULTS)."""

    grad_reduce_in_bf16: bool = False
    """With model.bf16: keep the gradient buffer in bf16 and reduce(-scatter) it over the
    data-parallel ranks in bf16 (megatron-core's grad_reduce_in_fp32=False; Megatron-LM's
    --grad-reduce-in-bf16, as its H100 FP8 example runs): half the gradient memory and DP
    traffic. false: fp32 buffer and reduction (Megatron-LM's default with bf16)."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (attention core) or full (whole layers)."""

    recompute_num_layers: int = 1
    """With recompute=full: layers per recomputed block (uniform method)."""

    recompute_modules: tuple[Literal["core_attn", "mlp", "moe", "moe_act", "layernorm",
                                     "shared_experts"], ...] | None = None
    """With recompute=selective: megatron-core's submodule names to recompute (core_attn, mlp,
    moe, moe_act, layernorm, shared_experts); null = core_attn with local layers and none with
    transformer_engine layers, whose fused attention keeps no [s, s] scores to recompute."""

    overlap_grad_reduce: bool = True
    """On a GPU: overlap the data-parallel gradient reduce(-scatter) with the backward pass.
    Ignored on CPU."""

    overlap_param_gather: bool = True
    """On a GPU with distributed_optimizer: overlap the parameter all-gather after each
    optimizer step with the next forward pass. Ignored on CPU."""

    distributed_timeout_minutes: int = 60
    """Timeout of every collective (NCCL/gloo) before the job fails. Megatron-LM's default is
    10; rank 0 builds the dataset indices while the others wait, which took 4-7 minutes for a
    500B-token blend on a busy 2-core machine (benchmarks/index_build_bench.py): 60 leaves 8x."""


@dataclass(frozen=True)
class KnobSchedule:
    """A linear ramp of one loss knob: `start` until begin_step, `end` from end_step on."""

    start: float
    """Value up to and including begin_step."""

    end: float
    """Value from end_step on."""

    begin_step: int = 0
    """Step where the ramp starts."""

    end_step: int = 0
    """Step where the ramp reaches `end` (equal to begin_step: a jump)."""

    def value_at(self, step: int) -> float:
        if step <= self.begin_step:
            return self.start
        if step >= self.end_step:
            return self.end
        fraction = (step - self.begin_step) / (self.end_step - self.begin_step)
        return self.start + fraction * (self.end - self.start)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with a warmup-stable-decay learning rate (the paper's recipe)."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup and held through the stable phase."""

    min_lr: float = 3e-5
    """Learning rate at the end of the decay phase."""

    lr_warmup_steps: int = 2000
    """Linear warmup from 0 to lr."""

    lr_decay_steps: int = 0
    """Length of the final decay phase (from lr to min_lr, ending at the last step);
    0 = no decay (the stable phase lasts to the end, as in pre-training)."""

    lr_decay_style: Literal["linear", "cosine", "minus_sqrt"] = "linear"
    """Shape of the decay phase: linear, cosine or minus_sqrt."""

    weight_decay: float = 0.1
    """AdamW weight decay."""

    adam_beta1: float = 0.9
    """AdamW beta1."""

    adam_beta2: float = 0.95
    """AdamW beta2."""

    adam_eps: float = 1e-8
    """AdamW epsilon."""

    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 = no clipping."""

    global_batch_tokens: int = 16 * 2**20
    """Tokens per optimizer step over all data-parallel ranks (the paper: 16M); must be a multiple of
    micro_batch_size * data.seq_length * data-parallel size."""

    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""

    steps: int = 0
    """Optimizer steps; 0 = derived from token_budget."""

    token_budget: int = 0
    """Training tokens; sets steps = ceil(token_budget / global_batch_tokens) when steps is 0."""

    seed: int = 1234
    """Seed of weight initialisation and dropout."""

    eval_interval: int = 0
    """Validate every this many steps; 0 = never."""

    eval_steps: int = 10
    """Global batches per validation."""

    loss_schedule: dict[str, KnobSchedule] = field(default_factory=dict)
    """Per-knob linear schedules of the loss, e.g.
    {beta: {start: 0, end: -0.25, begin_step: 100, end_step: 1000}}; knobs: beta, lambda_topk,
    lambda_tail. A scheduled knob's value in the loss section is ignored."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Distributed checkpoints (megatron-core dist_checkpointing)."""

    save_dir: str = ""
    """Where checkpoints are written; "" = never save."""

    save_interval: int = 1000
    """Save every this many steps, at the end, and on SIGTERM (preemption)."""

    load_dir: str = ""
    """Load the latest checkpoint in this folder (or this iter_XXXXXXX folder): a full resume, or
    with finetune=true only the weights (and the optimizer state by choice). A checkpoint in
    save_dir takes precedence, so re-running a command resumes its own run; "" = start from
    scratch unless save_dir holds a checkpoint."""

    keep_last: int = 2
    """Keep this many most recent checkpoints in save_dir; older ones are deleted once a newer
    one is complete (>= 1)."""

    finetune: bool = False
    """Start a new phase from load_dir's weights (Megatron's --finetune; the paper's
    mid-training): step counter, learning-rate schedule, data position and random states
    start afresh from this config (seq_length, rotary_base, blend may differ); the optimizer
    state is kept when load_optimizer is true."""

    load_optimizer: bool = True
    """Load the optimizer state (Adam moments and step, fp32 master weights); false = Megatron's
    --no-load-optim (a fresh optimizer)."""

    load_rng: bool = True
    """Restore the python/numpy/torch/tensor-parallel random states on resume; false = Megatron's
    --no-load-rng. They are not restored with finetune or when the parallel layout changed."""

    verify: bool = True
    """Before loading, check every file of the checkpoint against the CRC-32 in its manifest
    (reads the whole checkpoint once more, spread over the ranks); false checks presence and
    sizes only (one stat per file, always done). On resume a damaged checkpoint is skipped for
    the newest intact one before it."""


@dataclass(frozen=True)
class LoggingConfig:
    """Console, metrics files and TensorBoard."""

    run_dir: str = "runs/default"
    """Run folder: metrics.jsonl, valid.jsonl, TensorBoard events, the resolved config."""

    log_interval: int = 1
    """Print a progress line every this many steps (metrics.jsonl gets every step)."""

    tensorboard: bool = True
    """Write TensorBoard event files under run_dir."""


@dataclass(frozen=True)
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape and numerics."""

    loss: ShapedLossConfig = field(default_factory=ShapedLossConfig)
    """Shaped next-token loss knobs (all zero = cross-entropy)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, tokenizer and sequence length."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, batch and run length."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

    def loss_at(self, step: int) -> ShapedLossConfig:
        """The loss knobs in effect at optimizer step `step`, train.loss_schedule applied."""
        scheduled = {name: ramp.value_at(step) for name, ramp in self.train.loss_schedule.items()}
        return dataclasses.replace(self.loss, **scheduled) if scheduled else self.loss
