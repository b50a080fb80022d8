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
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from interp.io import atomic_write_json, config_hash, read_json

__all__ = ["ConfigError", "JsonConfig", "check_fields", "field_docs", "add_config_arguments", "config_from_args",
           "config_flags_given"]

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
    # Not typing.get_type_hints, which answers {} for a class marked __no_type_check__ (JsonConfig is).
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            hints.update(inspect.get_annotations(klass, eval_str=True))
    return hints


class ConfigError(ValueError):
    """An invalid config field; the message names the config, the field and the fix."""


# Range conventions by field name, so that every config gets the same checks without restating them.
# Signed integers: layer indices and token positions count from the end when negative.
_SIGNED_SUFFIXES = ("layer", "layers", "position", "positions", "offset")
_POSITIVE_SUFFIXES = ("batch_size", "_step", "limit", "_rank", "_tokens", "_chars")
_POSITIVE_NAMES = {"k", "steps", "n_forget", "n_train", "n_train_harmless", "n_val", "n_val_harmless", "n_boot",
                   "n_perm", "n_folds", "rank"}


def _int_floor(name: str) -> int | None:
    if name.endswith(_SIGNED_SUFFIXES):
        return None
    if name in _POSITIVE_NAMES or name.endswith(_POSITIVE_SUFFIXES):
        return 1
    return 0


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(tp: Any, value: Any, where: str, name: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it normalised (lists to tuples, str to Path)."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null; give a {_type_name(tp)}")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(arg, value, where, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if value is None:
        raise ConfigError(f"{where}: must not be null; give a {_type_name(tp)}")
    if tp is bool:
        if not isinstance(value, bool):
            hint = f"write {str(value).strip().lower()} without quotes" if (
                isinstance(value, str) and value.strip().lower() in ("true", "false")) else "use true or false"
            raise ConfigError(f"{where}: expected true or false, got {value!r} ({type(value).__name__}); {hint}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = f"write {value.strip()} without quotes" if isinstance(value, str) and value.strip().lstrip("-").isdigit() \
                else "give a whole number"
            raise ConfigError(f"{where}: expected an integer, got {value!r} ({type(value).__name__}); {hint}")
        floor = _int_floor(name)
        if floor is not None and value < floor:
            raise ConfigError(f"{where}: must be an integer >= {floor}, got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r} ({type(value).__name__}); "
                              "write it without quotes")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        if (name == "lr" or name.endswith("_lr")) and value <= 0:
            raise ConfigError(f"{where}: the learning rate must be > 0, got {value!r}")
        if name.endswith("fraction") and not 0 <= value <= 1:
            raise ConfigError(f"{where}: a fraction must be in [0, 1], got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r} ({type(value).__name__}); quote it")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        if isinstance(value, str) and args[0] is str:
            value = [value]  # a single name where a list is expected: one item, never its characters
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0])}, got {value!r}")
        homogeneous = origin is list or len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is Ellipsis
        if not homogeneous and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        items = [_check(args[0] if homogeneous else a, v, f"{where}[{i}]", name)
                 for i, (a, v) in enumerate(zip(args * len(value) if homogeneous else args, value))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object {{...}}, got {value!r}")
        return {_check(kt, k, f"{where} key", name): _check(vt, v, f"{where}[{k!r}]", name) for k, v in value.items()}
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object {{...}}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected a {tp.__name__} object, got {value!r}")
        return value
    return value


def check_fields(cfg: Any) -> Any:
    """Check every field of dataclass ``cfg`` against its annotation, in place; returns ``cfg``.

    The one validation every config goes through (JSON, CLI or Python): types (no ``"8"`` for 8, no
    ``"false"`` for false), finite numbers, counts and sizes >= 1, other integers >= 0 unless they are
    layer or position indices. A single string where a list of strings is expected becomes a one-item
    list. Each class's own ``__post_init__`` adds the checks that need its semantics.

    Raises:
        ConfigError: naming ``Class.field``, the bad value and the fix.
    """
    hints = _resolved_types(type(cfg))
    for f in dataclasses.fields(cfg):
        if f.name.startswith("_") or f.name not in hints:
            continue
        value = _check(hints[f.name], getattr(cfg, f.name), f"{type(cfg).__name__}.{f.name}", f.name)
        object.__setattr__(cfg, f.name, value)
    return cfg


def _decode(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected an object of {tp.__name__} fields, got {value!r}")
        return tp.from_dict(value) if hasattr(tp, "from_dict") else tp(**value)
    if isinstance(value, str) and origin in (tuple, list):
        return value  # check_fields decides: one item for a list of strings, else an error
    if origin in (tuple, list, dict) and not isinstance(value, (list, tuple, dict)):
        return value  # check_fields names the field
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
        return {k: _decode(varg, v) for k, v in value.items()} if isinstance(value, dict) else value
    if tp is Path and isinstance(value, str):
        return Path(value)
    return value


@dataclasses.dataclass
class JsonConfig:
    """Mixin: ``to_dict``/``from_dict``/``save``/``load``/``hash`` for dataclass configs.

    Every subclass is checked by :func:`check_fields` on construction, before its own ``__post_init__``.
    """

    # check_fields validates construction with messages that name the fix; runtime type checkers (the
    # jaxtyping/beartype hook of the tests) leave the generated __init__ to it instead of pre-empting it.
    __no_type_check__ = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_emalab_checked", False):
            return

        def __post_init__(self) -> None:  # noqa: N807 - the dataclass hook
            check_fields(self)  # idempotent, so a subclass calling super().__post_init__() is fine
            own(self)

        __post_init__._emalab_checked = True
        cls.__post_init__ = __post_init__

    def __post_init__(self) -> None:
        check_fields(self)

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
    def from_dict(cls: type[T], data: Any) -> T:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object of fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        hints = _resolved_types(cls)
        try:
            return cls(**{k: _decode(hints.get(k, Any), v) for k, v in data.items()})
        except ConfigError as err:
            msg = str(err)
            raise ConfigError(msg if msg.startswith(cls.__name__) else f"{cls.__name__}: {msg}") from None
        except TypeError as err:  # a __post_init__ comparing a wrongly typed value
            raise ConfigError(f"{cls.__name__}: {err}; check the field types against --help") from err

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Read a config written by :meth:`save`; a :class:`ConfigError` names the file."""
        try:
            return cls.from_dict(read_json(path))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def hash(self, length: int = 12) -> str:
        return config_hash(self.to_dict(), length)

    def replace(self: T, **changes) -> T:
        return dataclasses.replace(self, **changes)


def _cli_type(tp: Any):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if bool in args and str in args:  # a switch with a word setting, e.g. true | false | auto
            return _bool_or_word, None
        return _cli_type(args[0]) if len(args) == 1 else (str, None)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), "+"
    if tp in (int, float, str):
        return tp, None
    if tp is Path:
        return Path, None
    return None, None


def _bool_or_word(text: str) -> bool | str:
    """A ``bool | str`` option's value: true/false (yes/no, on/off) as booleans, any other word as itself."""
    word = text.strip().lower()
    return {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}.get(word, text)


def _flag(name: str) -> str:
    """A config field's command-line option: ``max_new_tokens`` → ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


def config_flags_given(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The options of :func:`add_config_arguments` that were passed in ``args``, as command-line words
    (the inverse of parsing them), e.g. to print the command that repeats these settings elsewhere."""
    out: list[str] = []
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if f.name in skip or v is None:
            continue
        flag = _flag(f.name)
        if isinstance(v, bool) and hints[f.name] is not bool:  # a bool | str option takes its value as a word
            out += [flag, str(v).lower()]
        elif isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, (list, tuple)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` options for the scalar/list fields of ``cls``; help comes from field docs."""
    docs = field_docs(cls)
    hints = _resolved_types(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        flag = _flag(f.name)
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
