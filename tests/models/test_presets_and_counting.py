"""Presets match their names; FLOPs and memory follow the rules they state."""

import dataclasses

import pytest

from megatron_ntp.config import ParallelConfig, load_config, validate_config
from megatron_ntp.models.counting import (
    activation_bytes_per_layer,
    count_params,
    flops_per_token,
    memory_per_gpu,
    padded_vocab_size,
    params_per_rank,
)
from megatron_ntp.models.presets import NOMINAL_PARAMS, PRESETS, preset_model_config


@pytest.mark.parametrize("name", sorted(NOMINAL_PARAMS))
def test_counted_params_match_the_name(name):
    total, active = NOMINAL_PARAMS[name]
    counts = count_params(preset_model_config(name))
    assert abs(counts.total / total - 1) <= 0.10, (name, counts.total)
    assert abs(counts.active / active - 1) <= 0.10, (name, counts.active)


def test_nominal_sizes_are_what_the_names_say():
    # guards the table above against edits: "moe-20b-a1b" -> (20e9, 1e9)
    for name, (total, active) in NOMINAL_PARAMS.items():
        size = name.split("-")[1:]
        assert float(size[0].rstrip("b")) * 1e9 == total
        assert float((size[1] if len(size) > 1 else size[0]).lstrip("a").rstrip("b")) * 1e9 == active


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_qwen3_style(name):
    m = preset_model_config(name)
    assert m.qk_layernorm and m.num_attention_heads % m.num_query_groups == 0
    assert m.num_query_groups < m.num_attention_heads  # GQA
    if name.startswith("tiny"):
        assert count_params(m).total < 5e6 and m.vocab_size == 8192
    else:
        assert m.vocab_size == 151936 and m.kv_channels == 128
    if name.startswith("moe") or name == "tiny-moe":
        assert m.num_experts > m.moe_router_topk > 1 and m.moe_aux_loss_coeff > 0


def test_padded_vocab_like_megatron():
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 2) == 152064  # next multiple of 256
    assert padded_vocab_size(8000, 128, 4) == 8192
    assert padded_vocab_size(50257, 128, 8) % 8 == 0


def test_param_count_by_hand():
    # 1 layer, h=8, 2 heads / 1 group of 4, ffn 16, vocab 128, untied:
    m = dataclasses.replace(preset_model_config("tiny-dense"), num_layers=1, hidden_size=8,
                            num_attention_heads=2, num_query_groups=1, kv_channels=4,
                            ffn_hidden_size=16, vocab_size=128)
    attention = 8 + 8 * (8 + 2 * 4) + 8 * 8 + 2 * 4  # norm, qkv, proj, qk-norms
    mlp = 8 + 3 * 8 * 16
    assert count_params(m).total == 2 * 128 * 8 + 8 + attention + mlp


def test_moe_active_params_count_topk_experts():
    m = preset_model_config("tiny-moe")
    counts = count_params(m)
    per_expert = 3 * m.hidden_size * m.moe_ffn_hidden_size
    experts_off = m.num_layers * (m.num_experts - m.moe_router_topk) * per_expert
    assert counts.total - counts.active == experts_off


def test_params_per_rank_sum_over_a_layout():
    m = preset_model_config("moe-20b-a1b")
    p = ParallelConfig(tensor=2, pipeline=4, expert=8, sequence_parallel=True, data=8)
    # each rank of each stage holds 1/EP of its stage's experts: together, all of them
    stages = [params_per_rank(m, p, s) for s in range(p.pipeline)]
    assert sum(s.expert for s in stages) * p.expert == m.num_layers * m.num_experts * \
        3 * m.hidden_size * m.moe_ffn_hidden_size


def test_flops_per_token_is_6n_plus_attention():
    m = preset_model_config("dense-1b")
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * 128, m.num_query_groups * 128
    layer = h * (q + 2 * kv) + q * h + 3 * h * f  # matmul weights of one layer
    flops = flops_per_token(m, seq_length=4096)
    assert flops.matmul == 6 * (m.num_layers * layer + m.vocab_size * h)  # + output layer
    assert flops.attention == 3 * 2 * m.num_layers * q * 4096
    full = flops_per_token(m, 4096, ParallelConfig(recompute="full"))
    assert full.hardware - full.model == 2 * m.num_layers * layer + flops.attention // 3
    # the usual 6N approximation, N = non-embedding + output parameters, within 1%
    counts = count_params(m)
    assert flops.matmul == pytest.approx(6 * (counts.total - counts.embedding), rel=0.01)
    moe = preset_model_config("moe-20b-a1b")
    # an MoE token pays for its active experts only
    assert flops_per_token(moe, 4096).matmul < 6 * count_params(moe).active


