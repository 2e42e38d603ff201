"""Derive argparse flags from config dataclasses, in one place.

Each config is a keyword-only dataclass whose fields carry a docstring right under them
(the help text). A field ``tensor_model_parallel_size`` becomes the flag
``--tensor-model-parallel-size``: the config's ``flag_prefix`` (default ``--``) plus the
field name, unless the field's metadata names another flag (``{"flag": ...}``). So
``RLConfig.group_size`` is ``--rl-group-size`` without the field repeating ``rl_``.
Flags that are not given keep the value of a base config (a preset, or the dataclass
defaults), which is how ``--model-preset tiny --num-layers 6`` works.

Each config's flags parse into their own argparse slots, ``<scope>.<field>``: two configs
may both have a ``seed`` field without one flag setting the other.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid flag value or combination, reported at start-up."""


def flag_name(field: dataclasses.Field, cls: type | None = None) -> str:
    """The flag of ``field``: its metadata's ``flag``, else ``cls.flag_prefix`` + name."""
    prefix = getattr(cls, "flag_prefix", "--") if cls is not None else "--"
    return field.metadata.get("flag", prefix + field.name.replace("_", "-"))


def flag_dest(field: dataclasses.Field, scope: str | None) -> str:
    """The argparse slot of ``field``: unique per config when ``scope`` names it."""
    return f"{scope}.{field.name}" if scope else field.name


@functools.cache
def _docstrings(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_help(cls: type, name: str) -> str:
    return _docstrings(cls).get(name, "")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _optional(parse):
    def parse_or_none(text: str):
        return None if text.lower() == "none" else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")
    return parse_or_none


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, title: str | None = None, *, scope: str | None = None,
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Add one flag per field of ``cls`` to ``parser`` (in a group named ``title``), each
    parsed into the slot ``<scope>.<field>`` (read back by :func:`config_from_flags` with
    the same ``scope``). ``aliases`` maps a flag to other spellings of the same option.

    A bool field is a ``--flag`` / ``--no-flag`` pair, except a field named ``no_*`` or
    marked ``metadata={"store_true": True}``: Megatron-LM's switches such as
    ``--no-load-optim`` exist only in their given form."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.metadata.get("flag") is False:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        kwargs: dict[str, Any] = {
            "dest": flag_dest(field, scope),
            "default": argparse.SUPPRESS,
            "help": field_help(cls, field.name) + _default_note(field),
        }
        origin = get_origin(tp)
        if tp is bool and (field.name.startswith("no_") or field.metadata.get("store_true")):
            kwargs["action"] = "store_true"
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            choices = list(get_args(tp))
            kwargs["choices"] = choices + ([None] if optional else [])
            kwargs["type"] = _optional(str) if optional else str
        elif origin in (list, tuple):
            (item,) = get_args(tp)[:1]
            kwargs["nargs"] = "*"
            kwargs["type"] = item
        elif tp in (int, float, str):
            kwargs["type"] = _optional(tp) if optional else tp
        else:
            kwargs["type"] = str
        flag = flag_name(field, cls)
        group.add_argument(flag, *(aliases or {}).get(flag, ()), **kwargs)


def _default_note(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f" (default: {field.default})"
    return ""


def check_finite(config: object) -> None:
    """Refuse NaN and ±inf in every float field of ``config``: none of them means anything
    there, and NaN passes every comparison a ``validate`` makes (``--lr nan`` is neither
    <= 0 nor > --min-lr)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if (_unwrap_optional(hints[field.name])[0] is float and isinstance(value, float)
                and not math.isfinite(value)):
            raise ConfigError(f"{flag_name(field, type(config))} {value}: must be a finite "
                              "number")


def config_from_flags(
    cls: type[T], namespace: argparse.Namespace, base: T | None = None, *, scope: str | None = None
) -> T:
    """Build ``cls`` from the flags that were given, on top of ``base`` (or the defaults)."""
    given = {
        f.name: getattr(namespace, flag_dest(f, scope))
        for f in dataclasses.fields(cls)
        if f.init and hasattr(namespace, flag_dest(f, scope))
    }
    hints = typing.get_type_hints(cls)
    for name, value in given.items():
        if get_origin(hints[name]) is tuple and value is not None:
            given[name] = tuple(value)
    if base is None:
        return cls(**given)
    return dataclasses.replace(base, **given)
