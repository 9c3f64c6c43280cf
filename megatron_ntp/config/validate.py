"""Cross-field checks of a config, run before any process group starts.

validate_config() resolves what is derived (the data-parallel size, the step count) and
raises one ConfigError listing every problem found; each line names the fields and their
values and says what to change, so a bad launch fails in seconds on the login node instead of
minutes into a job. A config from load_config has each line prefixed with where the first
field it names was set (`run.yaml:12:` or `override 'parallel.tensor=3':`).
"""

import dataclasses
import math
from dataclasses import dataclass
import os
import types
import typing

from megatron_ntp.config.batch import BatchLayout
from megatron_ntp.config.load import ConfigError, Problems, origins_of, suggestion
from megatron_ntp.config.schema import Config
from megatron_ntp.loss import ShapedLossConfig
from megatron_ntp.models.counting import padded_vocab_size, recompute_modules



@dataclass(frozen=True)
class Fp8RecipeNeeds:
    """What one model.fp8_recipe needs of the machine."""

    capability: tuple[int, int]
    """Least compute capability: FP8 tensor cores arrive with Ada/Hopper (8.9); Transformer
    Engine's blockwise-scaled FP8 GEMM needs Hopper (9.0); MXFP8 block scaling Blackwell (10.0)."""
    transformer_engine: str
    """Least Transformer Engine version with which megatron-core 0.19 builds the recipe
    (fp8_utils.get_fp8_recipe raises otherwise, after the job has started)."""
    cuda: tuple[int, int] = (0, 0)
    """Least CUDA version of the torch build (Transformer Engine's blockwise GEMM: 12.9)."""


# megatron-core's delay_wgrad_compute (extensions/transformer_engine.py) raises below this.
EXPERT_OVERLAP_TE_VERSION = "2.3.0"
FP8_RECIPE_NEEDS = {
    "delayed": Fp8RecipeNeeds((8, 9), "1.0"),
    "tensorwise": Fp8RecipeNeeds((8, 9), "2.2.0.dev0"),
    "blockwise": Fp8RecipeNeeds((9, 0), "2.3.0.dev0", cuda=(12, 9)),
    "mxfp8": Fp8RecipeNeeds((10, 0), "2.1.0"),
}
# Loss knobs that may follow a schedule: the real-valued fields of ShapedLossConfig.
SCHEDULABLE_KNOBS = tuple(f.name for f in dataclasses.fields(ShapedLossConfig)
                          if f.type in (float, "float"))


def validate_config(config: Config, world_size: int | None = None) -> Config:
    """Check `config` and return it with derived fields filled in.

    world_size: the number of ranks (default: $WORLD_SIZE when set). It derives
    parallel.data = world_size / (tensor * pipeline) when parallel.data is 0, and must agree
    with it otherwise. Without either, the data-parallel size is taken as 1.
    """
    errors: list[str] = []
    origins = origins_of(config)  # before dataclasses.replace below makes new configs
    if world_size is None and os.environ.get("WORLD_SIZE"):
        world_size = int(os.environ["WORLD_SIZE"])
    config = _resolve_data_parallel(config, world_size, errors)
    _check_choices(config, errors)
    _check_model(config, errors)
    _check_parallel(config, errors)
    config = _check_train(config, errors)
    _check_loss_schedule(config, errors)
    _check_checkpoint(config, errors)
    if errors:
        problems = Problems(origins)
        for message in errors:
            problems.add_cross_field(message)
        problems.raise_any()
    return config


def _divisors(n: int, limit: int = 64) -> str:
    """"1, 2, 4" for n=4: the sizes that divide n (up to `limit`: larger parallel sizes or
    group counts are never what a hint should offer)."""
    return ", ".join(str(d) for d in range(1, min(n, limit) + 1) if n % d == 0)


def _near_multiples(value: int, step: int) -> str:
    """"256 or 512" for 500 and 256: the multiples of `step` on either side of `value`."""
    lower = value // step * step
    return f"{lower} or {lower + step}" if lower else str(step)


def _positive(errors, **named):
    for name, value in named.items():
        if value <= 0:
            errors.append(f"{name.replace('__', '.')}={value} must be positive")


def _check_choices(config: Config, errors):
    """Every fixed-choice field (typed Literal[...] in schema.py, the one place its values are
    listed) holds one of its values; configs built in code bypass the loader's type check."""
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for name, hint in typing.get_type_hints(type(value)).items():
            choices, values = _literal_choices(hint, getattr(value, name))
            for item in values:
                if item not in choices:
                    errors.append(f"{section.name}.{name}={item!r} must be one of "
                                  f"{', '.join(map(repr, choices))}")


