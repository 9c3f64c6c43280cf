"""`megatron-ntp sweep plan`: expand a sweep spec into run folders, each with its full config.

For every (model, loss setting, budget): the config is base_config < spec overrides < the
model's overrides < the setting's overrides < the run's own fields:

- train.steps = ceil(tokens / train.global_batch_tokens) (train.token_budget = 0), where
  tokens is the budget (tokens), C / FLOPs-per-token of the model (flops; FLOPs per token from
  megatron_ntp.models.counting: 6 x active matmul parameters + attention), or
  r x active parameters (tokens_per_param);
- train.lr_warmup_steps / lr_decay_steps from schedule fractions, when given;
- logging.run_dir = <root>/<run name>; checkpoint.save_dir = <run_dir>/checkpoints (or
  <checkpoint.save_dir>/<sweep name>/<run name> when the spec sets one);
  data.cache_dir = <run_dir>/data_cache unless set (concurrent jobs must not write the same
  megatron-core index cache);
- with data.blend unset, the built-in sample dataset is built once into <root>/sample_data and
  named explicitly (instead of every job building it at the same time).

Every config is validated (at the spec's world size) before anything is written. Each run folder
is written to a temporary folder and renamed into place; a folder that exists with the same
config is kept (planning is idempotent), one with a different config is an error (it may hold a
started run). <root>/sweep_manifest.json lists the runs with their parameters, tokens and FLOPs.
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile

import yaml

from megatron_ntp.config import ConfigError, validate_config
from megatron_ntp.config.load import config_from_dict, dump_yaml, load_yaml, set_dotted
from megatron_ntp.models.counting import count_params, flops_per_token
from megatron_ntp.files import write_atomic
from megatron_ntp.sweep.spec import SpecError, SweepSpec

MANIFEST = "sweep_manifest.json"
CONFIG_FILE = "config.yaml"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    name: str
    model: str
    setting: str
    budget_kind: str
    budget: float
    params_total: int
    params_active: int
    params_non_embedding: int  # active, without the embedding and output layer
    flops_per_token: int  # training (forward + backward) model FLOPs per token
    seq_length: int
    global_batch_tokens: int
    steps: int
    tokens: int
    flops: float
    beta: float
    topk: int
    lambda_topk: float
    lambda_tail: float
    config_text: str

    def manifest_entry(self) -> dict:
        entry = dataclasses.asdict(self)
        del entry["config_text"]
        entry["dir"] = self.name
        return entry


def short_number(value: float) -> str:
    """1e5 -> '1e5', 250000 -> '2.5e5', 20 -> '20' (for run names)."""
    text = f"{value:.3g}"
    return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _config(spec: SweepSpec, overrides: dict):
    tree = load_yaml(spec.base_config) if spec.base_config else {}
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    return config_from_dict(tree)


def _tokens(spec: SweepSpec, budget: float, config) -> float:
    if spec.budget_kind == "tokens":
        return budget
    if spec.budget_kind == "flops":
        return budget / flops_per_token(config.model, config.data.seq_length).model
    return budget * count_params(config.model).active


def _sample_data_overrides(root: str) -> dict:
    from megatron_ntp.training.data import ensure_sample_dataset

    prefix, model = ensure_sample_dataset(os.path.join(root, "sample_data"))
    return {"data.blend": prefix, "data.tokenizer_model": model,
            "data.tokenizer_type": "SentencePieceTokenizer"}


def plan_sweep(spec: SweepSpec, prepare_data: bool = True) -> list[PlannedRun]:
    """The runs of `spec`, validated; ConfigError listing every invalid run otherwise.
    prepare_data=False leaves data.blend unset (a dry run builds nothing)."""
    runs, errors = [], []
    data_overrides = None
    for model_name, model_overrides in spec.models.items():
        for setting_name, setting_overrides in spec.settings.items():
            for budget in spec.budgets:
                name = (f"{spec.name}-{model_name}-{setting_name}-"
                        f"{spec.budget_kind[0]}{short_number(budget)}")
                merged = {**spec.overrides, **model_overrides, **setting_overrides}
                try:
                    base = _config(spec, merged)
                    if base.data.blend is None and prepare_data:
                        if data_overrides is None:
                            data_overrides = _sample_data_overrides(spec.root)
                        merged.update(data_overrides)
                    runs.append(_plan_run(spec, name, model_name, setting_name, budget, merged))
                except (ConfigError, SpecError) as err:
                    errors.append(f"run {name}: {err}")
    if errors:
        raise ConfigError(f"{spec.path}: invalid runs:\n  " + "\n  ".join(errors))
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"{spec.path}: budgets give duplicate run names {duplicates}")
    return runs


def _plan_run(spec, name, model_name, setting_name, budget, merged) -> PlannedRun:
    config = _config(spec, merged)
    tokens = _tokens(spec, budget, config)
    gbt = config.train.global_batch_tokens
    steps = max(1, math.ceil(tokens / gbt))
    run_dir = os.path.join(spec.root, name)
    fields = {"train.steps": steps, "train.token_budget": 0, "logging.run_dir": run_dir}
    if spec.schedule.get("warmup_fraction") is not None:
        fields["train.lr_warmup_steps"] = int(round(spec.schedule["warmup_fraction"] * steps))
    if spec.schedule.get("decay_fraction") is not None:
        fields["train.lr_decay_steps"] = int(round(spec.schedule["decay_fraction"] * steps))
    save_dir = config.checkpoint.save_dir
    fields["checkpoint.save_dir"] = (os.path.join(os.path.abspath(save_dir), spec.name, name)
                                     if save_dir else os.path.join(run_dir, "checkpoints"))
    if config.data.cache_dir is None:
        fields["data.cache_dir"] = os.path.join(run_dir, "data_cache")
    config = _config(spec, {**merged, **fields})
    validate_config(config, world_size=spec.slurm.world_size)  # raises ConfigError naming fields
    counts = count_params(config.model)
    fpt = flops_per_token(config.model, config.data.seq_length).model
    loss = config.loss
    return PlannedRun(
        name=name, model=model_name, setting=setting_name, budget_kind=spec.budget_kind,
        budget=budget, params_total=counts.total, params_active=counts.active,
        params_non_embedding=counts.active_non_embedding, flops_per_token=fpt,
        seq_length=config.data.seq_length, global_batch_tokens=gbt, steps=steps,
        tokens=steps * gbt, flops=float(steps * gbt * fpt), beta=loss.beta, topk=loss.topk,
        lambda_topk=loss.lambda_topk, lambda_tail=loss.lambda_tail,
        config_text=dump_yaml(config))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def _existing_conflict(run_dir: str, config_text: str) -> str | None:
    """None when run_dir holds this config; a description of the difference otherwise."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return f"{run_dir} exists without {CONFIG_FILE}"
    with open(path) as f:
        old = yaml.safe_load(f) or {}
    new = yaml.safe_load(config_text)
    # The trainer rewrites config.yaml with derived fields resolved (parallel.data): ignore them.
    diffs = [d for d in _differences(old, new) if not d.startswith("parallel.data:")]
    return "; ".join(diffs[:5]) if diffs else None


