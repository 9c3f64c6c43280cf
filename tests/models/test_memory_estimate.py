"""`plan`'s activation estimate on layouts where an earlier formula was off: expert TP smaller
than TP, full recompute under pipeline parallelism, and the fused output-layer loss. (What the
SwiGLU keeps is measured in test_saved_activations.py.)"""

import dataclasses

import pytest

from megatron_ntp.config import ParallelConfig
from megatron_ntp.models.counting import (
    FUSED_LOSS_CHUNK_BYTES,
    activation_bytes_per_layer,
    memory_per_gpu,
    padded_vocab_size,
)
from megatron_ntp.models.presets import preset_model_config

SEQ = 4096


def _model(name, **fields):
    return dataclasses.replace(preset_model_config(name), bf16=True,
                               transformer_impl="transformer_engine", **fields)


def test_moe_layer_split_over_tp_with_expert_tp_1():
    """TP=2 with sequence parallelism and expert TP=1: the router and the dispatcher see this
    rank's half of the tokens, and whole experts process them, so every tensor of the layer
    (attention by heads or by sequence, experts by tokens) is halved. An earlier formula kept
    the router logits and the routed copies at their TP=1 size (moe-5b: 1.8x per layer)."""
    m = _model("moe-5b-a0.3b")
    tp1 = activation_bytes_per_layer(m, ParallelConfig(expert=8), 1, SEQ)
    tp2 = activation_bytes_per_layer(
        m, ParallelConfig(tensor=2, sequence_parallel=True, expert=8, expert_tensor=1), 1, SEQ)
    assert tp2 == pytest.approx(tp1 / 2, rel=1e-9)


def test_moe_expert_tp_gathers_the_tokens():
    """Expert TP=2 at TP=2: the dispatcher gathers the expert-TP group's tokens, so a rank holds
    all routed copies of the pair (2x the h-wide permuted input and output and the fp32 routing
    probabilities of expert TP=1) and half of each expert's interior (the same interior bytes
    as expert TP=1)."""
    m = _model("moe-5b-a0.3b")
    k, h, fm = m.moe_router_topk, m.hidden_size, m.moe_ffn_hidden_size
    layout = dict(tensor=2, sequence_parallel=True, expert=4)
    etp1 = activation_bytes_per_layer(m, ParallelConfig(**layout, expert_tensor=1), 1, SEQ)
    etp2 = activation_bytes_per_layer(m, ParallelConfig(**layout, expert_tensor=2), 1, SEQ)
    copies_etp1 = k * SEQ / 2
    per_copy_etp1 = 2 * h * 2 + 4  # (in + out) * bf16, fp32 probability
    assert etp2 - etp1 == pytest.approx(copies_etp1 * per_copy_etp1, abs=2)
    assert fm % 2 == 0


def test_full_recompute_rebuilds_one_block_at_a_time():
    """Full recompute, PP=4: each in-flight micro-batch keeps the inputs of its layers; the
    rebuilt layer exists once. An earlier formula multiplied the rebuilt layer by the
    micro-batches in flight too (stage 0 of dense-4b: +40%)."""
    m = _model("dense-4b")
    p = ParallelConfig(tensor=2, sequence_parallel=True, pipeline=4, data=8, recompute="full")
    stages = memory_per_gpu(m, p, micro_batch_size=1, seq_length=SEQ, num_microbatches=64)
    layers = m.num_layers // 4
    kept_per_microbatch = layers * SEQ * m.hidden_size * 2 // 2  # bf16 inputs, split by SP
    rebuilt = activation_bytes_per_layer(m, p, 1, SEQ)
    # stages 1 and 2 hold 3 and 2 micro-batches (1F1B) and have neither embedding nor head
    assert stages[1].activations == 3 * kept_per_microbatch + rebuilt
    assert stages[1].activations - stages[2].activations == kept_per_microbatch
    blocks = dataclasses.replace(p, recompute_num_layers=3)
    stage1 = memory_per_gpu(m, blocks, 1, SEQ, num_microbatches=64)[1]
    assert stage1.activations == 3 * (-(-layers // 3)) * SEQ * m.hidden_size + 3 * rebuilt


def test_fused_output_loss_keeps_no_logits():
    """model.fused_output_loss: the last stage keeps the loss's input, one chunk of fp32 logits
    with their bf16 copy (the GPU default budget, or model.fused_output_chunk_mib) and the fp32
    output-weight gradient accumulator, not the [tokens, V/tp] logits."""
    from megatron_ntp.loss.impl import DEFAULT_FUSED_CHUNK_BYTES

    assert FUSED_LOSS_CHUNK_BYTES == DEFAULT_FUSED_CHUNK_BYTES["cuda"]
    p = ParallelConfig(tensor=2, sequence_parallel=True, data=4)
    unfused_model = _model("dense-4b")
    unfused = memory_per_gpu(unfused_model, p, 1, SEQ)[0].activations
    h = unfused_model.hidden_size
    v_local = padded_vocab_size(unfused_model.vocab_size, 128, 2) // 2
    logits = SEQ * v_local * (2 + 4)  # bf16 logits and the loss's fp32 copy
    assert v_local == 76032  # 151,936 padded to a multiple of 256, halved: 456,192 B a token
    for chunk_mib, chunk_tokens in ((0, 1176), (64, 147), (10**6, SEQ)):
        fused_model = _model("dense-4b", fused_output_loss=True, fused_output_chunk_mib=chunk_mib)
        fused = memory_per_gpu(fused_model, p, 1, SEQ)[0].activations
        fused_head = SEQ * h * 2 + chunk_tokens * v_local * 6 + v_local * h * 4
        assert unfused - fused == logits - fused_head, chunk_mib
    assert SEQ * h * 2 + 1176 * v_local * 6 + v_local * h * 4 < 0.75 * logits
