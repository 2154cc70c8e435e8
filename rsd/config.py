"""One way to validate a config dataclass: each field's type from its annotation, then its range.

Every config of the project subclasses `Config`. Its `__post_init__` checks each field against the
field's annotation (a bool is not an int, a string is not a number, a list holds what it says), then
calls the class's `validate()` for ranges and relations, which reports through `check`. Every error
names the field as a user sets it (`policy.epochs`, `train.model.hidden_dim`: the class's `prefix`),
the value found and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, ClassVar, Union


def is_int(value: Any) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` is of the annotated type `hint` (types this project's configs use; others pass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):  # YAML gives lists where a config keeps tuples
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_matches(k, args[0]) and _matches(v, args[1])
                                                            for k, v in value.items()))
    if hint in (os.PathLike,) or getattr(hint, "__name__", "") == "Path":
        return isinstance(value, (str, os.PathLike))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    """`hint` in words: "an int", "a list of numbers or null", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    names = {type(None): "null", bool: "true or false", int: "an int", float: "a finite number", str: "a string",
             Any: "any value"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if args else "a mapping"
    return f"a {getattr(hint, '__name__', hint)}"


def _plural(hint: Any) -> str:
    """"ints", "finite numbers", "values" for a list's or a mapping's items."""
    if hint is Any:
        return "values"
    words = _describe(hint)
    return words.split(" ", 1)[1] + "s" if words.startswith(("a ", "an ")) and " or " not in words else words


class Config:
    """Base of the project's config dataclasses: types checked from the annotations, then `validate()`."""

    prefix: ClassVar[str] = ""
    """How a user names this config's fields: the params section (`policy`), or the class name."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value, hint = getattr(self, field.name), hints[field.name]
            if not _matches(value, hint):
                raise ValueError(f"{self._name(field.name)} must be {_describe(hint)}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Ranges and relations between fields, each through `check`; types are already right here."""

    def check(self, ok: bool, field: str, expected: str) -> None:
        """Raise the ValueError that names `field`, what it must be and the value it has, unless `ok`."""
        if not ok:
            raise ValueError(f"{self._name(field)} must be {expected}, got {getattr(self, field)!r}")

    def _name(self, field: str) -> str:
        return f"{self.prefix or type(self).__name__}.{field}"
