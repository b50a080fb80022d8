"""Dataclass configs that round-trip to JSON and document themselves on the command line.

Field documentation is the string literal under each field (as in sparsify's configs); it is read
from the source so that ``--help`` and the docs never drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from interp.io import atomic_write_json, config_hash, read_json

__all__ = ["JsonConfig", "field_docs", "add_config_arguments", "config_from_args"]

T = TypeVar("T", bound="JsonConfig")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` (and its bases) to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return tp.from_dict(value) if hasattr(tp, "from_dict") else tp(**value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        return tuple(_decode(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return [_decode(arg, v) for v in value]
    if origin is dict:
        _, varg = typing.get_args(tp) or (Any, Any)
        return {k: _decode(varg, v) for k, v in value.items()}
    if tp is Path:
        return Path(value)
    return value


@dataclasses.dataclass
class JsonConfig:
    """Mixin: ``to_dict``/``from_dict``/``save``/``load``/``hash`` for dataclass configs."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, JsonConfig):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Path):
                v = str(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        hints = _resolved_types(cls)
        return cls(**{k: _decode(hints.get(k, Any), v) for k, v in data.items()})

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(read_json(path))

    def hash(self, length: int = 12) -> str:
        return config_hash(self.to_dict(), length)

    def replace(self: T, **changes) -> T:
        return dataclasses.replace(self, **changes)


def _cli_type(tp: Any):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _cli_type(args[0]) if len(args) == 1 else (str, None)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), "+"
    if tp in (int, float, str):
        return tp, None
    if tp is Path:
        return Path, None
    return None, None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` options for the scalar/list fields of ``cls``; help comes from field docs."""
    docs = field_docs(cls)
    hints = _resolved_types(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f"{docs.get(f.name, '')} (default: {default})".strip().replace("%", "%%")  # argparse %-formats
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        conv, nargs = _cli_type(tp)
        if conv is None:
            continue
        group.add_argument(flag, dest=f.name, type=conv, nargs=nargs, default=None, help=help_text)


def config_from_args(cls: type[T], args: argparse.Namespace, base: T | None = None) -> T:
    """Build ``cls`` from ``base`` (or defaults) overridden by the options the user actually passed."""
    data = (base or cls()).to_dict()
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            data[f.name] = list(v) if isinstance(v, tuple) else v
    return cls.from_dict(data)
