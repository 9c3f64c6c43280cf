import math

import pytest
import torch

from megatron_ntp.loss import PAPER_SETTINGS, LossImpl, ShapedLossConfig, vocab_parallel_shaped_loss
from megatron_ntp.loss.impl import default_impl


def test_defaults_are_cross_entropy():
    cfg = ShapedLossConfig()
    assert (cfg.beta, cfg.lambda_topk, cfg.lambda_tail) == (0.0, 0.0, 0.0)
    assert cfg.is_cross_entropy
    assert not ShapedLossConfig(beta=-0.25).is_cross_entropy


def test_paper_example_constructs():
    cfg = ShapedLossConfig(beta=-0.25, topk=100, lambda_topk=0.0, lambda_tail=-0.1)
    assert cfg.topk == 100 and cfg.lambda_tail == -0.1


@pytest.mark.parametrize(
    "kwargs, field, shown",
    [
        ({"beta": math.nan}, "beta", "nan"),
        ({"beta": math.inf}, "beta", "inf"),
        ({"lambda_topk": "0.1"}, "lambda_topk", "'0.1'"),
        ({"lambda_tail": -math.inf}, "lambda_tail", "-inf"),
        ({"beta": True}, "beta", "True"),
        ({"topk": -1}, "topk", "-1"),
        ({"topk": 2.5}, "topk", "2.5"),
        ({"topk": True}, "topk", "True"),
    ],
)
def test_invalid_fields_are_named(kwargs, field, shown):
    with pytest.raises(ValueError) as err:
        ShapedLossConfig(**kwargs)
    assert f"ShapedLossConfig.{field}" in str(err.value) and shown in str(err.value)


def test_integers_are_accepted_as_floats():
    assert ShapedLossConfig(beta=1).beta == 1.0 and isinstance(ShapedLossConfig(beta=1).beta, float)


def test_paper_settings_table():
    assert list(PAPER_SETTINGS) == ["cross_entropy", "precision", "diversity", "tail_suppression",
                                    "head_preservation"]
    assert PAPER_SETTINGS["cross_entropy"].is_cross_entropy
    assert PAPER_SETTINGS["precision"] == ShapedLossConfig(beta=-0.25)
    assert PAPER_SETTINGS["diversity"] == ShapedLossConfig(beta=0.5)
    assert PAPER_SETTINGS["tail_suppression"] == ShapedLossConfig(topk=100, lambda_tail=-0.1)
    assert PAPER_SETTINGS["head_preservation"] == ShapedLossConfig(topk=100, lambda_topk=0.1)


def test_loss_impl_is_checked_and_the_environment_sets_only_defaults(monkeypatch):
    with pytest.raises(ValueError, match=r"LossImpl.selection must be one of .*'gpu'"):
        LossImpl(selection="gpu")
    with pytest.raises(ValueError, match="LossImpl.chunk_bytes"):
        LossImpl(chunk_bytes=0)
    with pytest.raises(ValueError, match=r"LossImpl.fused_chunk_bytes .* got 2.5"):
        LossImpl(fused_chunk_bytes=2.5)
    with pytest.raises(TypeError, match="LossImpl"):
        vocab_parallel_shaped_loss(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long),
                                   ShapedLossConfig(), impl="keys")
    monkeypatch.delenv("MEGATRON_NTP_CPU_TOPK", raising=False)
    monkeypatch.delenv("MEGATRON_NTP_COMPILE", raising=False)
    assert default_impl() == LossImpl()
    monkeypatch.setenv("MEGATRON_NTP_CPU_TOPK", "0")
    monkeypatch.setenv("MEGATRON_NTP_COMPILE", "0")
    assert default_impl() == LossImpl(selection="keys", passes="eager")
