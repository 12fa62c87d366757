"""QMP commands: the envelope rules, the command table, and the lifecycle and query handlers.

Replies match the spec byte for byte where it shows them (key order included:
the encoder keeps insertion order).  Handlers run one at a time on the main
loop, so they see the machine in a consistent state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from stratovirt_py.config import MachineConfig
from stratovirt_py.machine import ExitRequest, RunState
from stratovirt_py.qmp.protocol import QmpError, error_message, return_message
from stratovirt_py.qmp.schema import Arg, Schema, check_arguments

# The spec's greeting (StratoVirt v0.x reported QEMU 4.0.1 with an empty package).
QEMU_VERSION = {"qemu": {"micro": 1, "minor": 0, "major": 4}, "package": ""}
CPU_TYPE = "host-x86-cpu"


class ManagedMachine(Protocol):
    """What the commands need of the machine (MicroVM, or a fake in unit tests)."""

    state: RunState
    config: MachineConfig

    @property
    def exit_pending(self) -> bool: ...

    def vcpu_thread_ids(self) -> list[int | None]: ...

    def pause(self) -> bool: ...

    def resume(self) -> None: ...

    def request_exit(self, request: ExitRequest) -> None: ...

    def emit_event(self, name: str, data: dict[str, Any]) -> None: ...


class CommandContext(Protocol):
    """The connection a command came in on (for fds passed with SCM_RIGHTS)."""

    named_fds: dict[str, int]

    def take_received_fd(self) -> int | None: ...


Handler = Callable[[ManagedMachine, CommandContext, dict[str, Any]], Any]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    schema: Schema


COMMANDS: dict[str, Command] = {}


def command(name: str, schema: Schema | None = None) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, handler, schema or {})
        return handler
    return register


ENVELOPE_KEYS = {"execute", "arguments", "id"}


def dispatch(machine: ManagedMachine, context: CommandContext, request: Any) -> dict[str, Any]:
    """Runs one decoded request and returns the reply message."""
    if not isinstance(request, dict):
        return error_message(QmpError("QMP input must be a JSON object"))
    has_id = "id" in request
    request_id = request.get("id")
    try:
        name = _check_envelope(request)
        entry = COMMANDS.get(name)
        if entry is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        arguments = request.get("arguments", {})
        check_arguments(arguments, entry.schema)
        result = entry.handler(machine, context, arguments)
    except QmpError as exc:
        return error_message(exc, request_id, has_id)
    return return_message({} if result is None else result, request_id, has_id)


def _check_envelope(request: dict[str, Any]) -> str:
    if "execute" in request and not isinstance(request["execute"], str):
        raise QmpError("QMP input member 'execute' must be a string")
    if "arguments" in request and not isinstance(request["arguments"], dict):
        raise QmpError("QMP input member 'arguments' must be an object")
    for key in request:
        if key not in ENVELOPE_KEYS:
            raise QmpError(f"QMP input member '{key}' is unexpected")
    if "execute" not in request:
        raise QmpError("QMP input lacks member 'execute'")
    return request["execute"]


# Negotiation and introspection.

@command("qmp_capabilities", {"enable": Arg("array", required=False)})
def qmp_capabilities(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    # Optional here (the spec types commands straight after the greeting) and
    # harmless to repeat; no capability is offered, so none can be enabled.
    for capability in args.get("enable", []):
        if capability != "oob":
            raise QmpError(f"Parameter 'enable' does not accept value '{capability}'")
        raise QmpError("Capability oob not available")


@command("query-version")
def query_version(machine: ManagedMachine, context: CommandContext, args: dict) -> dict:
    return QEMU_VERSION


@command("query-commands")
def query_commands(machine: ManagedMachine, context: CommandContext, args: dict) -> list:
    return [{"name": name} for name in COMMANDS]


# Status and vCPUs.

@command("query-status")
def query_status(machine: ManagedMachine, context: CommandContext, args: dict) -> dict:
    state = machine.state
    return {"running": state is RunState.RUNNING, "singlestep": False, "status": state.value}


def _cpu_props(machine: ManagedMachine, index: int) -> dict[str, int]:
    socket, core, thread = machine.config.topology.ids(index)
    return {"core-id": core, "socket-id": socket, "thread-id": thread}


def _qom_path(index: int) -> str:
    return f"/machine/unattached/device[{index}]"


@command("query-cpus")
def query_cpus(machine: ManagedMachine, context: CommandContext, args: dict) -> list:
    # "halted" would need KVM_GET_MP_STATE, which waits for a running vCPU to
    # leave KVM_RUN; like StratoVirt, report false rather than stall.
    return [
        {"CPU": index, "arch": "x86", "current": True, "halted": False,
         "props": _cpu_props(machine, index), "qom_path": _qom_path(index),
         "thread_id": thread_id}
        for index, thread_id in enumerate(machine.vcpu_thread_ids())
    ]


@command("query-cpus-fast")
def query_cpus_fast(machine: ManagedMachine, context: CommandContext, args: dict) -> list:
    return [
        {"cpu-index": index, "qom-path": _qom_path(index), "thread-id": thread_id,
         "props": _cpu_props(machine, index), "target": "x86_64"}
        for index, thread_id in enumerate(machine.vcpu_thread_ids())
    ]


@command("query-hotpluggable-cpus")
def query_hotpluggable_cpus(machine: ManagedMachine, context: CommandContext,
                            args: dict) -> list:
    topology = machine.config.topology
    result = []
    for index in range(topology.max_cpus):
        entry: dict[str, Any] = {"props": _cpu_props(machine, index)}
        if index < topology.cpus:
            entry["qom-path"] = _qom_path(index)
        entry["type"] = CPU_TYPE
        entry["vcpus-count"] = 1
        result.append(entry)
    return result


# Lifecycle.

@command("stop")
def stop(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    if machine.state is RunState.PAUSED:
        raise QmpError("Failed to pause VM: it is already paused")
    if machine.state is RunState.RUNNING and not machine.pause():
        raise QmpError("Failed to pause VM: its vCPUs did not stop in time")
    machine.state = RunState.PAUSED
    machine.emit_event("STOP", {})


@command("cont")
def cont(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    if machine.state not in (RunState.PAUSED, RunState.PRELAUNCH):
        raise QmpError(f"Failed to resume VM: it is not paused (status: {machine.state.value})")
    machine.resume()
    machine.emit_event("RESUME", {})


@command("quit")
def quit_(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    # The exit happens after this reply is queued; SHUTDOWN follows it.
    machine.request_exit(ExitRequest(0, False, "host-qmp-quit", "quit requested over QMP"))


@command("system_reset")
def system_reset(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    # A microvm reboot ends the VM, as in StratoVirt.
    machine.request_exit(ExitRequest(0, False, "host-qmp-system-reset",
                                     "system_reset requested over QMP (a microvm reset ends it)"))


@command("system_powerdown")
def system_powerdown(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    # No ACPI on a microvm: the monitor powers the guest off itself.
    machine.emit_event("POWERDOWN", {})
    machine.request_exit(ExitRequest(0, True, "guest-shutdown",
                                     "system_powerdown requested over QMP"))


# File descriptors passed with SCM_RIGHTS.

def _check_fd_name(name: str) -> None:
    if not name or name[0].isdigit():
        raise QmpError("Parameter 'fdname' expects a name not starting with a digit")


@command("getfd", {"fdname": Arg("str")})
def getfd(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    name = args["fdname"]
    _check_fd_name(name)
    fd = context.take_received_fd()
    if fd is None:
        raise QmpError("No file descriptor supplied via SCM_RIGHTS")
    old = context.named_fds.pop(name, None)
    if old is not None:
        os.close(old)
    context.named_fds[name] = fd


@command("closefd", {"fdname": Arg("str")})
def closefd(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    fd = context.named_fds.pop(args["fdname"], None)
    if fd is None:
        raise QmpError(f"File descriptor named '{args['fdname']}' not found")
    os.close(fd)
