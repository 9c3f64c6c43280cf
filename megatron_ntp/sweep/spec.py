"""The sweep spec: a YAML file naming the grid of runs (see examples/sweeps/ and
README.md, "Sweeps", for the format).

    name: tiny-cpu                      # used in run and job names
    root: ../../runs/sweeps/tiny-cpu    # where the run folders go (relative to this file)
    base_config: ../configs/tiny_dense.yaml   # optional; relative to this file
    overrides: {train.lr: 1.0e-3}       # every run; dotted keys as on the command line
    models:                             # a list of preset names, or name -> overrides
      small: {model.num_layers: 2, model.hidden_size: 64}
      large: {model.preset: tiny-dense}
    settings:                           # a list of the paper's setting names, or name -> overrides
      cross_entropy: {}
      precision: {loss.beta: -0.25}
    budgets:                            # exactly one kind:
      tokens: [1.0e+5, 2.0e+5]          #   training tokens, or
      # flops: [1.0e+17, 1.0e+18]       #   compute: tokens = C / FLOPs-per-token of each model
      # tokens_per_param: [20]          #   tokens = r * active parameters
    schedule: {warmup_fraction: 0.05, decay_fraction: 0.2}   # optional, per run's steps
    slurm: {nodes: 1, gpus_per_node: 8, time: "04:00:00"}   # megatron_ntp.jobs.slurm.SlurmOptions
"""

import os
from dataclasses import dataclass, field

from megatron_ntp.config.load import ConfigError, build, load_yaml
from megatron_ntp.jobs.slurm import SlurmOptions
from megatron_ntp.loss.settings import PAPER_SETTINGS, config_overrides

BUDGET_KINDS = ("tokens", "flops", "tokens_per_param")


class SpecError(ValueError):
    """An invalid sweep spec; the message names the file, the field and the value."""


@dataclass(frozen=True)
class ScheduleSpec:
    """Learning-rate schedule of every run, as fractions of that run's steps."""

    warmup_fraction: float | None = None
    """train.lr_warmup_steps = round(fraction * steps); unset: the base config's."""

    decay_fraction: float | None = None
    """train.lr_decay_steps = round(fraction * steps); unset: the base config's."""


@dataclass(frozen=True)
class SpecFile:
    """The fields of a sweep spec file as written (types checked by the config loader)."""

    name: str = ""
    root: str | None = None
    base_config: str | None = None
    overrides: dict[str, object] = field(default_factory=dict)
    models: list[str] | dict[str, dict[str, object]] | None = None
    settings: list[str] | dict[str, dict[str, object]] | None = None
    budgets: dict[str, list[float]] = field(default_factory=dict)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


@dataclass(frozen=True)
class SweepSpec:
    path: str
    name: str
    root: str
    base_config: str | None
    overrides: dict
    models: dict  # name -> overrides
    settings: dict  # name -> overrides
    budget_kind: str
    budgets: tuple
    schedule: dict
    slurm: SlurmOptions


def _overrides(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and "." in k for k in value):
        raise SpecError(f"{where} must be a mapping of dotted keys to values "
                        f"(e.g. {{loss.beta: -0.25}}), got {value!r}")
    return dict(value)


def _named(value, where: str, by_name) -> dict:
    """A list of names (resolved with by_name) or a mapping name -> overrides."""
    if isinstance(value, list) and value:
        out = {}
        for item in value:
            if not isinstance(item, str):
                raise SpecError(f"{where}: list items must be names, got {item!r}")
            out[item] = by_name(item)
        return out
    if isinstance(value, dict) and value:
        return {str(k): _overrides(v, f"{where}.{k}") for k, v in value.items()}
    raise SpecError(f"{where} must be a non-empty list of names or mapping name -> overrides, "
                    f"got {value!r}")


def _relative(base_dir: str, path: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def load_spec(path: str, root: str | None = None) -> SweepSpec:
    """Read and check a sweep spec; `root` (e.g. from the command line) replaces spec.root.
    Unknown keys (with the closest known one), types and YAML 1.1 numbers are handled by the
    config loader, as for run configs; errors name the file."""
    try:
        raw = build(SpecFile, load_yaml(path), "")
    except ConfigError as err:
        message = str(err)
        raise SpecError(message if message.startswith(path) else f"{path}: {message}") from None
    here = os.path.dirname(os.path.abspath(path))
    if any(c in raw.name for c in "/ \t") or not raw.name:
        raise SpecError(f"{path}: name must be a word without spaces or '/', got {raw.name!r}")
    if root is None:
        if raw.root is None:
            raise SpecError(f"{path}: root (the folder of the run folders) must be a path")
        root = _relative(here, raw.root)
    base = _relative(here, raw.base_config) if raw.base_config is not None else None
    if base is not None and not os.path.isfile(base):
        raise SpecError(f"{path}: base_config {base!r} does not exist")
    kind, budgets = _budgets(raw.budgets, path)
    for key, value in vars(raw.schedule).items():
        if value is not None and not 0 <= value < 1:
            raise SpecError(f"{path}: schedule.{key} must be a fraction in [0, 1), got {value!r}")
    return SweepSpec(
        path=os.path.abspath(path), name=raw.name, root=os.path.abspath(root), base_config=base,
        overrides=_overrides(raw.overrides, f"{path}: overrides"),
        models=_named(raw.models, f"{path}: models", lambda item: _preset(item, path)),
        settings=_named(raw.settings, f"{path}: settings",
                        lambda item: _paper_setting(item, path)),
        budget_kind=kind, budgets=budgets,
        schedule={k: v for k, v in vars(raw.schedule).items() if v is not None},
        slurm=raw.slurm)


def _budgets(budgets: dict, path: str) -> tuple[str, tuple]:
    if len(budgets) != 1 or next(iter(budgets)) not in BUDGET_KINDS:
        raise SpecError(f"{path}: budgets must have exactly one of {', '.join(BUDGET_KINDS)} "
                        f"(a list of numbers), got {budgets!r}")
    (kind, values), = budgets.items()
    if not values:
        raise SpecError(f"{path}: budgets.{kind} must be a non-empty list, got {values!r}")
    for value in values:
        if not 0 < value < float("inf"):
            raise SpecError(f"{path}: budgets.{kind} values must be positive numbers, "
                            f"got {value:g}")
    return kind, tuple(values)


def _preset(item: str, path: str) -> dict:
    from megatron_ntp.models.presets import PRESETS

    if item not in PRESETS:
        raise SpecError(f"{path}: models: {item!r} is not a preset ({', '.join(PRESETS)}); "
                        f"use a mapping name -> overrides for custom shapes")
    return {"model.preset": item}


def _paper_setting(item: str, path: str) -> dict:
    if item not in PAPER_SETTINGS:
        raise SpecError(f"{path}: settings: {item!r} is not one of the paper's settings "
                        f"({', '.join(PAPER_SETTINGS)}); use a mapping name -> overrides")
    return config_overrides(PAPER_SETTINGS[item])  # usable by name in `settings`
