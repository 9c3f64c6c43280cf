"""Parameters, FLOPs and per-GPU memory of a Qwen3-style GPT as megatron-core builds it.

Pure arithmetic on the config (no torch, no megatron-core), so `megatron-ntp plan` answers
for an H100 layout on a laptop. Parameter counts are exact for megatron-core's GPTModel (the
tests compare them with the built model's numel, per rank, at TP = 2 and EP = 2); FLOPs and
memory are estimates whose assumptions are stated on each function.

Shapes: h = hidden_size, q = num_attention_heads * kv_channels (query width),
kv = num_query_groups * kv_channels, f = ffn_hidden_size, E experts of width fm, top-k routing,
V = the padded vocabulary.
"""

from dataclasses import dataclass

GIB = 2**30
# Memory budget of one token chunk of the fused output-layer loss on a GPU, when
# model.fused_output_chunk_mib is 0: megatron_ntp/loss/impl.py's DEFAULT_FUSED_CHUNK_BYTES["cuda"],
# restated so that counting stays free of torch (a test checks they agree).
FUSED_LOSS_CHUNK_BYTES = 512 << 20


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tensor: int = 1) -> int:
    """Megatron's padding: the next multiple of divisible_by * tensor (so each TP rank holds an
    equal slice that is a multiple of divisible_by)."""
    multiple = divisible_by * tensor
    return -(-vocab_size // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCounts:
    """Whole-model parameter counts (all ranks together)."""

    total: int
    """Every parameter, embeddings and output layer included (the convention of the names)."""
    active: int
    """Parameters one token passes through: total with only top-k of the E experts."""
    embedding: int
    """Input embedding, V * h."""
    output: int
    """Output layer, V * h (0 when tied to the embedding)."""

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding - self.output

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding - self.output


def _attention_params(m, tensor: int = 1) -> int:
    """One layer's attention block per TP rank: input norm, QKV, QK-norm, output projection."""
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    qk_norm = 2 * m.kv_channels if m.qk_layernorm else 0  # replicated over TP
    h = m.hidden_size
    return h + h * (q + 2 * kv) // tensor + q * h // tensor + qk_norm


def _mlp_params(m, tensor: int = 1, experts: int | None = None, expert_tensor: int = 1) -> int:
    """One layer's MLP block per rank: pre-MLP norm plus the dense SwiGLU (gate, up, down), or
    the router plus `experts` local experts (all of them by default)."""
    h = m.hidden_size
    if m.num_experts == 0:
        return h + 3 * h * m.ffn_hidden_size // tensor
    experts = m.num_experts if experts is None else experts
    router = m.num_experts * h  # replicated on every rank
    return h + router + experts * 3 * h * m.moe_ffn_hidden_size // expert_tensor


def count_params(m, tensor: int = 1) -> ParamCounts:
    """Total and active parameters of ModelConfig `m` (the vocabulary padded for `tensor`)."""
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tensor)
    embedding = vocab * m.hidden_size
    output = 0 if m.tie_embeddings else embedding
    final_norm = m.hidden_size
    attention = _attention_params(m)
    total = embedding + output + final_norm + m.num_layers * (attention + _mlp_params(m))
    if m.num_experts:
        active_mlp = _mlp_params(m, experts=m.moe_router_topk)
    else:
        active_mlp = _mlp_params(m)
    active = embedding + output + final_norm + m.num_layers * (attention + active_mlp)
    return ParamCounts(total=total, active=active, embedding=embedding, output=output)


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one rank of one pipeline stage."""

    dense: int
    """Parameters replicated over the data-parallel group (all but the routed experts)."""
    expert: int
    """Routed-expert parameters, replicated over the smaller expert-data-parallel group."""

    @property
    def total(self) -> int:
        return self.dense + self.expert


def params_per_rank(m, p, stage: int = 0) -> RankParams:
    """Parameters on one rank of pipeline stage `stage` for ModelConfig `m`, ParallelConfig `p`.

    Layers split evenly over stages; the embedding lives on the first stage, the final norm and
    output layer on the last (a tied embedding is duplicated there when pipeline > 1, as
    megatron-core does). Norms and the router are replicated over TP.
    """
    tensor, pipeline = p.tensor, p.pipeline
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tensor)
    layers = m.num_layers // pipeline
    dense = layers * _attention_params(m, tensor)
    expert = 0
    if m.num_experts:
        local_experts = m.num_experts // p.expert
        dense += layers * _mlp_params(m, experts=0)
        per_expert = 3 * m.hidden_size * m.moe_ffn_hidden_size // p.expert_tensor
        expert = layers * local_experts * per_expert
    else:
        dense += layers * _mlp_params(m, tensor)
    shard = vocab * m.hidden_size // tensor
    if stage == 0:
        dense += shard
    if stage == pipeline - 1:
        dense += m.hidden_size  # final norm
        if not m.tie_embeddings or pipeline > 1:
            dense += shard
    return RankParams(dense=dense, expert=expert)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token (forward + backward = 3 x forward), one matmul = 2 FLOPs per MAC."""

    matmul: int
    """6 * the active matmul parameters (linear layers, router, output layer; not the
    embedding lookup)."""
    attention: int
    """Scores and weighted sum: 3 * 2 * 2 * layers * q * seq_length / 2 (causal: each query
    attends to half the sequence on average)."""
    recompute: int
    """Extra forward FLOPs of activation recomputation (full: one forward of the layers;
    selective: the forward of the modules it rebuilds)."""

    @property
    def model(self) -> int:
        """FLOPs the model needs (the MFU numerator)."""
        return self.matmul + self.attention

    @property
    def hardware(self) -> int:
        """FLOPs executed, recomputation included."""
        return self.model + self.recompute