def _literal_choices(hint, value) -> tuple[tuple, list]:
    """(allowed values, values to check) of a field typed Literal[...], a tuple or list of
    Literal[...], or either | None; ((), []) for other types."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return (), []
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint), [value]
    if typing.get_origin(hint) in (tuple, list):
        item = typing.get_args(hint)[0] if typing.get_args(hint) else None
        if typing.get_origin(item) is typing.Literal:
            return typing.get_args(item), list(value)
    return (), []


def _resolve_data_parallel(config: Config, world_size, errors) -> Config:
    p = config.parallel
    _positive(errors, parallel__tensor=p.tensor, parallel__pipeline=p.pipeline,
              parallel__virtual_pipeline=p.virtual_pipeline, parallel__expert=p.expert,
              parallel__expert_tensor=p.expert_tensor)
    if p.data < 0:
        errors.append(f"parallel.data={p.data} must be positive (or 0 = derived)")
    if errors:
        return config
    model_parallel = p.tensor * p.pipeline
    data = p.data
    if world_size is not None:
        if world_size % model_parallel:
            errors.append(f"world size {world_size} must be a multiple of parallel.tensor * "
                          f"parallel.pipeline = {p.tensor} * {p.pipeline} = {model_parallel}: "
                          f"launch a multiple of {model_parallel} ranks, or choose "
                          f"parallel.tensor and parallel.pipeline whose product divides "
                          f"{world_size}")
            return config
        derived = world_size // model_parallel
        if data and data != derived:
            errors.append(f"parallel.data={data} disagrees with world size {world_size} / "
                          f"(parallel.tensor * parallel.pipeline = {model_parallel}) = {derived}: "
                          f"set parallel.data={derived} (or 0: derived from the world size), or "
                          f"launch {data * model_parallel} ranks")
        data = derived
    return dataclasses.replace(config, parallel=dataclasses.replace(p, data=data or 1))


def _check_model(config: Config, errors):
    m = config.model
    _positive(errors, model__num_layers=m.num_layers, model__hidden_size=m.hidden_size,
              model__num_attention_heads=m.num_attention_heads,
              model__num_query_groups=m.num_query_groups, model__kv_channels=m.kv_channels,
              model__vocab_size=m.vocab_size,
              model__make_vocab_size_divisible_by=m.make_vocab_size_divisible_by)
    if m.num_query_groups > 0 and m.num_attention_heads % m.num_query_groups:
        errors.append(f"model.num_query_groups={m.num_query_groups} must divide "
                      f"model.num_attention_heads={m.num_attention_heads}: use one of "
                      f"{_divisors(m.num_attention_heads, m.num_attention_heads)}")
    if m.num_experts < 0:
        errors.append(f"model.num_experts={m.num_experts} must be >= 0 (0 = dense)")
    if m.num_experts > 0:
        _positive(errors, model__moe_ffn_hidden_size=m.moe_ffn_hidden_size,
                  model__moe_router_topk=m.moe_router_topk)
        if m.moe_router_topk > m.num_experts:
            errors.append(f"model.moe_router_topk={m.moe_router_topk} must be <= "
                          f"model.num_experts={m.num_experts}: lower model.moe_router_topk or "
                          f"raise model.num_experts")
    else:
        _positive(errors, model__ffn_hidden_size=m.ffn_hidden_size)
    if m.fp8 and m.transformer_impl != "transformer_engine":
        errors.append(f"model.fp8={m.fp8!r} needs model.transformer_impl='transformer_engine' "
                      f"(got {m.transformer_impl!r}); otherwise set model.fp8=null")
    _positive(errors, model__fp8_amax_history_len=m.fp8_amax_history_len)
    if m.fused_output_chunk_mib < 0:
        errors.append(f"model.fused_output_chunk_mib={m.fused_output_chunk_mib} must be >= 0 "
                      f"(0 = the device's default)")
    elif m.fused_output_chunk_mib and not m.fused_output_loss:
        errors.append(f"model.fused_output_chunk_mib={m.fused_output_chunk_mib} needs "
                      f"model.fused_output_loss=true (it sizes the fused head's chunks); "
                      f"otherwise set model.fused_output_chunk_mib=0")


def _check_parallel(config: Config, errors):
    m, p = config.model, config.parallel
    sizes = (m.num_attention_heads, m.num_query_groups, m.num_layers, m.vocab_size,
             m.make_vocab_size_divisible_by, p.tensor, p.pipeline, p.virtual_pipeline,
             p.expert, p.expert_tensor, p.data)
    if min(sizes) <= 0:  # reported already; the divisibility checks below need positive sizes
        return
    _check_tensor_split(config, errors)
    padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, p.tensor)
    if padded % p.tensor:  # holds by construction; kept as the stated invariant
        errors.append(f"parallel.tensor={p.tensor} must divide the padded vocabulary {padded}")
    chunks = p.pipeline * p.virtual_pipeline
    if m.num_layers % chunks:
        errors.append(f"model.num_layers={m.num_layers} must be a multiple of parallel.pipeline "
                      f"* parallel.virtual_pipeline = {p.pipeline} * {p.virtual_pipeline}: "
                      f"choose a product among {_divisors(m.num_layers, m.num_layers)}")
    if p.virtual_pipeline > 1 and p.pipeline == 1:
        errors.append(f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1;"
                      f" otherwise set parallel.virtual_pipeline=1")
    if p.expert > 1 or p.expert_tensor > 1:
        if m.num_experts == 0:
            errors.append(f"parallel.expert={p.expert} / parallel.expert_tensor={p.expert_tensor}"
                          f" need an MoE model (model.num_experts=0): set parallel.expert=1 and "
                          f"parallel.expert_tensor=1, or use an MoE model (e.g. "
                          f"model.preset=tiny-moe)")
        elif m.num_experts % p.expert:
            errors.append(f"parallel.expert={p.expert} must divide "
                          f"model.num_experts={m.num_experts}: use one of "
                          f"{_divisors(m.num_experts)}")
        # megatron-core forms expert groups inside each pipeline stage's tensor*data ranks.
        if (p.tensor * p.data) % (p.expert * p.expert_tensor):
            errors.append(f"parallel.expert * parallel.expert_tensor = {p.expert} * "
                          f"{p.expert_tensor} must divide parallel.tensor * parallel.data = "
                          f"{p.tensor} * {p.data}: lower parallel.expert or "
                          f"parallel.expert_tensor, or launch more data-parallel ranks")
    if m.num_experts and p.expert_tensor > 1 and m.moe_ffn_hidden_size % p.expert_tensor:
        errors.append(f"parallel.expert_tensor={p.expert_tensor} must divide "
                      f"model.moe_ffn_hidden_size={m.moe_ffn_hidden_size}: use one of "
                      f"{_divisors(m.moe_ffn_hidden_size)}")
    if p.sequence_parallel and p.tensor == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tensor > 1; otherwise set "
                      "parallel.sequence_parallel=false")
    if m.num_experts and p.expert > 1 and p.tensor > 1 and not p.sequence_parallel:
        # megatron-core asserts this in TransformerConfig.__post_init__.
        errors.append(f"parallel.expert={p.expert} with parallel.tensor={p.tensor} needs "
                      f"parallel.sequence_parallel=true (or parallel.tensor=1)")
    if p.grad_reduce_in_bf16 and not m.bf16:
        errors.append("parallel.grad_reduce_in_bf16=true needs model.bf16=true (an fp32 model's "
                      "gradients are fp32); otherwise set parallel.grad_reduce_in_bf16=false")
    _check_recompute_modules(config, errors)
    _check_expert_overlap(config, errors)
    _positive(errors, parallel__distributed_timeout_minutes=p.distributed_timeout_minutes)
    if p.recompute == "full":
        layers_per_stage = m.num_layers // chunks
        if not 1 <= p.recompute_num_layers <= layers_per_stage:
            errors.append(f"parallel.recompute_num_layers={p.recompute_num_layers} must be "
                          f"between 1 and the layers per pipeline chunk ({layers_per_stage} = "
                          f"model.num_layers / (parallel.pipeline * parallel.virtual_pipeline))")


def _check_tensor_split(config: Config, errors):
    """parallel.tensor against the sizes it splits: the heads, the query groups and (dense)
    the MLP; one error naming every size it misses and the tensor-parallel sizes that fit."""
    m, p = config.model, config.parallel
    split = {"model.num_attention_heads": m.num_attention_heads,
             "model.num_query_groups": m.num_query_groups}
    if m.num_experts == 0:
        split["model.ffn_hidden_size"] = m.ffn_hidden_size
    missed = [f"{name}={value}" for name, value in split.items() if value % p.tensor]
    if missed:
        errors.append(f"parallel.tensor={p.tensor} must divide {' and '.join(missed)}: use one "
                      f"of {_divisors(math.gcd(*split.values()))} (the sizes that divide "
                      f"{', '.join(split)})")


def _check_recompute_modules(config: Config, errors):
    m, p = config.model, config.parallel
    if p.recompute_modules is None:
        return
    if p.recompute != "selective":
        errors.append(f"parallel.recompute_modules={list(p.recompute_modules)} needs "
                      f"parallel.recompute='selective' (got {p.recompute!r}); otherwise set "
                      f"parallel.recompute_modules=null")
    moe_only = sorted({"moe", "moe_act", "shared_experts"} & set(p.recompute_modules))
    if moe_only and not m.num_experts:
        errors.append(f"parallel.recompute_modules {moe_only} need an MoE model "
                      f"(model.num_experts=0): remove them from parallel.recompute_modules")
    if "moe_act" in p.recompute_modules and m.transformer_impl != "transformer_engine":
        # megatron-core supports it only with grouped GEMM, which needs Transformer Engine
        errors.append("parallel.recompute_modules 'moe_act' needs "
                      "model.transformer_impl='transformer_engine' (grouped GEMM); otherwise "
                      "remove it from parallel.recompute_modules")


def _check_expert_overlap(config: Config, errors):
    """parallel.moe_a2a_overlap against what megatron-core's combined 1F1B schedule asserts
    (TransformerConfig.__post_init__, at model build) and what this project's step supports."""
    m, p = config.model, config.parallel
    if not p.moe_a2a_overlap:
        return
    needs = []
    if not m.num_experts or p.expert == 1:
        needs.append(f"parallel.expert > 1 (got {p.expert}"
                     f"{'' if m.num_experts else ' and a dense model'})")
    if m.transformer_impl != "transformer_engine":
        needs.append("model.transformer_impl='transformer_engine' (the delayed weight gradients "
                     f"are Transformer Engine's; got {m.transformer_impl!r})")
    if not m.bf16:
        needs.append("model.bf16=true")
    if m.moe_token_dispatcher != "alltoall":
        needs.append(f"model.moe_token_dispatcher='alltoall' (got {m.moe_token_dispatcher!r})")
    if p.recompute == "full":
        needs.append("parallel.recompute other than 'full'")
    if "moe" in recompute_modules(m, p):
        needs.append("parallel.recompute_modules without 'moe'")
    if p.pipeline > 1 and p.virtual_pipeline == 1:
        needs.append(f"parallel.virtual_pipeline > 1 with parallel.pipeline={p.pipeline}")
    if m.fused_output_loss:
        needs.append("model.fused_output_loss=false (the combined schedule runs megatron-core's "
                     "own output layer)")
    # Each need names its own fix; parallel.moe_a2a_overlap=false is the way out of all.
    errors.extend(f"parallel.moe_a2a_overlap=true needs {need}" for need in needs)


