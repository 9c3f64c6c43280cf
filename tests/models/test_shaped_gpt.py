"""ShapedLossGPTModel against megatron-core's own GPTModel on the same weights and batch (one
gloo rank): with the default knobs its per-token loss is megatron-core's cross-entropy; the
fused head gives the unfused head's loss, statistics and gradients, per token (backward
recomputes the logits) and as the masked sum (gradients formed during the forward), in one
chunk or in the chunks its memory budget allows."""

import torch

from megatron_ntp.config import load_config, validate_config
from megatron_ntp.loss import ShapedLossConfig
from tests.distributed import run_distributed

SEQ, BATCH = 16, 2


def _compare(rank, world_size):
    from megatron.core.models.gpt import GPTModel

    from megatron_ntp.models.gpt import build_gpt_model
    from megatron_ntp.models.shaped_gpt import ShapedLossGPTModel
    from megatron.core import parallel_state

    from megatron_ntp.parallel import initialize_parallel_from_config, set_seed

    config = validate_config(load_config(None, [
        "model.preset=tiny-dense", "model.num_layers=2", "model.vocab_size=1024",
        f"data.seq_length={SEQ}"]), world_size=1)
    initialize_parallel_from_config(config)

    def build(model_class, **kwargs):
        set_seed(config.train.seed)  # the same initial weights for every model
        return build_gpt_model(config, model_class=model_class, **kwargs)

    plain = build(GPTModel)
    shaped = build(ShapedLossGPTModel)
    cfg = ShapedLossConfig(beta=-0.25, topk=8, lambda_tail=-0.1)
    unfused = build(ShapedLossGPTModel, loss_config=cfg)
    fused = build(ShapedLossGPTModel, loss_config=cfg, fused_output_loss=True)
    # 5 tokens' fp32 logits per chunk (model.fused_output_chunk_mib in training): 7 chunks
    chunked = build(ShapedLossGPTModel, loss_config=cfg, fused_output_loss=True,
                    fused_chunk_bytes=5 * 1024 * 4)
    chunk_rows = _record_chunk_rows()

    tokens = torch.randint(0, 1000, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    inputs = (tokens[:, :-1], torch.arange(SEQ).expand(BATCH, -1),
              torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).view(1, 1, SEQ, SEQ))
    labels = tokens[:, 1:]

    expected = plain(*inputs, labels=labels)  # [b, s] megatron-core cross-entropy
    got = shaped(*inputs, labels=labels)
    assert got.shape == (BATCH, SEQ)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shaped.loss_stats["ce"], expected, rtol=1e-5, atol=1e-5)

    mask = torch.rand(BATCH, SEQ, generator=torch.Generator().manual_seed(1)) > 0.25
    losses = {}
    for name, model, mask_kwargs in (("unfused", unfused, {}), ("fused", fused, {}),
                                     ("fused sum", fused, {"loss_mask": mask}),
                                     ("fused sum, 5-token chunks", chunked, {"loss_mask": mask})):
        model.zero_grad()
        chunk_rows.clear()
        output = model(*inputs, labels=labels, **mask_kwargs)
        if mask_kwargs:  # the fused head's masked sum, gradients formed during the forward
            assert model.loss_is_summed and output.shape == ()
            output.backward()
            loss = model.loss_stats["loss"]
            torch.testing.assert_close(output, (loss * mask).sum(), rtol=1e-5, atol=1e-5)
        else:  # per-token loss; the fused head's backward recomputes the logits
            assert not model.loss_is_summed and output.shape == (BATCH, SEQ)
            (output * mask).sum().backward()
            loss = output.detach()
        losses[name] = (loss, dict(model.loss_stats),
                        {n: p.grad.clone() for n, p in model.named_parameters()})
        assert chunk_rows == {"unfused": [], "fused sum, 5-token chunks": [5] * 6 + [2]}.get(
            name, [SEQ * BATCH] * (1 + (name == "fused"))), name  # "fused": forward, backward
    loss_u, stats_u, grads_u = losses["unfused"]
    assert not torch.allclose(loss_u, stats_u["ce"])  # the knobs are in effect
    for name in ("fused", "fused sum", "fused sum, 5-token chunks"):
        loss_f, stats_f, grads_f = losses[name]
        torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6, msg=name)
        for key in ("ce", "entropy", "topk_mass"):
            torch.testing.assert_close(stats_f[key], stats_u[key], rtol=1e-5, atol=1e-6)
        for param, grad in grads_u.items():
            torch.testing.assert_close(grads_f[param], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{name} {param}")
    parallel_state.destroy_model_parallel()


def _record_chunk_rows():
    """Tokens of each logits matmul of the fused head, appended to the returned list."""
    from megatron_ntp.loss import fused as fused_module

    rows, logits = [], fused_module._logits

    def recording(tokens, weight, out):
        rows.append(tokens.shape[0])
        return logits(tokens, weight, out)

    fused_module._logits = recording  # this test's own process (run_distributed spawns it)
    return rows


def test_default_knobs_are_megatron_cross_entropy_and_fused_matches_unfused():
    run_distributed(1, _compare)