def recompute_modules(m, p) -> tuple[str, ...]:
    """megatron-core's recompute_modules under parallel.recompute='selective' (() otherwise):
    parallel.recompute_modules, or by default the attention core with local layers and nothing
    with Transformer Engine layers, whose fused attention keeps no [s, s] scores to recompute."""
    if p.recompute != "selective":
        return ()
    if p.recompute_modules is not None:
        return tuple(p.recompute_modules)
    return () if m.transformer_impl == "transformer_engine" else ("core_attn",)


def _recomputes_mlp(m, p) -> bool:
    """Whether selective recompute rebuilds each layer's MLP: "mlp" in a dense model, "moe" in
    an MoE one (megatron-core's "mlp" skips MoE layers)."""
    return ("moe" if m.num_experts else "mlp") in recompute_modules(m, p)


def flops_per_token(m, seq_length: int, p=None) -> FlopsPerToken:
    """Training FLOPs per token of model config `m`; p: the ParallelConfig whose recompute
    settings give the `recompute` term (None: no recompute). Selective recompute counts the
    matmuls of the modules it rebuilds (core_attn, mlp or moe); layernorm, moe_act and
    shared_experts (the presets have none) rebuild no matmul."""
    h = m.hidden_size
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by)
    if m.num_experts:
        mlp = m.num_experts * h + m.moe_router_topk * 3 * h * m.moe_ffn_hidden_size
    else:
        mlp = 3 * h * m.ffn_hidden_size
    mlp_forward = 2 * m.num_layers * mlp
    layers_forward = 2 * m.num_layers * (h * (q + 2 * kv) + q * h) + mlp_forward
    attention_forward = 2 * m.num_layers * q * seq_length  # 2 matmuls * 2 FLOPs * s/2
    if p is not None and p.recompute == "full":
        extra = layers_forward + attention_forward
    else:  # selective (recompute_modules gives () otherwise)
        extra = 0 if p is None else (
            (attention_forward if "core_attn" in recompute_modules(m, p) else 0)
            + (mlp_forward if _recomputes_mlp(m, p) else 0))
    return FlopsPerToken(matmul=3 * (layers_forward + 2 * vocab * h),
                         attention=3 * attention_forward, recompute=extra)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""

    stage: int
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


