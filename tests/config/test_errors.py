"""Config errors: every problem of a file and its overrides at once, each with where its key was
set (file:line, or the override); YAML syntax errors as one line with exit 2; cross-field errors
located the same way, each saying what to change."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

from megatron_ntp.cli import main
from megatron_ntp.config import ConfigError, load_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "examples/configs/tiny_dense.yaml"


def write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def problems_of(path=None, overrides=(), validate=False, world_size=None) -> list[str]:
    """The lines of the one ConfigError raised (its header dropped)."""
    with pytest.raises(ConfigError) as info:
        config = load_config(path, list(overrides))
        if validate:
            validate_config(config, world_size=world_size)
    lines = str(info.value).split("\n")
    assert lines[0] == "invalid config:", lines
    return [line.removeprefix("  ") for line in lines[1:]]


# ---------------------------------------------------------------------------- file and overrides
def test_every_problem_of_a_file_reported_at_once_with_its_line(tmp_path, capsys):
    path = write(tmp_path, """
        model:
          preset: tiny-dense
        loss:
          beta: .nan
          topk: -3
        train:
          lrr: 1.0e-3
          steps: ten
    """)
    expected = [f"{path}:4: loss.beta must be finite, got nan",
                f"{path}:5: loss.topk must be >= 0, got -3",  # the same section's own check
                f"{path}:7: unknown key 'train.lrr' (did you mean 'train.lr'?)",
                f"{path}:8: train.steps: expected an integer, got 'ten'"]
    assert problems_of(path) == expected
    assert main(["plan", "--config", path]) == 2  # one run of the command reports them all
    assert capsys.readouterr().err == "megatron-ntp plan: invalid config:\n" + "".join(
        f"  {line}\n" for line in expected)


def test_override_problems_name_the_override(tmp_path):
    path = write(tmp_path, """
        train:
          steps: ten
          lr: 1.0e-3
    """)
    assert problems_of(path, ["train.steps=eleven", "loss.bta=1", "parallel.tensor=two",
                              "train.lr=[1", "trian.lr=1", "loss.beta", "train.lr.x=1"]) == [
        "override 'train.lr=[1': cannot parse the value '[1': expected ',' or ']', but got "
        "'<stream end>' (while parsing a flow sequence)",
        "override 'loss.beta' is not of the form section.field=value",
        "override 'train.lr.x=1': train.lr is a value (0.001), not a section: cannot set "
        "train.lr.x",
        # the override replaced the file's value (line 2): the override is named, not the file
        "override 'train.steps=eleven': train.steps: expected an integer, got 'eleven'",
        "override 'loss.bta=1': unknown key 'loss.bta' (did you mean 'loss.beta'?)",
        "override 'parallel.tensor=two': parallel.tensor: expected an integer, got 'two'",
        "override 'trian.lr=1': unknown key 'trian' (did you mean 'train'?)",
    ]


def test_items_and_nested_keys_have_their_own_lines(tmp_path):
    path = write(tmp_path, """
        parallel:
          recompute: selective
          recompute_modules:
            - mlp
            - core_attention
        train:
          loss_schedule:
            beta: {start: 0, end: x}
            lambda_tail:
              start: 0
        data:
          blend: [1, a, 2]
        model:
          preset: dense-2b
    """)
    choices, *lines, presets = problems_of(path)
    assert choices.startswith(f"{path}:5: parallel.recompute_modules[1]='core_attention' must "
                              f"be one of 'core_attn', 'mlp'")
    assert lines == [
        f"{path}:8: train.loss_schedule.beta.end: expected a number, got 'x'",
        f"{path}:9: train.loss_schedule.lambda_tail: missing train.loss_schedule.lambda_tail.end",
        f"{path}:12: data.blend must alternate weight and prefix, got an odd number of words "
        f"(3): '1 a 2'"]
    assert presets.startswith(f"{path}:14: model.preset: unknown preset 'dense-2b' (did you "
                              f"mean 'dense-")


def test_a_key_given_twice_is_reported_with_both_lines(tmp_path):
    path = write(tmp_path, """
        train:
          lr: 1.0e-3
          steps: 10
          lr: 2.0e-3
    """)
    assert problems_of(path) == [f"{path}:4: duplicate key 'train.lr' (also on line 2; YAML "
                                 f"would keep the last silently)"]


# ---------------------------------------------------------------------------- YAML syntax
BROKEN = """
    model:
      preset: tiny-dense
    train:
      lr: 1.0e-3
       steps: 10
