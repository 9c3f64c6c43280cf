"""Build the config tree from YAML files and dotted command-line overrides.

    load_config("run.yaml", ["loss.beta=-0.25", "parallel.tensor=2"])

Order of precedence (last wins): dataclass defaults < the GPU defaults on a machine with CUDA
(schema.GPU_DEFAULTS) < the model preset (model.preset) < the YAML file < the overrides.
Override values are parsed as YAML ("2" is an int, "true" a bool, "[a, b]" a list, "null"
None). Unknown keys are rejected with the closest known key suggested; values are checked
against the field types. Cross-field checks are in validate.py.
"""

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from megatron_ntp.config.schema import Config, device_defaults


class ConfigError(ValueError):
    """An invalid config; the message names the field (dotted path) and the offending value."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (),
                cuda_available: bool | None = None) -> Config:
    """Config from an optional YAML file plus `key.path=value` overrides (not yet validated).
    cuda_available: whether the GPU defaults apply (default: whether CUDA is available here)."""
    tree = {}
    if path is not None:
        tree = load_yaml(path)
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(tree, key, value)
    return config_from_dict(tree, cuda_available)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        tree = yaml.safe_load(f)
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {tree!r}")
    return tree


def parse_override(text: str) -> tuple[str, object]:
    """"train.lr=3e-4" -> ("train.lr", "3e-4" parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({err})") from None
    return key, value


def set_dotted(tree: dict, key: str, value) -> None:
    """tree["a"]["b"]["c"] = value for key "a.b.c", creating mappings on the way."""
    *parents, last = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])} is a value ({child!r}), "
                              f"not a section: cannot set {key}")
        node = child
    node[last] = value


def config_from_dict(tree: dict, cuda_available: bool | None = None) -> Config:
    """The config tree from nested mappings; the model preset is applied first, and below it
    the GPU defaults when cuda_available (default: whether CUDA is available here)."""
    tree = dict(tree)
    model = tree.get("model")
    if isinstance(model, dict) and model.get("preset"):
        from megatron_ntp.models.presets import preset_fields

        try:
            base = preset_fields(model["preset"])
        except KeyError as err:
            raise ConfigError(f"model.preset: {err.args[0]}") from None
        tree["model"] = {**base, **model}
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    for section, defaults in device_defaults(cuda_available).items():
        if tree.get(section) is None or isinstance(tree[section], dict):
            tree[section] = {**defaults, **(tree.get(section) or {})}
    return build(Config, tree, "")


def build(cls, data, path: str):
    """Instantiate dataclass `cls` from mapping `data`; `path` is its dotted name for errors."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping of fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {dotted!r}{suggestion(str(key), fields, path)}")
        kwargs[key] = convert(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        # Components validate their own fields in __post_init__ (e.g. ShapedLossConfig); name
        # the section when their message does not.
        message = str(err).replace(f"{cls.__name__}.", f"{path}." if path else "")
        if path and not message.startswith(path + "."):
            message = f"{path}: {message}"
        raise ConfigError(message) from None


def suggestion(key: str, known, path: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {('%s.' % path if path else '') + close[0]!r}?)"
    return f"; known keys: {', '.join(sorted(known))}"


def convert(value, hint, path: str):
    """Check `value` against type `hint`, converting where YAML is loose (int -> float,
    "3e-4" -> float, which YAML 1.1 reads as a string)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error is the precise one
            return convert(value, options[0], path)
        for option in options:
            try:
                return convert(value, option, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {type_name(hint)}, got {value!r}")
    if origin is typing.Literal:  # a fixed choice: the field's type lists the allowed values
        if value in args and type(value) is type(args[0]):
            return value
        raise ConfigError(f"{path}={value!r} must be one of "
                          f"{', '.join(repr(a) for a in args)}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if origin is dict:
        key_type, value_type = args
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {convert(k, key_type, path): convert(v, value_type, f"{path}.{k}")
                for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_type = args[0] if args else object
        items = [convert(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 16e6 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():  # 16e6 written as a number
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML read a word such as a blend weight or split as a number
    elif hint is object or hint is typing.Any:
        return value
    raise ConfigError(f"{path}: expected {type_name(hint)}, got {value!r}")


def type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        return {"bool": "true/false", "int": "an integer", "float": "a number",
                "str": "a string"}.get(hint.__name__, hint.__name__)
    return str(hint).replace("typing.", "")


def config_to_dict(config) -> dict:
    """Plain nested mappings (for YAML dumps and logs)."""
    return dataclasses.asdict(config)


def dump_yaml(config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