def _check_train(config: Config, errors) -> Config:
    t, p = config.train, config.parallel
    seq = config.data.seq_length
    _positive(errors, train__lr=t.lr, train__global_batch_tokens=t.global_batch_tokens,
              train__micro_batch_size=t.micro_batch_size)
    if t.min_lr < 0 or t.min_lr > t.lr:
        errors.append(f"train.min_lr={t.min_lr} must be between 0 and train.lr={t.lr}"
                      + (": lower train.min_lr or raise train.lr" if t.min_lr > 0 else ""))
    for name in ("lr_warmup_steps", "lr_decay_steps", "steps", "token_budget", "eval_interval",
                 "eval_steps", "clip_grad", "weight_decay"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name}={getattr(t, name)} must be >= 0")
    if min(t.global_batch_tokens, t.micro_batch_size, p.data) <= 0:
        return config  # reported already
    layout = BatchLayout(config)
    if t.global_batch_tokens % layout.tokens_per_round:
        errors.append(
            f"train.global_batch_tokens={t.global_batch_tokens} must be a multiple of "
            f"train.micro_batch_size * data.seq_length * parallel.data = {t.micro_batch_size} * "
            f"{seq} * {p.data} = {layout.tokens_per_round}: e.g. train.global_batch_tokens="
            f"{_near_multiples(t.global_batch_tokens, layout.tokens_per_round)}, or change "
            f"train.micro_batch_size or data.seq_length")
    elif p.virtual_pipeline > 1:
        # pipeline_parallel/schedules.py forward_backward_pipelining_with_interleaving groups
        # micro-batches by `pipeline` per model chunk and rejects a partial last group.
        if layout.num_microbatches % p.pipeline:
            whole_groups = _near_multiples(t.global_batch_tokens,
                                           layout.tokens_per_round * p.pipeline)
            errors.append(f"parallel.virtual_pipeline={p.virtual_pipeline} needs the "
                          f"micro-batches per step ({layout.num_microbatches} = "
                          f"train.global_batch_tokens / {layout.tokens_per_round}) to be a "
                          f"multiple of parallel.pipeline={p.pipeline}: e.g. "
                          f"train.global_batch_tokens={whole_groups}")
    steps = t.steps
    if t.steps and t.token_budget:
        errors.append(f"set train.steps={t.steps} or train.token_budget={t.token_budget}, "
                      f"not both (the other to 0)")
    elif not t.steps and t.token_budget:
        steps = math.ceil(t.token_budget / t.global_batch_tokens)
    if steps and t.lr_warmup_steps + t.lr_decay_steps > steps:
        errors.append(f"train.lr_warmup_steps={t.lr_warmup_steps} + train.lr_decay_steps="
                      f"{t.lr_decay_steps} exceed the {steps} training steps: lower "
                      f"train.lr_warmup_steps or train.lr_decay_steps, or raise train.steps")
    return dataclasses.replace(config, train=dataclasses.replace(t, steps=steps))


