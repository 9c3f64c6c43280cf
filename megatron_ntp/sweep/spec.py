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
from dataclasses import dataclass

import yaml

from megatron_ntp.jobs.slurm import SlurmOptions, slurm_options_from_dict

# METHOD.md section 5: the paper's loss settings, usable by name in `settings`.
PAPER_SETTINGS = {
    "cross_entropy": {},
    "precision": {"loss.beta": -0.25},
    "diversity": {"loss.beta": 0.5},
    "tail_suppression": {"loss.topk": 100, "loss.lambda_tail": -0.1},
    "head_preservation": {"loss.topk": 100, "loss.lambda_topk": 0.1},
}
BUDGET_KINDS = ("tokens", "flops", "tokens_per_param")
TOP_LEVEL = ("name", "root", "base_config", "overrides", "models", "settings", "budgets",
             "schedule", "slurm")
SCHEDULE_KEYS = ("warmup_fraction", "decay_fraction")


class SpecError(ValueError):
    """An invalid sweep spec; the message names the file, the field and the value."""


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
    """Read and check a sweep spec; `root` (e.g. from the command line) replaces spec.root."""
    if not os.path.isfile(path):
        raise SpecError(f"sweep spec {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise SpecError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the top level must be a mapping, got {data!r}")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise SpecError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(TOP_LEVEL)}")
    here = os.path.dirname(os.path.abspath(path))
    name = data.get("name")
    if not isinstance(name, str) or not name or any(c in name for c in "/ \t"):
        raise SpecError(f"{path}: name must be a word without spaces or '/', got {name!r}")
    if root is None:
        if not isinstance(data.get("root"), str):
            raise SpecError(f"{path}: root (the folder of the run folders) must be a path, got "
                            f"{data.get('root')!r}")
        root = _relative(here, data["root"])
    base = data.get("base_config")
    if base is not None:
        if not isinstance(base, str):
            raise SpecError(f"{path}: base_config must be a path, got {base!r}")
        base = _relative(here, base)
        if not os.path.isfile(base):
            raise SpecError(f"{path}: base_config {base!r} does not exist")

    def preset(item):
        from megatron_ntp.models.presets import PRESETS

        if item not in PRESETS:
            raise SpecError(f"{path}: models: {item!r} is not a preset ({', '.join(PRESETS)}); "
                            f"use a mapping name -> overrides for custom shapes")
        return {"model.preset": item}

    def paper_setting(item):
        if item not in PAPER_SETTINGS:
            raise SpecError(f"{path}: settings: {item!r} is not one of the paper's settings "
                            f"({', '.join(PAPER_SETTINGS)}); use a mapping name -> overrides")
        return dict(PAPER_SETTINGS[item])

    models = _named(data.get("models"), f"{path}: models", preset)
    settings = _named(data.get("settings"), f"{path}: settings", paper_setting)
    budgets = data.get("budgets")
    if not isinstance(budgets, dict) or len(budgets) != 1 or next(iter(budgets)) not in BUDGET_KINDS:
        raise SpecError(f"{path}: budgets must have exactly one of {', '.join(BUDGET_KINDS)} "
                        f"(a list of numbers), got {budgets!r}")
    (kind, values), = budgets.items()
    if not isinstance(values, list) or not values:
        raise SpecError(f"{path}: budgets.{kind} must be a non-empty list, got {values!r}")
    parsed = []
    for v in values:
        try:
            number = float(v)  # YAML 1.1 reads 1e5 (no dot) as a string
        except (TypeError, ValueError):
            number = float("nan")
        if not number > 0 or number == float("inf"):
            raise SpecError(f"{path}: budgets.{kind} values must be positive numbers, got {v!r}")
        parsed.append(number)
    schedule = data.get("schedule") or {}
    if not isinstance(schedule, dict) or set(schedule) - set(SCHEDULE_KEYS):
        raise SpecError(f"{path}: schedule may hold {', '.join(SCHEDULE_KEYS)}, got {schedule!r}")
    for key, v in schedule.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise SpecError(f"{path}: schedule.{key} must be a fraction in [0, 1), got {v!r}")
    try:
        slurm = slurm_options_from_dict(data.get("slurm"), path)
    except ValueError as err:
        raise SpecError(str(err)) from None
    return SweepSpec(path=os.path.abspath(path), name=name, root=os.path.abspath(root),
                     base_config=base, overrides=_overrides(data.get("overrides"),
                                                            f"{path}: overrides"),
                     models=models, settings=settings, budget_kind=kind, budgets=tuple(parsed),
                     schedule=dict(schedule), slurm=slurm)
