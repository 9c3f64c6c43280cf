"""`--help` text generated from the config tree: every field with its type, default and the
docstring written under it in the dataclass (the single place a field is documented)."""

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing

from megatron_ntp.config.schema import Config


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """{field name: docstring} from the string literals that follow each annotated field."""
    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def config_help(root=Config, width: int = 100) -> str:
    """One entry per leaf field, grouped by section:

        loss.beta (float, default 0.0)
            Global entropy knob: ...
    """
    lines = []
    hints = typing.get_type_hints(root)
    for section in dataclasses.fields(root):
        cls = hints[section.name]
        summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        lines.append(f"{section.name}:  {summary}")
        lines.extend(_section_help(cls, section.name, width))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _section_help(cls, path: str, width: int) -> list[str]:
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(defaults, f.name)
        kind, default = _type_text(hints[f.name]), _value_text(value)
        lines.append(f"  {path}.{f.name} ({kind}, default {default})")
        doc = " ".join(docs.get(f.name, "").split())
        lines.extend(textwrap.wrap(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return lines


def _type_text(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("megatron_ntp.config.schema.", "")


def _value_text(value) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)
