"""The config tree: YAML + dotted overrides, unknown keys, types, validation, --help."""

import textwrap

import pytest

from megatron_ntp.config import (
    ConfigError,
    KnobSchedule,
    config_help,
    load_config,
    validate_config,
)
from megatron_ntp.loss import ShapedLossConfig
from megatron_ntp.models.presets import PRESETS


@pytest.fixture
def yaml_file(tmp_path):
    def write(text):
        path = tmp_path / "run.yaml"
        path.write_text(textwrap.dedent(text))
        return path
    return write


def valid(*overrides, world_size=None):
    base = ["model.preset=tiny-dense", "data.seq_length=64", "train.steps=10",
            "train.lr_warmup_steps=2", "train.global_batch_tokens=512"]
    return validate_config(load_config(None, base + list(overrides)), world_size=world_size)


def error_of(*overrides, world_size=None, validate=True) -> str:
    with pytest.raises(ConfigError) as info:
        if validate:
            valid(*overrides, world_size=world_size)
        else:
            load_config(None, list(overrides))
    return str(info.value)


# ---------------------------------------------------------------------------- loading
def test_yaml_then_overrides_then_types(yaml_file):
    path = yaml_file("""
        model: {preset: dense-1b, num_layers: 8}
        loss: {beta: -0.25, topk: 100}
        parallel: {tensor: 2}
        train: {lr: 3e-4, global_batch_tokens: 16e6, steps: 5, lr_warmup_steps: 1}
    """)
    config = load_config(path, ["loss.beta=0.5", "parallel.tensor=4", "train.min_lr=1e-5",
                                "parallel.sequence_parallel=true"])
    assert isinstance(config.loss, ShapedLossConfig)
    assert config.loss.beta == 0.5 and config.loss.topk == 100  # override beats the file
    assert config.parallel.tensor == 4 and config.parallel.sequence_parallel is True
    assert config.train.lr == 3e-4 and config.train.min_lr == 1e-5  # YAML 1.1 strings -> float
    assert config.train.global_batch_tokens == 16_000_000 and config.train.steps == 5
    # the preset gives the shape; an explicit field beats it
    assert config.model.num_layers == 8
    assert config.model.hidden_size == PRESETS["dense-1b"]["hidden_size"]
    assert config.model.vocab_size == 151936


def test_preset_from_override_and_data_section():
    config = load_config(None, ["model.preset=tiny-moe", "data.seq_length=128",
                                "data.blend=[1, a, 2, b]"])
    assert config.model.num_experts == PRESETS["tiny-moe"]["num_experts"]
    assert config.data.seq_length == 128
    assert config.data.blend_tuple() == (["a", "b"], [1.0, 2.0])


def test_loss_schedule_parsed_and_applied():
    config = valid("train.loss_schedule={beta: {start: 0, end: -0.25, begin_step: 100, "
                   "end_step: 1000}}", "train.steps=2000")
    ramp = config.train.loss_schedule["beta"]
    assert ramp == KnobSchedule(start=0.0, end=-0.25, begin_step=100, end_step=1000)
    assert config.loss_at(0).beta == 0.0 and config.loss_at(100).beta == 0.0
    assert config.loss_at(550).beta == pytest.approx(-0.125)
    assert config.loss_at(1000).beta == -0.25 and config.loss_at(5000).beta == -0.25
    assert config.loss_at(550).topk == config.loss.topk  # other knobs untouched


def test_token_budget_sets_steps():
    config = valid("train.steps=0", "train.token_budget=5000", world_size=1)
    assert config.train.steps == 10  # ceil(5000 / 512)


def test_data_parallel_derived_from_world_size():
    assert valid("parallel.tensor=2", world_size=8).parallel.data == 4
    assert valid().parallel.data == 1


# ---------------------------------------------------------------------------- key/type errors
@pytest.mark.parametrize("override, expected", [
    ("parallel.tensr=2", ["parallel.tensr", "parallel.tensor"]),
    ("loss.bta=1", ["loss.bta", "loss.beta"]),
    ("trian.lr=1", ["trian", "train"]),
    ("model.hidden=3", ["model.hidden", "model.hidden_size"]),
])
def test_unknown_key_named_with_suggestion(override, expected):
    message = error_of(override, validate=False)
    assert "unknown key" in message
    for text in expected:
        assert text in message


@pytest.mark.parametrize("override, expected", [
    ("train.lr=fast", ["train.lr", "fast"]),
    ("parallel.tensor=two", ["parallel.tensor", "two"]),
    ("parallel.tensor=1.5", ["parallel.tensor", "1.5"]),
    ("parallel.sequence_parallel=maybe", ["parallel.sequence_parallel", "maybe"]),
    ("loss.beta=.nan", ["loss.beta", "nan"]),
    ("loss.topk=-3", ["loss.topk", "-3"]),
    ("data.seq_length=0", ["data.seq_length", "0"]),
    ("model.preset=dense-2b", ["model.preset", "dense-2b", "dense-1b"]),
    ("train.loss_schedule={beta: 3}", ["train.loss_schedule.beta", "3"]),
])
def test_wrong_values_named(override, expected):
    message = error_of(override, validate=False)
    for text in expected:
        assert text in message, message


