"""Sampling from a megatron-core model: temperature, top-k and top-p, m samples per prompt.

    samples = generate(chunks, prompts, SamplingParams(temperature=0.7, top_p=0.95,
                       num_samples=8, max_new_tokens=256), eod_id=tokenizer.eod,
                       max_length=config.data.seq_length, vocab_limit=tokenizer.vocab_size)

Runs on every rank of any layout (TP, PP, DP, EP; not the interleaved pipeline, which needs
several micro-batches) on megatron-core's forward-only schedule, one micro-batch per decoding
step. No KV cache: each step runs the whole prefix again, which is simple and exact but costs
O(length^2). That is fine for tiny models and short answers; for
large models export to Hugging Face (megatron-ntp export) and sample with an inference engine
(vLLM, SGLang), which is the fast path.

How a step works:
- the rows (prompt i, sample j) of this data-parallel rank are right-padded to the longest row;
  attention is causal, so padding after a row's end never changes its logits;
- on the last pipeline stage only each row's last position goes through the output layer
  (GPTModel's output_processor hook), and those logits ([rows, V_local]) are all-gathered over
  the tensor-parallel group to [rows, V] (V = the padded vocabulary; ids at or beyond
  `vocab_limit`, the padding, are never sampled);
- `sample_tokens` draws each row's token by inverse CDF from ONE uniform number of the row's own
  generator, seeded from (seed, prompt index, sample index): a row's samples do not depend on
  the batch it runs in or on the data-parallel size, and TP ranks draw identical tokens;
- the tokens go to every pipeline stage by a broadcast from the last stage.
A row stops at the end-of-document token (not included in the output) or after
max_new_tokens, or when it reaches max_length tokens in total.

Determinism: the same seed, checkpoint, layout and batch size give the same samples. Other
layouts or batch sizes change the logits by float rounding, which can change a sample where two
tokens are nearly tied.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron_ntp.session import local_device

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant for seed mixing


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """0 = greedy (argmax, lowest id among ties); else logits / temperature."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Sample among the smallest set of most likely tokens with mass >= top_p (1 = all)."""
    num_samples: int = 1
    """Samples per prompt (m)."""
    max_new_tokens: int = 64
    """Tokens generated at most per sample."""
    seed: int = 1234
    """Seed of the per-sample generators."""

    def __post_init__(self):
        if not self.temperature >= 0 or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Sample:
    tokens: list  # generated ids, without the prompt and without the end-of-document token
    finish: str  # "eod" or "length"


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one (prompt, sample) row."""
    x = (seed * _MIX + prompt_index * 1_000_003 + sample_index + 1) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) % (1 << 64)
    x ^= x >> 29
    return x % (1 << 63)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, params: SamplingParams,
                  vocab_limit: int | None = None) -> torch.Tensor:
    """Next token of each row.

    Args:
        logits: [N, V] full-vocabulary logits (any float dtype; computed in float32).
        uniforms: [N] numbers in [0, 1), one per row (ignored when greedy).
        vocab_limit: ids >= vocab_limit are never chosen (the padding rows).
    Returns:
        [N] int64 token ids.
    Order of the filters: temperature, then top-k, then top-p on the renormalised
    distribution; the most likely token always survives. Ties keep the lower id first.
    """
    z = logits.float()
    if vocab_limit is not None and vocab_limit < z.shape[-1]:
        z = z[:, :vocab_limit]
    if params.temperature == 0:
        return torch.argmax(z, dim=-1)  # first maximal index: the lowest id among ties
    z = z / params.temperature
    values, order = torch.sort(z, dim=-1, descending=True, stable=True)
    if params.top_k:
        values[:, params.top_k:] = float("-inf")
    probs = torch.softmax(values, dim=-1)
    if params.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        probs = torch.where(before < params.top_p, probs, 0.0)
        probs[:, 0] = torch.where(probs[:, 0] > 0, probs[:, 0], 1.0)
    cdf = torch.cumsum(probs.double(), dim=-1)
    threshold = uniforms.double().to(cdf.device)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, threshold, right=True).clamp_(max=probs.shape[-1] - 1)
    # never land on a zero-probability entry after the last kept one
    kept = (probs > 0).sum(-1, keepdim=True) - 1
    choice = torch.minimum(choice, kept)
    return order.gather(-1, choice)[:, 0]


def _last_position_logits(lengths, tp_group, *, hidden_states, output_layer, output_weight,
                          scale_logits=None, **unused):
    """GPTModel's output_processor hook: [rows, V] float32 logits at each row's last position,
    all-gathered over the TP group. Only those positions go through the output layer, so the
    [rows, T, V] logits of every position never exist."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    # hidden_states: [T, rows, h], or [T / tp, rows, h] with sequence parallelism
    if output_layer.sequence_parallel:
        hidden_states = gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=False, group=tp_group)
    rows = torch.arange(hidden_states.shape[1], device=hidden_states.device)
    last = hidden_states[lengths.to(hidden_states.device) - 1, rows]  # [rows, h]
    weight = output_layer.weight if output_weight is None else output_weight  # [V_local, h]
    local = (last @ weight.t())
    if scale_logits is not None:
        local = scale_logits(local)
    local = local.float().contiguous()
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=tp_group)
    return torch.cat(parts, dim=-1)


