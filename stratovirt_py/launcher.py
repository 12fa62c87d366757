"""The monitor process: logging, -daemonize and -pidfile, signals, and the main loop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

from stratovirt_py import sandbox
from stratovirt_py.builder import build_vm
from stratovirt_py.config import MachineConfig
from stratovirt_py.errors import ConfigError, MonitorError, error_line
from stratovirt_py.event_loop import EventLoop
from stratovirt_py.kvm import KvmError
from stratovirt_py.machine import ExitRequest, MicroVM
from stratovirt_py.qmp.server import QmpServer

log = logging.getLogger("stratovirt_py")

LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warn": logging.WARNING, "error": logging.ERROR}


class StratoVirtFormatter(logging.Formatter):
    """StratoVirt's line format, which Kata's log parsing expects:
    `2026-01-02T03:04:05.123456789: [pid][tid][file:line]:LEVEL: message`."""

    LEVEL_NAMES: ClassVar[dict[str, str]] = {"WARNING": "WARN", "CRITICAL": "ERROR"}

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        nanos = int((record.created - seconds) * 1e9)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))
        level = self.LEVEL_NAMES.get(record.levelname, record.levelname)
        text = (f"{stamp}.{nanos:09d}: [{record.process}][{record.thread_native_id}]"
                f"[{record.filename}:{record.lineno}]:{level}: {record.getMessage()}")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _NativeThreadId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.thread_native_id = threading.get_native_id()
        return True


def setup_logging(config: MachineConfig) -> None:
    level_name = os.environ.get("STRATOVIRT_LOG_LEVEL", "info").lower()
    level = LOG_LEVELS.get(level_name)
    if level is None:
        raise ConfigError(f"invalid STRATOVIRT_LOG_LEVEL '{level_name}' "
                          f"(use one of {', '.join(LOG_LEVELS)})")
    if config.log_file:
        try:
            handler: logging.Handler = logging.FileHandler(config.log_file)
        except OSError as exc:
            raise ConfigError(f"cannot open log file '{config.log_file}': {exc.strerror}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StratoVirtFormatter())
    handler.addFilter(_NativeThreadId())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


@contextlib.contextmanager
def pidfile(path: str | None) -> Iterator[None]:
    """Writes our pid to `path`, which must not exist, and removes it at exit."""
    if path is None:
        yield
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise ConfigError(f"pid file '{path}' already exists") from None
    except OSError as exc:
        raise ConfigError(f"cannot create pid file '{path}': {exc.strerror}") from None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def daemonize() -> int:
    """Double-forks into the background; returns, in the daemon, a pipe to report readiness.

    The original process waits on that pipe and exits 0 once the VM is built
    and its sockets exist, or 1 with the daemon's error message, so errors
    still reach the user's terminal.
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        message = b""
        while chunk := os.read(read_end, 4096):
            message += chunk
        if message == b"ready":
            os._exit(0)
        sys.stderr.write(message.decode(errors="replace") or
                         "stratovirt-py: error: the daemon exited during start-up\n")
        os._exit(1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return write_end


def _report_to_parent(pipe: int | None, message: bytes) -> None:
    if pipe is None:
        return
    with contextlib.suppress(OSError):
        os.write(pipe, message)
        os.close(pipe)


def launch(config: MachineConfig) -> int:
    """Runs the VM described by `config` until it ends; returns the process exit status."""
    if config.daemonize:
        config = config.with_absolute_paths()
    if config.pidfile and os.path.lexists(config.pidfile):
        raise ConfigError(f"pid file '{config.pidfile}' already exists")
    setup_logging(config)
    ready_pipe = daemonize() if config.daemonize else None
    try:
        status = _run(config, ready_pipe)
    except (MonitorError, KvmError) as exc:
        _report_to_parent(ready_pipe, error_line(exc).encode())
        if ready_pipe is None:
            raise MonitorError(str(exc)) from None
        log.error("%s", exc)
        return 1
    return status


def _log_fd() -> int:
    """Where the seccomp reporter writes: the log file or stderr, as the logging does."""
    for handler in log.handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None:
            return stream.fileno()
    return 2


def _run(config: MachineConfig, ready_pipe: int | None) -> int:
    # Before the I/O threads start (build_vm): they enter their filter as they start.
    sandbox.prepare(sandbox.mode_for(config.seccomp), _log_fd())
    loop = EventLoop()
    machine = MicroVM(config, loop)
    # Before anything that must be cleaned up exists: a signal from now on is
    # held until the loop runs, and then ends the VM the orderly way.
    for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signo, _on_signal, machine, signo)
    qmp: QmpServer | None = None
    try:
        with pidfile(config.pidfile):
            # Sockets first: a path that exists is refused before any VM work.
            qmp = QmpServer(machine, loop, config.qmp_sockets)
            machine.event_listeners.append(qmp.broadcast_event)
            build_vm(machine)
            qmp.start()
            machine.launch_vcpus()
            # Set-up is done: from here the main thread and every thread it starts may only
            # make the calls on its list (the vCPU and I/O threads have their own).
            sandbox.enter(sandbox.ThreadKind.MAIN)
            machine.start()
            _report_to_parent(ready_pipe, b"ready")
            request = loop.run_until_complete(machine.exited)
            if request.status:
                log.error("%s", request.message)
                if config.log_file and ready_pipe is None:
                    # The log is in a file; the person at the terminal must see this too.
                    sys.stderr.write(error_line(request.message))
            else:
                log.info("VM exits: %s", request.message)
            return request.status
    finally:
        # No command may start (or still run) on a machine being torn down; the
        # clients are told the rest (SHUTDOWN) and let go once it is down.
        if qmp is not None:
            qmp.stop_serving()
        machine.destroy()
        if qmp is not None:
            qmp.close()
        loop.close()


def _on_signal(machine: MicroVM, signo: int) -> None:
    machine.request_exit(ExitRequest(0, False, "host-signal",
                                     f"shut down by signal {signal.Signals(signo).name}"))
