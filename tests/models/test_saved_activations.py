"""What the SwiGLU MLP keeps for backward, measured with saved-tensor hooks, against `plan`'s
count (megatron_ntp.models.counting).

`plan` counts what the GPU build keeps. Its SwiGLU is megatron-core's fused kernel
(bias_activation_fusion, bias_swiglu_impl / weighted_bias_swiglu_impl: torch-compiled code that
runs on CPU too), so the models here are built with the GPU's fusions wherever they run on CPU
(fusion_settings(gpu=True) on a machine without Transformer Engine or Apex: the fused SwiGLU
and bias-dropout-add), and with model.kernel_fusions=false for the unfused count. Each
measurement adds up the distinct storages that autograd saves during one forward (parameters
excluded), per token (dense MLP) or per routed copy of a token (experts).
"""

import json

import pytest

from megatron_ntp.config import ParallelConfig, load_config, validate_config
from megatron_ntp.models.counting import (
    activation_bytes_per_layer,
    expert_bytes_per_copy,
    swiglu_kept_widths,
)
from tests.compat.distributed import spawn

SEQ, BATCH = 32, 2
TOKENS = SEQ * BATCH
CASES = [(preset, fusions, dtype) for preset in ("tiny-dense", "tiny-moe")
         for fusions, dtype in ((True, "fp32"), (True, "bf16"), (False, "fp32"))]


def tiny_config(preset: str, fusions: bool, dtype: str):
    return validate_config(load_config(None, [
        f"model.preset={preset}", f"model.kernel_fusions={str(fusions).lower()}",
        f"model.bf16={str(dtype == 'bf16').lower()}", f"data.seq_length={SEQ}",
        f"train.micro_batch_size={BATCH}", f"train.global_batch_tokens={TOKENS}",
        "train.steps=1", "train.lr_warmup_steps=0",
        # the experts' width differs from h, so that each width is told apart
        "model.moe_ffn_hidden_size=96"], cuda_available=False), world_size=1)


def saved_bytes(module, *inputs) -> int:
    """Bytes of the distinct storages autograd saves in module(*inputs), parameters excluded
    (a view shares its base's storage: counted once)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        module(*inputs)
    return sum(storages.values())


def _measure_mlp(config) -> float:
    """Bytes per token (dense MLP) or per routed copy (experts) of layer 0's MLP, built as
    transformer_config with the GPU's fusions that run here."""
    import torch

    from megatron_ntp.models.gpt import build_gpt_model, fusion_settings, transformer_config

    mcore_config = transformer_config(config, **fusion_settings(config, gpu=True))
    mlp = build_gpt_model(config, mcore_config=mcore_config).decoder.layers[0].mlp
    m = config.model
    dtype = torch.bfloat16 if m.bf16 else torch.float32
    if not m.num_experts:
        hidden = torch.randn(SEQ, BATCH, m.hidden_size, dtype=dtype, requires_grad=True)
        return saved_bytes(mlp, hidden) / TOKENS
    copies = TOKENS * m.moe_router_topk  # balanced: the same number of tokens per expert
    permuted = torch.randn(copies, m.hidden_size, dtype=dtype, requires_grad=True)
    probs = torch.rand(copies, dtype=torch.float32, requires_grad=True)  # the router's, fp32
    tokens_per_expert = torch.full((m.num_experts,), copies // m.num_experts)
    return saved_bytes(mlp.experts, permuted, tokens_per_expert, probs) / copies


def _measure_all(rank, world_size, init_method, result_path):
    from megatron_ntp.parallel import initialize_parallel_from_config

    initialize_parallel_from_config(tiny_config("tiny-dense", True, "fp32"), rank=rank,
                                    world_size=world_size, init_method=init_method)
    results = {"|".join(map(str, case)): _measure_mlp(tiny_config(*case)) for case in CASES}
    with open(result_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "bytes.json"
    spawn(_measure_all, 1, str(path))
    return json.loads(path.read_text())


@pytest.mark.parametrize("preset, fusions, dtype", CASES)
def test_counted_mlp_activations_are_what_megatron_core_saves(measured, preset, fusions, dtype):
    """Dense: the MLP's input (h) plus the interior `activation_bytes_per_layer` counts (the
    layer's count minus that of the layer whose MLP is recomputed, which keeps the input only).
    Experts: `expert_bytes_per_copy` (permuted input, SwiGLU interior, fp32 probability)."""
    config = tiny_config(preset, fusions, dtype)
    m, act_bytes = config.model, 2 if dtype == "bf16" else 4
    got = measured[f"{preset}|{fusions}|{dtype}"]
    if m.num_experts:
        assert got == expert_bytes_per_copy(m, ParallelConfig(), act_bytes)
        return
    whole = activation_bytes_per_layer(m, ParallelConfig(), BATCH, SEQ, act_bytes)
    input_only = activation_bytes_per_layer(
        m, ParallelConfig(recompute="selective", recompute_modules=("mlp",)), BATCH, SEQ,
        act_bytes)
    assert got == m.hidden_size * act_bytes + (whole - input_only) / TOKENS


def test_the_fused_swiglu_keeps_its_input_and_the_product(measured):
    """The figures themselves: fused, 2 f (the kernel's input) + f (the down projection's
    input); unfused, 5 f dense and 6 f in experts (silu(gate), up + offset and the product
    beside the gate/up output; experts weight the product in a separate step)."""
    m = tiny_config("tiny-dense", True, "fp32").model
    h, f = m.hidden_size, m.ffn_hidden_size
    assert measured["tiny-dense|True|fp32"] == (h + 3 * f) * 4
    assert measured["tiny-dense|True|bf16"] == (h + 3 * f) * 2
    assert measured["tiny-dense|False|fp32"] == (h + 5 * f) * 4
    fm = tiny_config("tiny-moe", True, "fp32").model.moe_ffn_hidden_size
    assert measured["tiny-moe|True|fp32"] == (h + 3 * fm) * 4 + 4
    assert measured["tiny-moe|False|fp32"] == (h + 6 * fm) * 4 + 4
    assert swiglu_kept_widths(m) == (3, 3)