def test_malformed_override():
    assert "loss.beta" in error_of("loss.beta", validate=False)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, world_size, expected", [
    (["parallel.tensor=3"], 3, ["parallel.tensor=3", "model.num_attention_heads=4"]),
    (["parallel.tensor=4"], 4, ["parallel.tensor=4", "model.num_query_groups=2"]),
    (["model.num_query_groups=3"], 1, ["model.num_query_groups=3", "model.num_attention_heads=4"]),
    (["parallel.pipeline=3"], 3, ["model.num_layers=4", "parallel.pipeline", "3"]),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=4"], 2,
     ["model.num_layers=4", "parallel.virtual_pipeline", "4"]),
    (["parallel.virtual_pipeline=2"], 1, ["parallel.virtual_pipeline=2", "parallel.pipeline"]),
    (["parallel.expert=2"], 2, ["parallel.expert=2", "model.num_experts=0"]),
    (["model.preset=tiny-moe", "parallel.expert=3"], 3, ["parallel.expert=3", "model.num_experts=8"]),
    (["model.preset=tiny-moe", "parallel.expert=4"], 2, ["parallel.expert", "4", "parallel.data", "2"]),
    (["model.preset=tiny-moe", "model.moe_router_topk=9"], 1, ["model.moe_router_topk=9"]),
    (["train.global_batch_tokens=500"], 1, ["train.global_batch_tokens=500", "64"]),
    (["train.global_batch_tokens=768", "train.micro_batch_size=2"], 4,
     ["train.global_batch_tokens=768", "train.micro_batch_size", "2 * 64 * 4 = 512"]),
    (["train.global_batch_tokens=640"], 4, ["train.global_batch_tokens=640", "1 * 64 * 4 = 256"]),
    (["parallel.tensor=2", "parallel.data=3"], 4, ["parallel.data=3", "world size 4"]),
    (["parallel.tensor=3"], 4, ["world size 4", "parallel.tensor", "3"]),
    (["parallel.sequence_parallel=true"], 1, ["parallel.sequence_parallel", "parallel.tensor"]),
    (["model.fp8=hybrid"], 1, ["model.fp8='hybrid'", "transformer_engine"]),
    (["model.fp8=e5m2"], 1, ["model.fp8='e5m2'"]),
    (["model.transformer_impl=te"], 1, ["model.transformer_impl='te'"]),
    (["model.fused_output_loss=true", "model.fused_output_chunk_mib=-1"], 1,
     ["model.fused_output_chunk_mib=-1", ">= 0"]),
    (["model.fused_output_chunk_mib=256"], 1,
     ["model.fused_output_chunk_mib=256", "model.fused_output_loss=true"]),
    (["parallel.recompute=some"], 1, ["parallel.recompute='some'", "selective"]),
    (["parallel.grad_reduce_in_bf16=true"], 1,
     ["parallel.grad_reduce_in_bf16=true needs model.bf16=true"]),
    (["parallel.moe_a2a_overlap=true"], 1,
     ["parallel.moe_a2a_overlap=true needs parallel.expert > 1 (got 1 and a dense model)",
      "parallel.moe_a2a_overlap=true needs model.transformer_impl='transformer_engine'",
      "parallel.moe_a2a_overlap=true needs model.bf16=true"]),
    (["model.preset=tiny-moe", "parallel.expert=2", "model.transformer_impl=transformer_engine",
      "model.bf16=true", "parallel.moe_a2a_overlap=true", "model.moe_token_dispatcher=allgather",
      "parallel.recompute=full", "model.fused_output_loss=true"], 2,
     ["needs model.moe_token_dispatcher='alltoall' (got 'allgather')",
      "needs parallel.recompute other than 'full'", "needs model.fused_output_loss=false"]),
    (["model.preset=tiny-moe", "parallel.expert=2", "model.transformer_impl=transformer_engine",
      "model.bf16=true", "parallel.moe_a2a_overlap=true", "parallel.recompute=selective",
      "parallel.recompute_modules=[moe]", "parallel.pipeline=2"], 4,
     ["needs parallel.recompute_modules without 'moe'",
      "needs parallel.virtual_pipeline > 1 with parallel.pipeline=2"]),
    (["parallel.recompute=full", "parallel.recompute_num_layers=5"], 1,
     ["parallel.recompute_num_layers=5"]),
    (["train.min_lr=1"], 1, ["train.min_lr=1", "train.lr"]),
    (["train.token_budget=1000"], 1, ["train.steps=10", "train.token_budget=1000"]),
    (["train.lr_warmup_steps=20"], 1, ["train.lr_warmup_steps=20", "10"]),
    (["train.loss_schedule={gamma: {start: 0, end: 1}}"], 1,
     ["train.loss_schedule.gamma", "lambda_tail"]),
    (["train.loss_schedule={lambda_tal: {start: 0, end: 1}}"], 1,
     ["train.loss_schedule.lambda_tal", "train.loss_schedule.lambda_tail"]),
    (["train.loss_schedule={beta: {start: 0, end: -0.25, begin_step: 9, end_step: 3}}"], 1,
     ["train.loss_schedule.beta", "begin_step=9", "end_step=3"]),
    (["train.loss_schedule={topk: {start: 0, end: 10}}"], 1, ["train.loss_schedule.topk"]),
])
def test_validation_errors_name_field_and_value(overrides, world_size, expected):
    message = error_of(*overrides, world_size=world_size)
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_all_errors_reported_at_once():
    message = error_of("parallel.tensor=3", "train.min_lr=1", "model.fp8=hybrid", world_size=3)
    assert "parallel.tensor=3" in message and "train.min_lr=1" in message and "model.fp8" in message


