import math

import pytest

from megatron_ntp.loss import ShapedLossConfig


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