"""


def test_a_yaml_syntax_error_is_one_line_with_exit_2(tmp_path):
    """Through the real command: one line `file:line:col: problem` (PyYAML counts from 0, the
    line and column here from 1), exit 2, no traceback."""
    path = write(tmp_path, BROKEN)
    result = subprocess.run([sys.executable, "-m", "megatron_ntp.cli", "train", "--config", path,
                             f"logging.run_dir={tmp_path}/run"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"megatron-ntp train: {path}:5:9: mapping values are not allowed "
                             f"here\n")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("command", [
    ["plan"], ["eval"], ["submit", "--nodes", "1", "--gpus-per-node", "2", "--dry-run"]])
def test_every_config_command_reports_a_syntax_error_alike(tmp_path, capsys, command):
    path = write(tmp_path, BROKEN)
    assert main(command + ["--config", path]) == 2
    assert capsys.readouterr().err == (f"megatron-ntp {command[0]}: {path}:5:9: mapping values "
                                       f"are not allowed here\n")


@pytest.mark.parametrize("text, expected", [
    ("train: {lr: 1.0e-3\nparallel:\n  tensor: 2\n",
     "2:9: expected ',' or '}', but got ':' (while parsing a flow mapping on line 1)"),
    ("train:\n\tlr: 1\n", "2:1: found character '\\t' that cannot start any token (while "
                          "scanning for the next token)"),
    ("- a\n- b\n", "1: the top level must be a mapping of sections, got ['a', 'b']"),
    ("a: &x [1, *x]\n", "1: nested more than 50 levels deep"),
])
def test_malformed_files_are_one_line_with_their_place(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:{expected}"


def test_a_sweep_spec_syntax_error_is_one_line(tmp_path, capsys):
    path = write(tmp_path, "name: s\nroot: [runs\n", "spec.yaml")
    assert main(["sweep", "plan", path, "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        f"megatron-ntp sweep plan: {path}:3:1: expected ',' or ']', but got '<stream end>' "
        f"(while parsing a flow sequence on line 2)\n")


# ---------------------------------------------------------------------------- cross-field
def test_cross_field_errors_are_located_where_their_first_field_was_set():
    """The README's first one-process command as it was (train.steps=20 on tiny_dense.yaml):
    the schedule's line in the file, and what to change."""
    assert problems_of(TINY, ["train.steps=20"], validate=True) == [
        f"{TINY}:20: train.lr_warmup_steps=10 + train.lr_decay_steps=20 exceed the 20 training "
        f"steps: lower train.lr_warmup_steps or train.lr_decay_steps, or raise train.steps"]
    assert problems_of(TINY, ["parallel.tensor=3"], validate=True) == [
        "override 'parallel.tensor=3': parallel.tensor=3 must divide "
        "model.num_attention_heads=4 and model.num_query_groups=2: use one of 1, 2 (the sizes "
        "that divide model.num_attention_heads, model.num_query_groups, model.ffn_hidden_size)"]
    # fields at their default or the preset's value have no place: the first field named that
    # has one is the run's length, from the command line
    assert problems_of(None, ["model.preset=tiny-dense", "train.steps=20"], validate=True) == [
        "override 'train.steps=20': train.lr_warmup_steps=2000 + train.lr_decay_steps=0 exceed "
        "the 20 training steps: lower train.lr_warmup_steps or train.lr_decay_steps, or raise "
        "train.steps"]
    # a config made in code has no places: the message stands alone
    made = dataclasses.replace(load_config(None, ["model.preset=tiny-dense", "train.steps=20"]))
    with pytest.raises(ConfigError) as info:
        validate_config(made)
    assert str(info.value) == (
        "invalid config:\n  train.lr_warmup_steps=2000 + train.lr_decay_steps=0 exceed the 20 "
        "training steps: lower train.lr_warmup_steps or train.lr_decay_steps, or raise "
        "train.steps")


BASE = ["model.preset=tiny-dense", "data.seq_length=64", "train.steps=10",
        "train.lr_warmup_steps=2", "train.global_batch_tokens=512"]
MOE = ["model.preset=tiny-moe"]


