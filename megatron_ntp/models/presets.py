"""Qwen3-style model presets: explicit shapes for the paper's model sizes (the paper's recipe).

All presets: pre-RMSNorm, SwiGLU, RoPE, QK-norm, GQA, no linear biases, head dimension 128
(Qwen3's), Qwen3's vocabulary of 151,936. The paper states sizes, not widths; the shapes below
are this project's choice, sized so that the counted parameters match the names (tests check
within 10%). Names count every parameter, embeddings included, as Qwen3's own names do
(Qwen3-30B-A3B). `megatron-ntp plan` prints the counts.

Embeddings are untied, except in the MoE presets: with a 151,936-token vocabulary an untied
embedding and output layer alone would spend 0.23B (h=768) to 0.47B (h=1536) of the active
budget, so those presets tie them (as Qwen3's smaller models do) and keep the rest of the budget
for the layers. The MoE presets are fine-grained (256 experts, top-8 routing, no shared expert,
Qwen3-style) with a load-balancing loss.

The tiny presets are for CPU: a few million parameters and an 8k vocabulary, so a step takes
well under a second on two cores.
"""

import difflib

from megatron_ntp.config.schema import QWEN3_VOCAB_SIZE

_QWEN3 = dict(vocab_size=QWEN3_VOCAB_SIZE, kv_channels=128, qk_layernorm=True,
              norm_epsilon=1e-6, rotary_base=10000.0, tie_embeddings=False)
_MOE = dict(num_experts=256, moe_router_topk=8, moe_load_balancing="aux_loss",
            moe_aux_loss_coeff=1e-3, moe_token_dispatcher="alltoall", tie_embeddings=True,
            ffn_hidden_size=0)

PRESETS: dict[str, dict] = {
    "dense-1b": dict(_QWEN3, num_layers=20, hidden_size=1536, num_attention_heads=16,
                     num_query_groups=8, ffn_hidden_size=4096),
    "dense-4b": dict(_QWEN3, num_layers=32, hidden_size=2560, num_attention_heads=32,
                     num_query_groups=8, ffn_hidden_size=9728),
    "moe-5b-a0.3b": dict(_QWEN3, **_MOE, num_layers=12, hidden_size=768,
                         num_attention_heads=8, num_query_groups=4, moe_ffn_hidden_size=704),
    "moe-10b-a0.5b": dict(_QWEN3, **_MOE, num_layers=16, hidden_size=1024,
                          num_attention_heads=8, num_query_groups=4, moe_ffn_hidden_size=768),
    "moe-20b-a1b": dict(_QWEN3, **_MOE, num_layers=24, hidden_size=1536,
                        num_attention_heads=16, num_query_groups=4, moe_ffn_hidden_size=704),
    "tiny-dense": dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       kv_channels=32, ffn_hidden_size=384, vocab_size=8192,
                       qk_layernorm=True, tie_embeddings=False),
    "tiny-moe": dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                     kv_channels=32, ffn_hidden_size=0, vocab_size=8192, qk_layernorm=True,
                     tie_embeddings=False, num_experts=8, moe_router_topk=2,
                     moe_ffn_hidden_size=128, moe_aux_loss_coeff=1e-2,
                     moe_token_dispatcher="alltoall"),
}

# The (total, active) parameters each name promises; tests hold the counts to these within 10%.
NOMINAL_PARAMS: dict[str, tuple[float, float]] = {
    "dense-1b": (1e9, 1e9),
    "dense-4b": (4e9, 4e9),
    "moe-5b-a0.3b": (5e9, 0.3e9),
    "moe-10b-a0.5b": (10e9, 0.5e9),
    "moe-20b-a1b": (20e9, 1e9),
}


def preset_fields(name: str) -> dict:
    """The ModelConfig fields of preset `name` (a copy); KeyError naming the closest preset."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name], preset=name)


def preset_model_config(name: str):
    """ModelConfig of preset `name` with every other field at its default."""
    from megatron_ntp.config.schema import ModelConfig

    return ModelConfig(**preset_fields(name))
