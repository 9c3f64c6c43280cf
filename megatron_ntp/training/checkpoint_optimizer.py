"""Optimizer state across checkpoints: what must match, and the param-group bookkeeping.

megatron-core's optimizers load their own sharded state; what is left to the trainer is
(1) refusing state that cannot map onto this run's optimizer, with an error naming the setting,
and (2) param-group hyperparameters: torch's load_state_dict takes every param-group entry from
the checkpoint, but the learning-rate schedule (max_lr, min_lr, ...) of this run's config must
win (a mid-training phase or an extended run has its own).
"""

from megatron_ntp.config import Config, ConfigError


# What tells param groups apart structurally (which parameters they hold); megatron-core also
# identifies them by their schedule settings (optimizer.py param_group_identifier_keys).
_GROUP_STRUCTURE_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def check_optimizer_state_fits(path: str, info: dict, config: Config, optimizer) -> None:
    """The optimizer-state formats that do not convert into each other, as a clear error."""
    p = config.parallel
    fix = "keep the setting, or set checkpoint.load_optimizer=false (weights only)"
    saved = info["layout"]["distributed_optimizer"]
    if saved != p.distributed_optimizer:
        raise ConfigError(f"{path}: saved with parallel.distributed_optimizer={str(saved).lower()}"
                          f", this run has {str(p.distributed_optimizer).lower()}; {fix}")
    if info.get("bf16", config.model.bf16) != config.model.bf16:
        raise ConfigError(f"{path}: saved with model.bf16={str(info['bf16']).lower()}, this run "
                          f"has {str(config.model.bf16).lower()} (fp32 master weights differ); "
                          f"{fix}")
    saved, count = info.get("optimizers", 1), optimizer_count(optimizer)
    if saved != count:  # a ChainedOptimizer's state loads into as many sub-optimizers only
        raise ConfigError(f"{path}: its optimizer state belongs to {saved} optimizer(s), this "
                          f"layout builds {count} (megatron-core gives MoE expert parameters "
                          f"their own optimizer when parallel.expert > 1 or parallel."
                          f"expert_tensor != parallel.tensor); keep that property, or set "
                          f"checkpoint.load_optimizer=false (weights only)")


def match_schedule_keys(saved_optimizer_state, optimizer) -> None:
    """Give the checkpoint's param groups this run's schedule settings (max_lr, min_lr, ...).

    megatron-core's load_state_dict pairs saved and current param groups by
    param_group_identifier_keys, which include max_lr/min_lr/start_wd/end_wd: a mid-training
    phase (or an extended run) with another learning rate would find no matching group. Groups
    are paired here by what they hold (weight-decay/lr multipliers, expert or not) instead."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    current = {}
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            current.setdefault(tuple(group.get(k) for k in _GROUP_STRUCTURE_KEYS), group)
    for saved in _saved_param_groups(saved_optimizer_state):
        match = current.get(tuple(saved.get(k) for k in _GROUP_STRUCTURE_KEYS))
        if match is not None:
            for key in param_group_identifier_keys:
                if key not in _GROUP_STRUCTURE_KEYS and key in match:
                    saved[key] = match[key]


def _saved_param_groups(tree) -> list:
    """Every param-group dict in a loaded optimizer state (chained, fp16, distributed...)."""
    if isinstance(tree, dict):
        groups = tree.get("param_groups")
        found = list(groups) if isinstance(groups, list) else []
        return found + [g for key, value in tree.items() if key != "param_groups"
                        for g in _saved_param_groups(value)]
    if isinstance(tree, (list, tuple)):
        return [g for value in tree for g in _saved_param_groups(value)]
    return []


def param_group_settings(optimizer) -> list:
    """This run's hyperparameters of every param group (all entries but params and step)."""
    return [[{k: v for k, v in group.items() if k not in ("params", "step")}
             for group in inner.param_groups] for inner in inner_optimizers(optimizer)]


def restore_param_group_settings(optimizer, settings: list) -> None:
    """Put param_group_settings() back after a load_state_dict took the checkpoint's."""
    for inner, groups in zip(inner_optimizers(optimizer), settings, strict=True):
        for group, saved in zip(inner.param_groups, groups, strict=True):
            group.update(saved)


def optimizer_count(optimizer) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def inner_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron-core (chained) optimizer."""
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if getattr(o, "optimizer", None) is not None]