def _check_loss_schedule(config: Config, errors):
    for knob, ramp in config.train.loss_schedule.items():
        path = f"train.loss_schedule.{knob}"
        if knob not in SCHEDULABLE_KNOBS:
            hint = suggestion(knob, SCHEDULABLE_KNOBS, "train.loss_schedule")
            errors.append(f"unknown loss knob {path!r}{hint}")
            continue
        if ramp.begin_step < 0 or ramp.end_step < ramp.begin_step:
            errors.append(f"{path}: need 0 <= begin_step <= end_step, got begin_step="
                          f"{ramp.begin_step}, end_step={ramp.end_step}")
        for end in ("start", "end"):
            try:
                dataclasses.replace(config.loss, **{knob: getattr(ramp, end)})
            except ValueError as err:
                errors.append(f"{path}.{end}={getattr(ramp, end)!r}: {err}")


def _check_checkpoint(config: Config, errors):
    c = config.checkpoint
    if c.save_interval < 1:
        errors.append(f"checkpoint.save_interval={c.save_interval} must be >= 1")
    if c.keep_last < 1:
        errors.append(f"checkpoint.keep_last={c.keep_last} must be >= 1 (the newest checkpoint "
                      f"is always kept)")
    if c.finetune and not c.load_dir:
        errors.append("checkpoint.finetune=true needs checkpoint.load_dir (the checkpoint whose "
                      "weights start the new phase)")
    if c.finetune and c.save_dir and os.path.abspath(c.load_dir) == os.path.abspath(c.save_dir):
        errors.append(f"checkpoint.finetune=true with checkpoint.load_dir == checkpoint.save_dir "
                      f"({c.save_dir!r}): save the new phase elsewhere, otherwise a restart could "
                      f"not tell its own checkpoints from the ones it started from")


