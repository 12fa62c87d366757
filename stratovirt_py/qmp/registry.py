"""The QMP command table and the rules every request goes through.

Handlers register with @command(name, schema); dispatch() checks the request
envelope and the arguments (before anything runs, so a bad request has no side
effect) and turns QmpError into QEMU's error reply.  Whatever else goes wrong
inside a handler becomes a GenericError too: every request gets one reply.

A handler that has to wait (for a worker thread, say) is an `async def`; for
it dispatch() returns an awaitable of the reply, and the server runs it while
serving everything else.  Synchronous handlers stay a plain call.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from stratovirt_py.config import DriveConfig, MachineConfig, NetdevConfig
from stratovirt_py.event_loop import CancelledError, current_task
from stratovirt_py.hotplug import DeviceRequest
from stratovirt_py.lifecycle import RunState
from stratovirt_py.machine import ExitRequest
from stratovirt_py.qmp.protocol import QmpError, error_message, return_message
from stratovirt_py.qmp.schema import Schema, check_arguments

log = logging.getLogger(__name__)

# The spec's greeting (StratoVirt v0.x reported QEMU 4.0.1 with an empty package).
QEMU_VERSION = {"qemu": {"micro": 1, "minor": 0, "major": 4}, "package": ""}


class ManagedMachine(Protocol):
    """What the commands need of the machine (MicroVM, or a fake in unit tests)."""

    config: MachineConfig

    @property
    def state(self) -> RunState: ...

    @property
    def exit_pending(self) -> bool: ...

    def vcpu_thread_ids(self) -> list[int | None]: ...

    def query_chardevs(self) -> list[dict[str, object]]: ...

    def pause(self) -> None:
        """Raises LifecycleError (nothing changed) if the VM cannot be paused."""

    def resume(self) -> None:
        """Raises LifecycleError (nothing changed) if the VM is not paused."""

    def request_exit(self, request: ExitRequest) -> None: ...

    def powerdown(self) -> None: ...

    async def device_del(self, device_id: str) -> None:
        """Raises HotplugError; emits DEVICE_DELETED before it returns."""

    def emit_event(self, name: str, data: dict[str, Any]) -> None: ...

    # Hot-plug; refusals are HotplugErrors.

    def blockdev_add(self, drive: DriveConfig) -> None: ...

    def blockdev_del(self, node_name: str) -> None: ...

    def netdev_add(self, netdev: NetdevConfig) -> None:
        """Owns `netdev.fd` (if any) from the call on, refused or not."""

    def netdev_del(self, netdev_id: str) -> None: ...

    def device_add(self, request: DeviceRequest) -> None: ...

    # The balloon; without one, BalloonError(DeviceNotActive).

    def balloon_set_target(self, value: int) -> None: ...

    def balloon_actual(self) -> int: ...

    def qom_get(self, path: str, name: str) -> Any: ...

    def qom_set(self, path: str, name: str, value: Any) -> None: ...


class CommandContext(Protocol):
    """The connection a command came in on (for fds passed with SCM_RIGHTS)."""

    named_fds: dict[str, int]

    def take_received_fd(self) -> int | None:
        """One of the fds that came with this command; those not taken are closed after it."""
        ...


Handler = Callable[[ManagedMachine, CommandContext, dict[str, Any]], Any]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    schema: Schema
    waits: bool  # an async handler


COMMANDS: dict[str, Command] = {}


def command(name: str, schema: Schema | None = None) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, handler, schema or {},
                                 inspect.iscoroutinefunction(handler))
        return handler
    return register


ENVELOPE_KEYS = {"execute", "arguments", "id"}

Reply = dict[str, Any]


def dispatch(machine: ManagedMachine, context: CommandContext,
             request: Any) -> Reply | Coroutine[Any, Any, Reply]:
    """Runs one decoded request: the reply message, or for an async command an awaitable of it.

    Arguments are checked before the handler starts, async or not.
    """
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
        if entry.waits:
            return _run_async(entry, machine, context, arguments, request_id, has_id)
        result = entry.handler(machine, context, arguments)
    except QmpError as exc:
        return error_message(exc, request_id, has_id)
    except Exception as exc:
        return _unexpected_failure(request.get("execute"), exc, request_id, has_id)
    return return_message({} if result is None else result, request_id, has_id)


async def _run_async(entry: Command, machine: ManagedMachine, context: CommandContext,
                     arguments: dict[str, Any], request_id: Any, has_id: bool) -> Reply:
    try:
        result = await entry.handler(machine, context, arguments)
    except QmpError as exc:
        return error_message(exc, request_id, has_id)
    except CancelledError as exc:
        task = current_task()
        if task is not None and task.cancelling():
            raise  # the server is shutting down: no reply
        # Something the handler awaited was cancelled: still a failure of this command.
        return _unexpected_failure(entry.name, exc, request_id, has_id)
    except Exception as exc:
        return _unexpected_failure(entry.name, exc, request_id, has_id)
    return return_message({} if result is None else result, request_id, has_id)


def _unexpected_failure(name: Any, exc: BaseException, request_id: Any,
                        has_id: bool) -> Reply:
    """A bug or an unforeseen condition in a command: logged, and still answered."""
    log.exception("QMP command %r failed unexpectedly", name)
    desc = f"{name} failed: {type(exc).__name__}: {exc}" if str(exc) else \
        f"{name} failed: {type(exc).__name__}"
    return error_message(QmpError(desc), request_id, has_id)


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