def memory_per_gpu(m, p, micro_batch_size: int, seq_length: int,
                   num_microbatches: int | None = None) -> list[StageMemory]:
    """Estimated memory of one GPU in each pipeline stage (Megatron mixed precision, Adam).

    Per parameter: bf16 weights (2 B) with fp32 gradient buffer (4 B) and fp32 master weights
    plus Adam m, v (12 B), or fp32 throughout (4 + 4 + 8 B). With parallel.grad_reduce_in_bf16
    the gradient buffer is bf16 (2 B) and the optimizer keeps an fp32 copy of the gradient of
    the parameters it updates (4 B more in the optimizer term: megatron-core's
    _copy_model_grads_to_main_grads). The distributed optimizer divides the optimizer term by
    the data-parallel size (expert parameters: by the expert-data-parallel size); gradients
    stay whole, as megatron-core's buffers do. FP8 keeps bf16 weights (the FP8 copies are
    transient) and is not counted separately. Activations: see `stage_activation_bytes`.
    Excludes the CUDA context, allocator fragmentation and communication buffers (budget
    ~10-20%).
    """
    weight_bytes, grad_bytes, optim_bytes = (2, 4, 12) if m.bf16 else (4, 4, 8)
    if m.bf16 and p.grad_reduce_in_bf16:
        grad_bytes, optim_bytes = 2, 16
    data = max(p.data, 1)
    expert_data = max(p.tensor * data // (p.expert * p.expert_tensor), 1)
    stages = []
    for stage in range(p.pipeline):
        params = params_per_rank(m, p, stage)
        if p.distributed_optimizer:
            optimizer = optim_bytes * (params.dense / data + params.expert / expert_data)
        else:
            optimizer = optim_bytes * params.total
        activations = stage_activation_bytes(m, p, micro_batch_size, seq_length, stage,
                                             num_microbatches)
        stages.append(StageMemory(
            stage=stage, params=params.total, weights=weight_bytes * params.total,
            grads=grad_bytes * params.total, optimizer=int(optimizer),
            activations=int(activations)))
    return stages


def microbatches_in_flight(p, stage: int, num_microbatches: int | None = None) -> float:
    """Micro-batches whose activations a stage holds at its peak: `pipeline - stage` under 1F1B
    (times 1 + (pp-1)/(pp*vpp) when interleaved), 1 without PP; one more with
    parallel.moe_a2a_overlap, whose combined 1F1B schedule runs a micro-batch's forward beside
    the previous one's backward (megatron-core adds one warmup micro-batch when interleaved);
    capped by num_microbatches."""
    in_flight = 1 if p.pipeline == 1 else p.pipeline - stage
    if p.virtual_pipeline > 1:
        in_flight *= 1 + (p.pipeline - 1) / (p.pipeline * p.virtual_pipeline)
    if p.moe_a2a_overlap:
        in_flight += 1
    if num_microbatches:
        in_flight = min(in_flight, num_microbatches)
    return in_flight


def stage_activation_bytes(m, p, micro_batch_size: int, seq_length: int, stage: int,
                           num_microbatches: int | None = None) -> float:
    """Activation bytes on one GPU of pipeline stage `stage` at its peak.

    Without recompute each in-flight micro-batch keeps every layer's activations
    (`activation_bytes_per_layer`). With recompute=full (uniform method) a micro-batch keeps
    only the input of each block of `recompute_num_layers` layers, and backward rebuilds one
    block at a time: the rebuilt block is counted once, not per micro-batch in flight. The
    first stage also keeps the embedding output per micro-batch; the last stage adds the output
    head of the micro-batch in backward (`output_head_bytes`).
    """
    act_bytes = 2 if m.bf16 else 4
    tokens = micro_batch_size * seq_length
    sp = p.tensor if p.sequence_parallel else 1
    hidden_bytes = tokens * m.hidden_size * act_bytes // sp  # one [s/sp, b, h] tensor
    layer = activation_bytes_per_layer(m, p, micro_batch_size, seq_length, act_bytes)
    layers = m.num_layers // p.pipeline
    in_flight = microbatches_in_flight(p, stage, num_microbatches)
    if p.recompute == "full":
        blocks = -(-layers // p.recompute_num_layers)
        activations = in_flight * blocks * hidden_bytes + p.recompute_num_layers * layer
    else:
        activations = in_flight * layers * layer
    if stage == 0:
        activations += in_flight * hidden_bytes  # embedding output
    if stage == p.pipeline - 1:
        activations += output_head_bytes(m, p, tokens, act_bytes)
    return activations


def output_head_bytes(m, p, tokens: int, act_bytes: int) -> float:
    """The output layer and loss of one micro-batch on one rank of the last stage.

    Unfused: the logits [tokens, V/tp] in the activation dtype and the loss's fp32 copy.
    model.fused_output_loss: the logits never exist whole; the loss keeps its (gathered) input
    [tokens, h], one chunk of fp32 logits with their copy in the activation dtype
    (model.fused_output_chunk_mib, else FUSED_LOSS_CHUNK_BYTES, at most) and the fp32
    accumulator of the output-weight gradient [V/tp, h].
    """
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, p.tensor)
    vocab_local = vocab // p.tensor
    if not m.fused_output_loss:
        return tokens * vocab_local * (act_bytes + 4)
    budget = (m.fused_output_chunk_mib << 20) or FUSED_LOSS_CHUNK_BYTES
    per_token = vocab_local * (4 + (act_bytes if act_bytes != 4 else 0))
    chunk = min(tokens, max(1, budget // per_token)) * per_token
    return tokens * m.hidden_size * act_bytes + chunk + vocab_local * m.hidden_size * 4


def swiglu_kept_widths(m) -> tuple[int, int]:
    """(dense, expert): multiples of the SwiGLU width f that the MLP interior keeps for backward
    per token (dense MLP) and per routed copy of a token (expert), as the GPU build runs it.

    With model.kernel_fusions the GPU build fuses the activation (bias_activation_fusion:
    megatron-core's bias_swiglu_impl, and weighted_bias_swiglu_impl in experts, which multiply
    by the routing probability inside the kernel): the kernel keeps its input, the gate/up
    output (2 f), and the down projection keeps the product (f): 3 f. Unfused (mlp.py's glu):
    the gate/up output (2 f), silu(gate) (f), up + glu_linear_offset (f, a new tensor even for
    offset 0) and the product (f); experts multiply the product by the routing probability in
    a separate step (one f more). Measured with saved-tensor hooks in
    tests/models/test_saved_activations.py.
    """
    return (3, 3) if m.kernel_fusions else (5, 6)


def activation_bytes_per_layer(m, p, micro_batch_size: int, seq_length: int,
                               act_bytes: int = 2) -> int:
    """Activations one layer keeps for backward for one micro-batch on one rank.

    Counted tensor by tensor for the pre-norm SwiGLU layer (no dropout) as the GPU build keeps
    them: tensors of width h (norm inputs, linear inputs) are sharded by TP only under sequence
    parallelism; the attention and MLP interiors are sharded by TP. The attention core keeps
    q, k, v and its output; the local (unfused) attention also keeps the softmax probabilities,
    heads * seq per token, unless selective recompute rebuilds them (core_attn). The SwiGLU
    keeps `swiglu_kept_widths` (fused with model.kernel_fusions). MoE layers keep the router
    logits (fp32) of this rank's tokens and, per routed copy of a token on this rank, the
    permuted input, the expert interior, the expert output and its fp32 routing probability
    (balanced routing assumed). A layer whose MLP selective recompute rebuilds (mlp, or moe in
    an MoE model) keeps its input only; backward's rebuilt interior of one layer at a time is
    not counted, nor what layernorm and moe_act recompute save.

    The count follows Transformer Engine's fused norms (a norm fused into the next linear keeps
    its input and output once). megatron-core's local layers keep more (unfused RMSNorm
    intermediates, the scores beside the softmax output): measured with saved-tensor hooks on
    a tiny-dense layer (fp32, seq 32, the GPU's fusions that run on CPU), a local layer kept
    1.29x this count. Local layers are the CPU path, where memory is not the constraint.
    """
    h = m.hidden_size
    tp = p.tensor
    tokens = micro_batch_size * seq_length
    sp = tp if p.sequence_parallel else 1
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    per_token = 4 * h / sp  # input norm, QKV input, pre-MLP norm, MLP/router input
    if m.qk_layernorm:
        per_token += (q + kv) / tp
    per_token += (q + 2 * kv) / tp + q / tp  # q, k, v into attention; attention output
    if m.transformer_impl == "local" and "core_attn" not in recompute_modules(m, p):
        per_token += m.num_attention_heads / tp * seq_length  # softmax probabilities
    per_token += q / tp  # output projection input
    if not _recomputes_mlp(m, p):  # checkpointed, the MLP keeps its input only (counted above)
        per_token += _mlp_interior_per_token(m, p, act_bytes)
    return int(per_token * tokens * act_bytes)


def _mlp_interior_per_token(m, p, act_bytes: int) -> float:
    """Elements (of act_bytes each) the MLP keeps per token beyond its input."""
    tp, etp = p.tensor, p.expert_tensor
    if not m.num_experts:
        return swiglu_kept_widths(m)[0] * m.ffn_hidden_size / tp
    # MoE with TP > 1 runs with sequence parallelism (megatron-core raises otherwise in
    # training): the router sees this rank's tokens / tp; the dispatcher then gathers over the
    # expert-TP group, so a rank holds k * tokens * etp / tp routed copies (balanced routing).
    router_logits = m.num_experts * 4 / act_bytes / tp
    expert_output = m.hidden_size  # each copy going out, as it came in
    per_copy = expert_bytes_per_copy(m, p, act_bytes) / act_bytes + expert_output
    return router_logits + m.moe_router_topk * etp / tp * per_copy


def expert_bytes_per_copy(m, p, act_bytes: int) -> float:
    """Bytes the experts keep for backward per routed copy of a token on one rank: its permuted
    input (h), the SwiGLU interior (swiglu_kept_widths * fm / expert_tensor) and its fp32
    routing probability (the weight of the expert output)."""
    _, expert_swiglu = swiglu_kept_widths(m)
    interior = expert_swiglu * m.moe_ffn_hidden_size / p.expert_tensor
    return (m.hidden_size + interior) * act_bytes + 4
