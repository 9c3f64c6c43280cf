"""Build the config tree from YAML files and dotted command-line overrides.

    load_config("run.yaml", ["loss.beta=-0.25", "parallel.tensor=2"])

Order of precedence (last wins): dataclass defaults < the GPU defaults on a machine with CUDA
(schema.GPU_DEFAULTS) < the model preset (model.preset) < the YAML file < the overrides.
Override values are parsed as YAML ("2" is an int, "true" a bool, "[a, b]" a list, "null"
None). Unknown keys are rejected with the closest known key suggested; values are checked
against the field types. Cross-field checks are in validate.py.

Every problem of a file and its overrides is reported at once, in one ConfigError, one problem
a line, each prefixed with where its key was set:

    invalid config:
      run.yaml:12: unknown key 'train.lrr' (did you mean 'train.lr'?)
      run.yaml:14: train.steps: expected an integer, got 'ten'
      override 'parallel.tensor=two': parallel.tensor: expected an integer, got 'two'

A file that is not YAML fails alone, on one line: `run.yaml:3:7: mapping values are not allowed
here`. load_config keeps where each key was set with the config (origins_of), so that
validate.py locates its cross-field errors the same way.
"""

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path

import yaml

from megatron_ntp.config.schema import Config, device_defaults

# The attribute of a loaded Config that holds where each key was set (see origins_of).
ORIGINS_ATTRIBUTE = "_config_origins"
# The sections of the tree: a dotted name that starts with one names a config field.
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
MAX_DEPTH = 50  # of nested mappings and lists in a YAML file; a config needs 4
MERGE_TAG = "tag:yaml.org,2002:merge"  # YAML's `<<: *anchor`
FIELD_NAME = re.compile(rf"\b(?:{'|'.join(SECTIONS)})(?:\.[A-Za-z_]\w*)+(?:\[\d+\])?")


class ConfigError(ValueError):
    """An invalid config; the message names the field (dotted path) and the offending value.

    `problems` holds each problem as (dotted key or None, message) so that an enclosing loader
    can report them again with where their keys were set."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.problems: list[tuple[str | None, str]] = [(key, message)]


class Problems:
    """The problems found in a config so far; `origins` maps a dotted key to where it was set
    ("run.yaml:12", "override 'train.lr=x'"), which prefixes the problems about that key."""

    def __init__(self, origins: dict[str, str] | None = None):
        self.origins = origins if origins is not None else {}
        self.found: list[tuple[str | None, str]] = []
        self.placed: dict[int, str] = {}  # index in `found` -> a place given with the problem

    def add(self, key: str | None, message: str, place: str | None = None) -> None:
        if place:
            self.placed[len(self.found)] = place
        self.found.append((key, message))

    def add_error(self, error: ConfigError) -> None:
        self.found.extend(error.problems)

    def add_cross_field(self, message: str) -> None:
        """A problem that names several fields: located where the first of them that has a
        place was set (a field left at its default or the preset's value has none)."""
        names = (match.group(0) for match in FIELD_NAME.finditer(message))
        self.add(next((name for name in names if where(self.origins, name)), None), message)

    def lines(self) -> list[str]:
        """One line per problem, `place: message`: those in a file first, by line (as an
        editor or a compiler lists them), then the others in the order found."""
        located = []
        for i, (key, message) in enumerate(self.found):
            place = self.placed.get(i) or (where(self.origins, key) if key else None)
            line = re.search(r":(\d+)$", place or "")
            order = (0, int(line.group(1)), i) if line else (1, 0, i)
            located.append((order, f"{place}: {message}" if place else message))
        return [text for _, text in sorted(located)]

    def raise_any(self, header: str | None = "invalid config") -> None:
        """Raise one ConfigError with every problem, one a line (under `header`), if any."""
        if not self.found:
            return
        lines = self.lines()
        text = f"{header}:\n  " + "\n  ".join(lines) if header else "\n".join(lines)
        error = ConfigError(text)
        error.problems = list(self.found)
        raise error


def where(origins: dict[str, str], key: str) -> str | None:
    """Where `key` was set: its own entry, else that of the field holding it (a list item, a
    schedule's knob); None for a key set nowhere (a default, a preset's value)."""
    while key not in origins:
        parent = re.sub(r"(\.[^.\[\]]*|\[\d+\])$", "", key)
        if parent == key or not re.search(r"[.\[]", parent):
            return None  # a field's section is no place for the field itself
        key = parent
    return origins[key]


def origins_of(config) -> dict[str, str]:
    """Where each dotted key of a config returned by load_config was set (empty otherwise)."""
    return getattr(config, ORIGINS_ATTRIBUTE, {})


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (),
                cuda_available: bool | None = None) -> Config:
    """Config from an optional YAML file plus `key.path=value` overrides (not yet validated).
    cuda_available: whether the GPU defaults apply (default: whether CUDA is available here).
    Raises one ConfigError with every problem of the file and the overrides."""
    tree, problems = {}, Problems()
    if path is not None:
        tree, lines, duplicates = read_yaml(path)
        problems.origins.update({key: f"{path}:{line}" for key, line in lines.items()})
        for line, message in duplicates:
            problems.add(None, message, place=f"{path}:{line}")
    for override in overrides:
        try:
            key, value = parse_override(override)
            set_dotted(tree, key, value)
        except ConfigError as err:
            message = str(err)
            problems.add(None, message if message.startswith("override ")
                         else f"override {override!r}: {message}")
            continue
        note_override(problems.origins, key, f"override {override!r}")
    config = config_from_dict(tree, cuda_available, problems)
    # Kept beside the fields (not one of them: it is no part of the run's settings, and
    # equality, dumps and dataclasses.replace ignore it) for validate_config's messages.
    object.__setattr__(config, ORIGINS_ATTRIBUTE, problems.origins)
    return config