def check_environment(config: Config) -> None:
    """Check that this machine can run `config`'s layers; raise ConfigError naming the field.

    Separate from validate_config because `plan` describes GPU layouts from any machine; the
    training program calls this before starting any process group.
    """
    import torch

    m = config.model
    wanted = [f"model.transformer_impl={m.transformer_impl!r}"] if m.transformer_impl == \
        "transformer_engine" else []
    if m.fp8:
        wanted.insert(0, f"model.fp8={m.fp8!r}")
    if config.parallel.moe_a2a_overlap:
        wanted.insert(0, "parallel.moe_a2a_overlap=true")
    if not wanted:
        return
    needs = " and ".join(wanted)
    if not torch.cuda.is_available():
        raise ConfigError(f"{needs} needs a CUDA GPU, and none is available here; use "
                          f"model.transformer_impl='local' without model.fp8 on CPU")
    try:
        import transformer_engine  # noqa: F401
    except Exception as err:  # ImportError, or OSError when libcuda is missing
        raise ConfigError(f"{needs} needs Transformer Engine, which cannot be imported "
                          f"({type(err).__name__}: {err}); install it, or use "
                          f"model.transformer_impl='local' without model.fp8") from None
    if m.fp8:
        problem = fp8_support_problem(
            m, tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name(),
            transformer_engine_version(), torch.version.cuda)
        if problem:
            raise ConfigError(problem)
    if config.parallel.moe_a2a_overlap:
        problem = expert_overlap_problem(transformer_engine_version(),
                                         os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
        if problem:
            raise ConfigError(problem)


def cuda_device_max_connections(config: Config) -> str:
    """CUDA_DEVICE_MAX_CONNECTIONS for a run of `config` where the environment does not set it
    (the training program sets it before CUDA starts): 32 with parallel.moe_a2a_overlap (the
    expert all-to-all runs on its own stream beside the computation, as megatron-core's MoE
    guide asks), else 1 (tensor/sequence-parallel communication issued in order with the
    computation, as Megatron-LM's scripts set)."""
    return "32" if config.parallel.moe_a2a_overlap else "1"


def expert_overlap_problem(te_version: str, max_connections: str | None) -> str | None:
    """Why parallel.moe_a2a_overlap cannot overlap here (None if it can)."""
    from packaging.version import Version

    if Version(te_version) < Version(EXPERT_OVERLAP_TE_VERSION):
        return (f"parallel.moe_a2a_overlap=true needs Transformer Engine >= "
                f"{EXPERT_OVERLAP_TE_VERSION} (delay_wgrad_compute); {te_version} is installed: "
                f"upgrade it, or set parallel.moe_a2a_overlap=false")
    if max_connections == "1":
        # One hardware queue runs the all-to-all and the computation one after the other
        # (set so by hand: the trainer's own default for this config is 32).
        return ("parallel.moe_a2a_overlap=true needs CUDA_DEVICE_MAX_CONNECTIONS > 1 (it is 1: "
                "one hardware queue serialises the all-to-all and the computation); launch with "
                "CUDA_DEVICE_MAX_CONNECTIONS=32, or set parallel.moe_a2a_overlap=false")
    return None


def transformer_engine_version() -> str:
    """The installed Transformer Engine's version (its __version__, else the package's)."""
    import importlib.metadata

    import transformer_engine

    version = getattr(transformer_engine, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("transformer-engine")
        except importlib.metadata.PackageNotFoundError:
            version = "0"
    return str(version)


def fp8_support_problem(m, capability: tuple[int, int], device_name: str, te_version: str,
                        cuda_version: str | None) -> str | None:
    """Why model m's FP8 recipe cannot run on this GPU and software (None if it can), with the
    recipes that can: checked before any process group starts; otherwise it fails inside
    Transformer Engine or megatron-core at the first forward, after the whole job has started."""
    machine = (capability, device_name, te_version, cuda_version)
    problem = _fp8_recipe_problem(m.fp8_recipe, *machine)
    if problem is None:
        return None
    runs_here = [repr(r) for r in FP8_RECIPE_NEEDS if _fp8_recipe_problem(r, *machine) is None]
    other = f"model.fp8_recipe={' or '.join(runs_here)} (these run here), or " if runs_here \
        else ""
    return (f"model.fp8={m.fp8!r} with model.fp8_recipe={m.fp8_recipe!r} needs {problem}: use "
            f"{other}model.fp8=null")


def _fp8_recipe_problem(recipe: str, capability: tuple[int, int], device_name: str,
                        te_version: str, cuda_version: str | None) -> str | None:
    """What FP8 recipe `recipe` needs that this machine lacks (None if nothing)."""
    from packaging.version import Version

    needs = FP8_RECIPE_NEEDS[recipe]
    if tuple(capability) < needs.capability:
        return (f"a GPU of compute capability >= {needs.capability[0]}.{needs.capability[1]}; "
                f"{device_name} has {capability[0]}.{capability[1]}")
    if Version(te_version) < Version(needs.transformer_engine):
        return f"Transformer Engine >= {needs.transformer_engine}; {te_version} is installed"
    have_cuda = tuple(int(part) for part in (cuda_version or "0.0").split(".")[:2])
    if have_cuda < needs.cuda:
        return (f"torch built with CUDA >= {needs.cuda[0]}.{needs.cuda[1]} (Transformer "
                f"Engine's blockwise FP8 GEMM); this torch has CUDA {cuda_version}")
    return None


__all__ = ["check_environment", "validate_config"]