def test_recompute_flops_count_the_modules_rebuilt():
    """Selective recompute adds the forward matmuls of the modules megatron-core rebuilds: by
    default the attention core with local layers and nothing with Transformer Engine layers."""
    def extra(m, **parallel):
        flops = flops_per_token(m, 4096, ParallelConfig(**parallel))
        return flops.hardware - flops.model

    local = preset_model_config("dense-1b")  # local layers
    te = dataclasses.replace(local, transformer_impl="transformer_engine")
    q, L = local.num_attention_heads * local.kv_channels, local.num_layers
    attention = 2 * L * q * 4096  # causal scores and weighted sum, forward
    mlp = 2 * L * 3 * local.hidden_size * local.ffn_hidden_size
    assert extra(local) == extra(local, recompute="none") == 0
    assert extra(local, recompute="selective") == attention
    assert extra(te, recompute="selective") == 0
    assert extra(te, recompute="selective", recompute_modules=("core_attn", "mlp")) == (
        attention + mlp)
    assert extra(te, recompute="selective", recompute_modules=("layernorm",)) == 0
    moe = dataclasses.replace(preset_model_config("moe-20b-a1b"),
                              transformer_impl="transformer_engine")
    h, L = moe.hidden_size, moe.num_layers
    experts = 2 * L * (moe.num_experts * h + moe.moe_router_topk * 3 * h * moe.moe_ffn_hidden_size)
    assert extra(moe, recompute="selective", recompute_modules=("moe",)) == experts
    assert extra(moe, recompute="selective", recompute_modules=("mlp", "moe_act")) == 0


def _memory(name="dense-4b", **parallel):
    m = dataclasses.replace(preset_model_config(name), bf16=True,
                            transformer_impl="transformer_engine")
    p = ParallelConfig(**{"data": 8, **parallel})
    return memory_per_gpu(m, p, micro_batch_size=1, seq_length=4096, num_microbatches=64)


def test_memory_rules():
    base = _memory()[0]
    assert base.weights == 2 * base.params and base.grads == 4 * base.params
    assert base.optimizer == 12 * base.params
    sharded = _memory(distributed_optimizer=True)[0]
    assert sharded.optimizer == pytest.approx(base.optimizer / 8, rel=1e-6)
    tp2 = _memory(tensor=2)[0]
    assert 0.45 < tp2.params / base.params < 0.55
    sp = _memory(tensor=2, sequence_parallel=True)[0]
    assert sp.activations < tp2.activations
    full = _memory(tensor=2, sequence_parallel=True, recompute="full")[0]
    assert full.activations < sp.activations / 3  # the logits stay
    stages = _memory(pipeline=4)
    assert [s.stage for s in stages] == [0, 1, 2, 3]
    assert stages[0].activations > stages[3].activations - 1  # more micro-batches in flight
    m = preset_model_config("tiny-dense")
    local = activation_bytes_per_layer(m, ParallelConfig(), 1, 512, act_bytes=4)
    selective = activation_bytes_per_layer(m, ParallelConfig(recompute="selective"), 1, 512,
                                           act_bytes=4)
    assert local - selective == 4 * m.num_attention_heads * 512 * 512  # fp32 softmax probs
    mlp_only = activation_bytes_per_layer(
        m, ParallelConfig(recompute="selective", recompute_modules=("mlp",)), 1, 512, act_bytes=4)
    # the SwiGLU interior: the fused kernel's input (2 f) and the down projection's input (f)
    assert local - mlp_only == 4 * 3 * m.ffn_hidden_size * 512


def test_preset_loads_as_config_base():
    config = validate_config(load_config(None, ["model.preset=moe-10b-a0.5b",
                                                "model.num_layers=8", "train.steps=3000"]))
    assert config.model.num_layers == 8 and config.model.num_experts == 256
    assert config.model.preset == "moe-10b-a0.5b"
