"""QMP commands for lifecycle, status, vCPUs and file descriptors.

Replies match the spec byte for byte where it shows them (key order included:
the encoder keeps insertion order).
"""

from __future__ import annotations

import os
from typing import Any

from stratovirt_py.lifecycle import LifecycleError, RunState
from stratovirt_py.machine import ExitRequest
from stratovirt_py.qmp.protocol import QmpError
from stratovirt_py.qmp.registry import (
    COMMANDS,
    QEMU_VERSION,
    CommandContext,
    ManagedMachine,
    command,
)
from stratovirt_py.qmp.schema import Arg

CPU_TYPE = "host-x86-cpu"

# Negotiation and introspection.

@command("qmp_capabilities", {"enable": Arg("array", required=False, items="str")})
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


@command("query-chardev")
def query_chardev(machine: ManagedMachine, context: CommandContext, args: dict) -> list:
    # label, filename ("pty:/dev/pts/N", "unix:P,server=on", "file:P", "stdio", "null")
    # and frontend-open, as QEMU and StratoVirt report them.
    return machine.query_chardevs()


# Lifecycle.

# The machine owns the run state and emits STOP/RESUME; as in StratoVirt, a
# stop while paused and a cont while running are errors.

@command("stop")
def stop(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    try:
        machine.pause()
    except LifecycleError as exc:
        raise QmpError(f"Failed to pause VM: {exc}") from None


@command("cont")
def cont(machine: ManagedMachine, context: CommandContext, args: dict) -> None:
    try:
        machine.resume()
    except LifecycleError as exc:
        raise QmpError(f"Failed to resume VM: {exc}") from None


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
    machine.powerdown()


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