def test_real_presets_valid_at_scale():
    # dense-4b at TP=8 on 512 GPUs with the paper's batch: 16M tokens = 4096 sequences of 4096.
    config = validate_config(load_config(None, [
        "model.preset=dense-4b", "parallel.tensor=8", "data.seq_length=4096",
        "train.global_batch_tokens=16777216", "train.token_budget=500e9"]), world_size=512)
    assert config.parallel.data == 64 and config.train.steps == 29803
    moe = validate_config(load_config(None, [
        "model.preset=moe-20b-a1b", "parallel.tensor=2", "parallel.expert=16",
        "parallel.sequence_parallel=true", "data.seq_length=4096",
        "train.global_batch_tokens=16777216", "train.steps=3000"]), world_size=256)
    assert moe.parallel.data == 128


# ---------------------------------------------------------------------------- help
def test_help_lists_every_field_with_default_and_doc():
    text = config_help()
    assert "loss.beta (float, default 0.0)" in text
    assert "Global entropy knob" in text  # ShapedLossConfig's own field docstring
    assert "train.global_batch_tokens (int, default 16777216)" in text
    assert "parallel.tensor (int, default 1)" in text and "Tensor-parallel size" in text
    assert "data.seq_length (int, default 2048)" in text  # DataConfig's docstring
    assert "Tokens per sample" in text
    for section in ("model", "loss", "data", "parallel", "train", "checkpoint", "logging"):
        assert f"\n{section}:" in "\n" + text
    # every leaf field of every section has an entry with a description
    import dataclasses
    from megatron_ntp.config import Config
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            entry = f"  {section.name}.{f.name} ("
            assert entry in text, entry
            following = text.split(entry, 1)[1].split("\n")[1]
            assert following.startswith("      ") and following.strip(), f"{entry} has no doc"


def test_interleaved_pipeline_needs_whole_microbatch_groups():
    # world 2 = PP 2 x DP 1; 64-token sequences: 512 tokens = 8 micro-batches, 320 = 5
    assert valid("parallel.pipeline=2", "parallel.virtual_pipeline=2", world_size=2)
    assert valid("parallel.pipeline=2", "train.global_batch_tokens=320", world_size=2)  # 1F1B
    message = error_of("parallel.pipeline=2", "parallel.virtual_pipeline=2",
                       "train.global_batch_tokens=320", world_size=2)
    assert "parallel.virtual_pipeline=2" in message and "(5 =" in message
    assert "parallel.pipeline=2" in message


def test_fp8_and_transformer_engine_rejected_on_cpu(monkeypatch):
    import torch

    from megatron_ntp.config import check_environment

    check_environment(valid())  # local layers: nothing needed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        check_environment(valid("model.transformer_impl=transformer_engine", "model.fp8=hybrid"))
    assert "model.fp8='hybrid'" in str(info.value) and "CUDA" in str(info.value)
    with pytest.raises(ConfigError, match="model.transformer_impl='transformer_engine'"):
        check_environment(valid("model.transformer_impl=transformer_engine"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU without TE
    with pytest.raises(ConfigError, match="Transformer Engine"):
        check_environment(valid("model.transformer_impl=transformer_engine"))


def test_dump_round_trip(tmp_path):
    from megatron_ntp.config import dump_yaml

    config = valid("loss.beta=-0.25", "loss.topk=100", "data.blend=[1, a, 3, b]",
                   "train.loss_schedule={lambda_tail: {start: 0, end: -0.1, end_step: 5}}")
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(config))
    assert validate_config(load_config(path)) == config


def test_a_schedule_longer_than_the_run_says_what_to_change():
    """`train.steps=20` on tiny_dense.yaml (10 warmup + 20 decay steps): the error names both
    fields, the run's length and the three ways out."""
    with pytest.raises(ConfigError) as error:
        validate_config(load_config("examples/configs/tiny_dense.yaml", ["train.steps=20"]))
    assert ("train.lr_warmup_steps=10 + train.lr_decay_steps=20 exceed the 20 training steps: "
            "lower train.lr_warmup_steps or train.lr_decay_steps, or raise train.steps"
            ) in str(error.value)
    validate_config(load_config("examples/configs/tiny_dense.yaml", ["train.steps=30"]))