def write_sweep(spec: SweepSpec, runs: list[PlannedRun]) -> list[str]:
    """Create the run folders and the manifest; returns the names of the folders created."""
    conflicts = []
    for run in runs:
        run_dir = os.path.join(spec.root, run.name)
        if os.path.exists(run_dir):
            diff = _existing_conflict(run_dir, run.config_text)
            if diff:
                conflicts.append(f"{run.name}: {diff}")
    manifest_path = os.path.join(spec.root, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            old_names = {r["name"] for r in json.load(f)["runs"]}
        missing = sorted(old_names - {r.name for r in runs})
        if missing:
            conflicts.append(f"{manifest_path} lists runs this spec does not plan: "
                             f"{', '.join(missing[:5])}")
    if conflicts:
        raise SpecError(f"{spec.root} already holds a different sweep (use another root, or "
                        f"remove the runs):\n  " + "\n  ".join(conflicts))
    os.makedirs(spec.root, exist_ok=True)
    created = []
    for run in runs:
        run_dir = os.path.join(spec.root, run.name)
        if os.path.exists(run_dir):
            continue
        tmp = tempfile.mkdtemp(dir=spec.root, prefix=f".tmp-{run.name}-")
        try:
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                f.write(run.config_text)
            os.rename(tmp, run_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        created.append(run.name)
    manifest = {"name": spec.name, "spec": spec.path, "root": spec.root,
                "budget_kind": spec.budget_kind,
                "slurm": dataclasses.asdict(spec.slurm),
                "runs": [r.manifest_entry() for r in runs]}
    write_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return created


def load_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise SpecError(f"{root} holds no {MANIFEST}: plan the sweep first "
                        f"(megatron-ntp sweep plan SPEC)")
    with open(path) as f:
        return json.load(f)


def format_plan_table(runs: list[PlannedRun]) -> str:
    lines = [f"{'run':<44} {'N (non-emb.)':>13} {'tokens':>10} {'steps':>7} {'FLOPs':>10}"]
    for r in runs:
        lines.append(f"{r.name:<44} {r.params_non_embedding:>13,} {r.tokens:>10.3g} "
                     f"{r.steps:>7} {r.flops:>10.3g}")
    return "\n".join(lines) + "\n"