def causal_mask(length: int, device):
    # megatron-core's convention: True = masked out; [1, 1, s, s]
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device),
                      diagonal=1)[None, None]


def _any_active(active: torch.Tensor, dp_group) -> bool:
    """Whether any row of any data-parallel replica is still generating."""
    flag = torch.tensor([int(active.any())], dtype=torch.int)
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=dp_group)
    return bool(flag.item())


def _next_logits(chunks, tokens, lengths):
    """Run the forward-only schedule on [rows, T]; last-stage ranks get [rows, V] logits."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows, length = tokens.shape
    positions = torch.arange(length, device=tokens.device)[None].expand(rows, length)
    batch = {"tokens": tokens, "position_ids": positions.contiguous(),
             "attention_mask": causal_mask(length, tokens.device)}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    store = {}

    def forward_step(data_iterator, chunk):
        item = next(data_iterator)
        output = chunk(item["tokens"], item["position_ids"], item["attention_mask"],
                       output_processor=partial(_last_position_logits, lengths, tp_group))

        def loss_func(logits):  # last stage: [rows, V]
            store["logits"] = logits
            return logits.new_zeros(()), torch.tensor(0, dtype=torch.int), {}

        return output, loss_func

    iterators = [iter([batch]) for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0], model=chunks,
        num_microbatches=1, seq_length=length, micro_batch_size=rows, forward_only=True)
    return store.get("logits")


@torch.no_grad()
def generate_rows(chunks, prompts: list, row_ids: list, params: SamplingParams, eod_id: int,
                  max_length: int, vocab_limit: int | None = None) -> list:
    """Generate the rows `row_ids` ((prompt index, sample index) pairs) of this rank's
    data-parallel replica, all in one batch; returns one Sample per row.

    Every rank of the model-parallel group must call this with the same arguments.
    """
    from megatron.core import parallel_state

    device = local_device()
    if not row_ids:
        raise ValueError("generate_rows needs at least one row")
    lengths = torch.tensor([len(prompts[i]) for i, _ in row_ids], dtype=torch.long)
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    if lengths.max() >= max_length:
        raise ValueError(f"a prompt of {int(lengths.max())} tokens leaves no room below the "
                         f"maximum length {max_length} (data.seq_length)")
    total = int(min(max_length, lengths.max() + params.max_new_tokens))
    tokens = torch.full((len(row_ids), total), eod_id, dtype=torch.long)
    for r, (i, _) in enumerate(row_ids):
        tokens[r, : len(prompts[i])] = torch.tensor(prompts[i], dtype=torch.long)
    generators = [torch.Generator().manual_seed(row_seed(params.seed, i, j)) for i, j in row_ids]
    start_lengths = lengths.clone()
    finish = [None] * len(row_ids)
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    last_rank = dist.get_global_rank(pp_group, pp_size - 1) if pp_size > 1 else None

    dp_group = parallel_state.get_data_parallel_group()
    multiple = parallel_state.get_tensor_model_parallel_world_size() \
        if chunks[0].config.sequence_parallel else 1

    active = torch.ones(len(row_ids), dtype=torch.bool)
    while _any_active(active, dp_group):
        # A replica whose rows are all done keeps stepping (on its first row, result unused)
        # while others work: with expert parallelism the replicas meet in every MoE layer.
        rows = active.nonzero()[:, 0] if active.any() else torch.zeros(1, dtype=torch.long)
        width = int(lengths[rows].max())
        width = -(-width // multiple) * multiple  # sequence parallelism splits the sequence
        batch = tokens[rows, :width] if width <= total else torch.cat(
            [tokens[rows], tokens.new_full((len(rows), width - total), eod_id)], dim=1)
        logits = _next_logits(chunks, batch.to(device), lengths[rows])
        if not active.any():
            continue
        uniforms = torch.stack([torch.rand((), generator=generators[r], dtype=torch.float64)
                                for r in rows.tolist()])
        if last_stage:
            next_tokens = sample_tokens(logits, uniforms, params, vocab_limit).cpu()
        else:
            next_tokens = torch.empty(len(rows), dtype=torch.long)
        if pp_size > 1:
            next_tokens = next_tokens.to(device)
            dist.broadcast(next_tokens, src=last_rank, group=pp_group)
            next_tokens = next_tokens.cpu()
        for r, token in zip(rows.tolist(), next_tokens.tolist()):
            if token == eod_id:
                finish[r], active[r] = "eod", False
                continue
            tokens[r, lengths[r]] = token
            lengths[r] += 1
            if lengths[r] - start_lengths[r] >= params.max_new_tokens or lengths[r] >= total:
                finish[r], active[r] = "length", False
    return [Sample(tokens[r, start_lengths[r]: lengths[r]].tolist(), finish[r])
            for r in range(len(row_ids))]


def generate(chunks, prompts: list, params: SamplingParams, eod_id: int, max_length: int,
             vocab_limit: int | None = None, batch_size: int = 32) -> list:
    """m = params.num_samples samples for each prompt (lists of token ids), on every rank.

    Rows (prompt i, sample j) are dealt to data-parallel ranks round-robin and run in batches
    of `batch_size` rows; the results are gathered, so every rank returns all of them:
    a list over prompts of lists of m Samples.
    """
    from megatron.core import parallel_state

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(chunks) > 1:
        raise ValueError("generate runs one micro-batch per token, which the interleaved "
                         "pipeline schedule does not take: build one model chunk per rank "
                         "(parallel.virtual_pipeline=1)")
    m = params.num_samples
    all_rows = [(i, j) for i in range(len(prompts)) for j in range(m)]
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    mine = all_rows[dp_rank::dp]
    # Every replica runs the same number of batches (see generate_rows: with expert
    # parallelism they meet in the MoE layers); a replica short of rows reruns its first row
    # (or the first row overall) and drops the result.
    per_rank = -(-len(all_rows) // dp)
    results = {}
    for start in range(0, per_rank, batch_size):
        batch = mine[start: start + batch_size]
        rows = batch or mine[:1] or all_rows[:1]
        samples = generate_rows(chunks, prompts, rows, params, eod_id, max_length, vocab_limit)
        for row, sample in zip(batch, samples):
            results[row] = sample
    if dp > 1:
        gathered = [None] * dp
        dist.all_gather_object(gathered, results,
                               group=parallel_state.get_data_parallel_group())
        for part in gathered:
            results.update(part)
    return [[results[(i, j)] for j in range(m)] for i in range(len(prompts))]
