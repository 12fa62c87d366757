"""Argument checking for QMP commands, with QEMU's error messages.

Arguments are checked before a command runs, so a bad request never has a
side effect.  A schema maps argument names to `Arg`s; nested objects
(blockdev-add's `file`, `cache`) are schemas themselves and their names are
reported dotted, as QEMU does ('file.filename').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stratovirt_py.qmp.protocol import QmpError

Schema = dict[str, "Arg"]
ArgType = str | Schema

_TYPE_NAMES = {"int": "integer", "uint": "integer", "number": "number", "bool": "boolean",
               "str": "string", "object": "object", "array": "array"}


@dataclass(frozen=True)
class Arg:
    type: ArgType
    required: bool = True
    choices: tuple[str, ...] | None = None
    items: str | None = None  # for an "array": the type of each element


def opt(type_: ArgType, choices: tuple[str, ...] | None = None) -> Arg:
    return Arg(type_, required=False, choices=choices)


def _matches(value: Any, type_name: str) -> bool:
    if type_name == "any":
        return True
    if type_name in ("int", "uint"):
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "str":
        return isinstance(value, str)
    if type_name == "object":
        return isinstance(value, dict)
    if type_name == "array":
        return isinstance(value, list)
    raise AssertionError(f"unknown schema type {type_name}")


def check_arguments(arguments: dict[str, Any], schema: Schema, prefix: str = "") -> None:
    """Raises QmpError (GenericError) on the first problem, in QEMU's words and order.

    QEMU's input visitor walks the schema's members in order (a nested object
    completely, its own unexpected members included) and only then reports
    members the schema does not know.
    """
    for name, arg in schema.items():
        path = f"{prefix}{name}"
        if name not in arguments:
            if arg.required:
                raise QmpError(f"Parameter '{path}' is missing")
            continue
        value = arguments[name]
        if isinstance(arg.type, dict):
            if not isinstance(value, dict):
                raise QmpError(f"Invalid parameter type for '{path}', expected: object")
            check_arguments(value, arg.type, prefix=f"{path}.")
            continue
        if not _matches(value, arg.type):
            raise QmpError(f"Invalid parameter type for '{path}', "
                           f"expected: {_TYPE_NAMES.get(arg.type, arg.type)}")
        if arg.type == "uint" and value < 0:
            raise QmpError(f"Parameter '{path}' expects uint64")
        if arg.items is not None:
            for index, item in enumerate(value):
                if not _matches(item, arg.items):
                    raise QmpError(f"Invalid parameter type for '{path}[{index}]', "
                                   f"expected: {_TYPE_NAMES.get(arg.items, arg.items)}")
        if arg.choices is not None and value not in arg.choices:
            raise QmpError(f"Parameter '{path}' does not accept value '{value}'")
    for name in arguments:
        if name not in schema:
            raise QmpError(f"Parameter '{prefix}{name}' is unexpected")