def note_override(origins: dict[str, str], key: str, place: str) -> None:
    """Record in `origins` that `key` was set at `place` (an override)."""
    # it replaces the key and whatever the file held under it
    for known in [k for k in origins if k == key or k.startswith((f"{key}.", f"{key}["))]:
        del origins[known]
    origins[key] = place
    parts = key.split(".")
    for i in range(1, len(parts)):  # sections and fields it created on the way
        origins.setdefault(".".join(parts[:i]), place)


def load_yaml(path: str | Path) -> dict:
    """The mapping of YAML file `path`; ConfigError for a missing or malformed file."""
    tree, _, duplicates = read_yaml(path)
    if duplicates:
        raise ConfigError("\n".join(f"{path}:{line}: {message}" for line, message in duplicates))
    return tree


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int], list[tuple[int, str]]]:
    """(the mapping, the 1-based line of each dotted key, (line, problem) per duplicated key)
    of YAML file `path`. A file that is missing or not YAML raises ConfigError on one line:
    `path:line:col: problem`."""
    name = str(path)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {name!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{name}: cannot read it ({err})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        # The key lines come from the node tree before construction: constructing expands
        # merge keys (<<) into the mapping, where they would read as duplicates.
        lines, duplicates = {}, []
        if isinstance(node, yaml.MappingNode):
            try:
                key_lines(node, "", lines, duplicates)
            except ConfigError as err:
                raise ConfigError(f"{name}:{err}") from None
        tree = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        position, problem = yaml_problem(err)
        raise ConfigError(f"{name}:{position}: {problem}" if position else f"{name}: {problem}") \
            from None
    finally:
        loader.dispose()
    if tree is None:
        return {}, {}, []
    if not isinstance(tree, dict):
        raise ConfigError(f"{name}:{node.start_mark.line + 1}: the top level must be a mapping "
                          f"of sections, got {tree!r}")
    return tree, lines, duplicates


def key_lines(node, prefix: str, lines: dict, duplicates: list) -> None:
    """Record in `lines` the line of every dotted key (and list item) under `node`; a key given
    twice in one mapping is a (line, problem) in `duplicates`."""
    if prefix.count(".") + prefix.count("[") > MAX_DEPTH:  # e.g. an alias inside itself
        raise ConfigError(f"{node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix}[{i}]"] = item.start_mark.line + 1
            key_lines(item, f"{prefix}[{i}]", lines, duplicates)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    seen = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
            continue
        key = f"{prefix}.{key_node.value}" if prefix else key_node.value
        line = key_node.start_mark.line + 1
        if key in seen:
            duplicates.append((line, f"duplicate key {key!r} (also on line {seen[key]}; YAML "
                                     f"would keep the last silently)"))
        seen[key] = lines[key] = line
        key_lines(value_node, key, lines, duplicates)


def yaml_problem(err: yaml.YAMLError) -> tuple[str | None, str]:
    """PyYAML's error as ("line:col", "problem (context on line N)"), 1-based (its marks count
    from 0), on one line; (None, its text) for an error without a position."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return None, " ".join(str(err).split())
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        on_line = f" on line {context_mark.line + 1}" if context_mark is not None and \
            context_mark.line != mark.line else ""
        problem = f"{problem} ({context}{on_line})"
    return f"{mark.line + 1}:{mark.column + 1}", problem


def parse_override(text: str) -> tuple[str, object]:
    """"train.lr=3e-4" -> ("train.lr", "3e-4" parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = yaml_problem(err)[1]
        raise ConfigError(f"override {text!r}: cannot parse the value {raw!r}: {problem}") \
            from None
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


def config_from_dict(tree: dict, cuda_available: bool | None = None,
                     problems: Problems | None = None) -> Config:
    """The config tree from nested mappings; the model preset is applied first, and below it
    the GPU defaults when cuda_available (default: whether CUDA is available here). Raises one
    ConfigError with every problem, those in `problems` (e.g. of the overrides) first."""
    problems = problems if problems is not None else Problems()
    tree = dict(tree)
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("preset"), str) and model["preset"]:
        from megatron_ntp.models.presets import preset_fields

        try:
            tree["model"] = {**preset_fields(model["preset"]), **model}
        except KeyError as err:
            problems.add("model.preset", f"model.preset: {err.args[0]}")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    for section, defaults in device_defaults(cuda_available).items():
        if tree.get(section) is None or isinstance(tree[section], dict):
            tree[section] = {**defaults, **(tree.get(section) or {})}
    config = build(Config, tree, "", problems)
    problems.raise_any()
    return config


def build(cls, data, path: str, problems: Problems | None = None):
    """Instantiate dataclass `cls` from mapping `data`; `path` is its dotted name for errors.

    Every field is checked: the problems are added to `problems` (and None is returned when
    there is any in this mapping) or, without `problems`, raised as one ConfigError."""
    if problems is None:
        problems = Problems()
        built = build(cls, data, path, problems)
        problems.raise_any(header=None)
        return built
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.add(path or None, f"{path or 'config'} must be a mapping of fields, "
                                   f"got {data!r}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    found_before = len(problems.found)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.add(dotted, f"unknown key {dotted!r}{suggestion(str(key), fields, path)}")
        elif dataclasses.is_dataclass(hints[key]):  # a section: each of its fields is checked
            kwargs[key] = build(hints[key], value, dotted, problems)
        else:
            try:
                kwargs[key] = convert(value, hints[key], dotted)
            except ConfigError as err:
                problems.add_error(err)
    missing = [name for name in required_fields(cls) if name not in data]
    if missing:
        problems.add(path or None, f"{path or 'config'}: missing "
                                   f"{', '.join(f'{path}.{name}' for name in missing)}")
    if len(problems.found) > found_before:
        check_fields_alone(cls, kwargs, path, problems)  # the section's own checks, too
        return None
    return construct(cls, kwargs, path, problems)


def construct(cls, kwargs: dict, path: str, problems: Problems):
    """cls(**kwargs), its own checks' (__post_init__) errors added to `problems` (then None)."""
    try:
        return cls(**kwargs)
    except ConfigError as err:
        problems.add_error(err)
    except (ValueError, TypeError) as err:
        if not check_fields_alone(cls, kwargs, path, problems):  # a rule between fields
            problems.add(path or None, component_message(cls, path, err))
    return None


def check_fields_alone(cls, kwargs: dict, path: str, problems: Problems) -> int:
    """Run cls's own checks (__post_init__) on each of `kwargs` alone, the other fields at
    their defaults, adding each field's error to `problems`; the number found. A
    __post_init__ stops at its first problem: this names every bad field, each with its
    place. Nothing for a class with required fields (it cannot be built from one field)."""
    if required_fields(cls):
        return 0
    found = 0
    for key, value in kwargs.items():
        if value is None and dataclasses.is_dataclass(typing.get_type_hints(cls).get(key)):
            continue  # a section that failed: reported already
        try:
            cls(**{key: value})
        except (ValueError, TypeError) as err:
            problems.add(f"{path}.{key}" if path else key, component_message(cls, path, err))
            found += 1
    return found


def required_fields(cls) -> list[str]:
    """The fields of dataclass `cls` without a default."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def component_message(cls, path: str, err: Exception) -> str:
    """A component's own error (e.g. ShapedLossConfig's) with its section's dotted name."""
    message = str(err).replace(f"{cls.__name__}.", f"{path}." if path else "")
    if path and not message.startswith(path + "."):
        message = f"{path}: {message}"
    return message


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
        raise ConfigError(f"{path}: expected {type_name(hint)}, got {value!r}", path)
    if origin is typing.Literal:  # a fixed choice: the field's type lists the allowed values
        if value in args and type(value) is type(args[0]):
            return value
        raise ConfigError(f"{path}={value!r} must be one of "
                          f"{', '.join(repr(a) for a in args)}", path)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if origin is dict:
        key_type, value_type = args
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}", path)
        keys = convert_each([(k, key_type, path) for k in value])
        return dict(zip(keys, convert_each([(v, value_type, f"{path}.{k}")
                                            for k, v in value.items()])))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}", path)
        item_type = args[0] if args else object
        items = convert_each([(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)])
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
    raise ConfigError(f"{path}: expected {type_name(hint)}, got {value!r}", path)


def convert_each(items: list[tuple]) -> list:
    """[convert(value, hint, path) for each item]; one ConfigError naming every bad item."""
    problems, out = Problems(), []
    for value, hint, path in items:
        try:
            out.append(convert(value, hint, path))
        except ConfigError as err:
            problems.add_error(err)
    problems.raise_any(header=None)
    return out


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