@pytest.mark.parametrize("overrides, world_size, error, hint", [
    (["parallel.tensor=3"], 4, "world size 4 must be a multiple of",
     ": launch a multiple of 3 ranks, or choose parallel.tensor and parallel.pipeline whose "
     "product divides 4"),
    (["parallel.tensor=2", "parallel.data=3"], 4, "parallel.data=3 disagrees",
     ": set parallel.data=2 (or 0: derived from the world size), or launch 6 ranks"),
    (["model.num_query_groups=3"], 1, "model.num_query_groups=3 must divide",
     ": use one of 1, 2, 4"),
    (MOE + ["model.moe_router_topk=9"], 1, "model.moe_router_topk=9 must be <=",
     ": lower model.moe_router_topk or raise model.num_experts"),
    (["model.fp8=hybrid"], 1, "model.fp8='hybrid' needs", "; otherwise set model.fp8=null"),
    (["model.fused_output_chunk_mib=256"], 1, "model.fused_output_chunk_mib=256 needs",
     "; otherwise set model.fused_output_chunk_mib=0"),
    (["parallel.tensor=4"], 4, "parallel.tensor=4 must divide model.num_query_groups=2",
     ": use one of 1, 2 (the sizes that divide"),
    (["parallel.pipeline=3"], 3, "model.num_layers=4 must be a multiple",
     ": choose a product among 1, 2, 4"),
    (["parallel.virtual_pipeline=2"], 1, "parallel.virtual_pipeline=2 needs parallel.pipeline",
     "; otherwise set parallel.virtual_pipeline=1"),
    (["parallel.expert=2"], 2, "need an MoE model",
     ": set parallel.expert=1 and parallel.expert_tensor=1, or use an MoE model"),
    (MOE + ["parallel.expert=3"], 3, "parallel.expert=3 must divide model.num_experts=8",
     ": use one of 1, 2, 4, 8"),
    (MOE + ["parallel.expert=4"], 2, "parallel.expert * parallel.expert_tensor = 4 * 1",
     ": lower parallel.expert or parallel.expert_tensor, or launch more data-parallel ranks"),
    (MOE + ["parallel.expert=1", "parallel.expert_tensor=3"], 3,
     "parallel.expert_tensor=3 must divide model.moe_ffn_hidden_size=128",
     ": use one of 1, 2, 4, 8, 16, 32, 64"),
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs",
     "; otherwise set parallel.sequence_parallel=false"),
    (MOE + ["parallel.expert=2", "parallel.tensor=2"], 2, "parallel.expert=2 with parallel.tensor",
     " (or parallel.tensor=1)"),
    (["parallel.grad_reduce_in_bf16=true"], 1, "parallel.grad_reduce_in_bf16=true needs",
     "; otherwise set parallel.grad_reduce_in_bf16=false"),
    (["parallel.recompute=full", "parallel.recompute_num_layers=5"], 1,
     "parallel.recompute_num_layers=5 must be between 1 and the layers per pipeline chunk",
     "(4 = model.num_layers / (parallel.pipeline * parallel.virtual_pipeline))"),
    (["parallel.recompute_modules=[mlp]"], 1, "needs parallel.recompute='selective'",
     "; otherwise set parallel.recompute_modules=null"),
    (["parallel.recompute=selective", "parallel.recompute_modules=[moe]"], 1,
     "['moe'] need an MoE model", ": remove them from parallel.recompute_modules"),
    (MOE + ["parallel.recompute=selective", "parallel.recompute_modules=[moe_act]"], 1,
     "'moe_act' needs", "; otherwise remove it from parallel.recompute_modules"),
    (["train.min_lr=1"], 1, "train.min_lr=1.0 must be between 0 and train.lr",
     ": lower train.min_lr or raise train.lr"),
    (["train.global_batch_tokens=500"], 1, "train.global_batch_tokens=500 must be a multiple",
     ": e.g. train.global_batch_tokens=448 or 512, or change train.micro_batch_size or "
     "data.seq_length"),
    (["train.global_batch_tokens=32"], 1, "train.global_batch_tokens=32 must be a multiple",
     ": e.g. train.global_batch_tokens=64, or change"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.global_batch_tokens=320"], 2,
     "parallel.virtual_pipeline=2 needs the micro-batches per step (5 =",
     ": e.g. train.global_batch_tokens=256 or 384"),
    (["train.token_budget=1000"], 1, "set train.steps=10 or train.token_budget=1000, not both",
     " (the other to 0)"),
])
def test_each_cross_field_error_says_what_to_change(overrides, world_size, error, hint):
    lines = problems_of(None, BASE + overrides, validate=True, world_size=world_size)
    line = next((line for line in lines if error in line), None)
    assert line is not None, lines
    assert hint in line.split(error, 1)[1], line


def test_machine_checks_say_what_to_change():
    from types import SimpleNamespace

    from megatron_ntp.config.validate import expert_overlap_problem, fp8_support_problem

    mxfp8 = SimpleNamespace(fp8="e4m3", fp8_recipe="mxfp8")
    assert fp8_support_problem(mxfp8, (9, 0), "H100", "2.8.0", "12.9").endswith(
        "H100 has 9.0: use model.fp8_recipe='delayed' or 'tensorwise' or 'blockwise' (these run "
        "here), or model.fp8=null")
    delayed = SimpleNamespace(fp8="e4m3", fp8_recipe="delayed")
    assert fp8_support_problem(delayed, (8, 0), "A100", "2.8.0", "12.9").endswith(
        "A100 has 8.0: use model.fp8=null")  # no recipe runs without FP8 tensor cores
    assert fp8_support_problem(delayed, (9, 0), "H100", "2.8.0", "12.9") is None
    assert expert_overlap_problem("2.2.0", None).endswith(
        ": upgrade it, or set parallel.moe_a2a_overlap=false")
