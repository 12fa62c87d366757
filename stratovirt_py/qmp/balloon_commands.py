"""QMP balloon commands: `balloon` and `query-balloon` as the spec shows them, and QEMU's
qom-get/qom-set for the balloon's guest statistics.

Without a balloon device each fails with class DeviceNotActive, as in QEMU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stratovirt_py.balloon import BalloonError
from stratovirt_py.qmp.protocol import QmpError
from stratovirt_py.qmp.registry import CommandContext, ManagedMachine, command
from stratovirt_py.qmp.schema import Arg


def _run(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except BalloonError as exc:
        raise QmpError(exc.desc, exc.error_class) from None


@command("balloon", {"value": Arg("int")})
def balloon(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    _run(lambda: machine.balloon_set_target(args["value"]))


@command("query-balloon")
def query_balloon(machine: ManagedMachine, context: CommandContext, args: dict) -> dict:
    return {"actual": _run(machine.balloon_actual)}


@command("qom-get", {"path": Arg("str"), "property": Arg("str")})
def qom_get(machine: ManagedMachine, context: CommandContext, args: dict) -> Any:
    return _run(lambda: machine.qom_get(args["path"], args["property"]))


@command("qom-set", {"path": Arg("str"), "property": Arg("str"), "value": Arg("any")})
def qom_set(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    _run(lambda: machine.qom_set(args["path"], args["property"], args["value"]))
