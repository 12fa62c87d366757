"""The seccomp allow-list, installed by the monitor's own code path in a child process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stratovirt_py import sandbox
from stratovirt_py.sandbox import SandboxError, SandboxMode, ThreadKind
from tests.helpers import REPO, monitor_env

SIGSYS_STATUS = -signal.SIGSYS


def run_filtered(kinds: str, action: str, mode: str = "ENFORCE", log_path: Path | None = None,
                 end: str = "os._exit(0)") -> subprocess.CompletedProcess:
    """Runs `action` in a fresh Python after entering the filters named in `kinds` (in
    order; more than one stack); prints 'entered' before and 'survived' after."""
    log_fd = f"os.open({str(log_path)!r}, os.O_WRONLY | os.O_CREAT, 0o600)" if log_path else "2"
    script = textwrap.dedent(f"""
        import fcntl, mmap, os, socket, sys, termios, threading, time  # a C module loaded
                                                                       # later needs PROT_EXEC
        from stratovirt_py import sandbox
        sandbox.prepare(sandbox.SandboxMode.{mode}, {log_fd})
        for kind in {kinds.split()!r}:
            sandbox.enter(sandbox.ThreadKind[kind])
        print("entered", flush=True)
        {action}
        print("survived", flush=True)
        {end}  # os._exit: the interpreter's own clean-up is not something a vCPU ever does
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=monitor_env(), cwd=REPO)


def assert_killed(result: subprocess.CompletedProcess, number: int, name: str,
                  kind: str) -> None:
    assert result.returncode == SIGSYS_STATUS, (result.returncode, result.stderr)
    assert result.stdout == "entered\n"
    assert re.search(rf"^stratovirt-py: seccomp: bad system call {number} \({name}: "
                     rf"(0x[0-9a-f]+, ){{5}}0x[0-9a-f]+\) on thread \d+ \({kind} filter\): "
                     "the monitor is killed with SIGSYS$",
                     result.stderr, re.M), result.stderr


def test_a_call_outside_the_main_list_kills_with_sigsys_and_is_logged_first():
    assert_killed(run_filtered("MAIN", "socket.socket()"), 41, "socket", "main")


def test_the_main_thread_may_start_threads_but_never_a_process():
    threads = run_filtered("MAIN", "t = threading.Thread(target=print); t.start(); t.join()")
    assert threads.returncode == 0, threads.stderr
    assert threads.stdout == "entered\n\nsurvived\n"
    assert_killed(run_filtered("MAIN", "os.fork()"), 56, "clone", "main")


def test_python_exits_with_daemon_threads_running():
    # At exit a daemon thread ends through pthread_exit, for which glibc loads libgcc_s:
    # prepare() loads it beforehand, as mapping it under the filter would be refused.
    result = run_filtered("MAIN", "threading.Thread(target=lambda: [time.sleep(0.001) for _ in "
                                  "iter(int, 1)], daemon=True).start(); time.sleep(0.01)",
                          end="sys.exit(0)")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "entered\nsurvived\n"


def test_only_listed_ioctl_requests():
    # FIONREAD is nobody's; FIONBIO is the main thread's, not a vCPU's.
    assert_killed(run_filtered("MAIN", "fcntl.ioctl(1, termios.FIONREAD, b'1234')"),
                  16, "ioctl", "main")
    allowed = run_filtered("MAIN", "fcntl.ioctl(1, termios.FIONBIO, b'\\0\\0\\0\\0')")
    assert allowed.returncode == 0, allowed.stderr
    assert_killed(run_filtered("VCPU", "fcntl.ioctl(1, termios.FIONBIO, b'\\0\\0\\0\\0')"),
                  16, "ioctl", "vcpu")


def test_no_new_executable_memory():
    assert_killed(run_filtered("MAIN", "mmap.mmap(-1, 4096, prot=mmap.PROT_READ | "
                                       "mmap.PROT_EXEC)"), 9, "mmap", "main")


def test_a_vcpu_cannot_open_files_and_is_told_so_politely():
    result = run_filtered("VCPU", textwrap.dedent("""
        try:
            open("/etc/hostname")
        except PermissionError:
            print("EACCES", flush=True)
        """).replace("\n", "\n        "))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "entered\nEACCES\nsurvived\n"


def test_the_vcpu_list_is_narrower_than_the_main_one():
    # unlink is on the main thread's list, not on a vCPU's.
    assert_killed(run_filtered("VCPU", "os.unlink('/nonexistent')"), 87, "unlink", "vcpu")


def test_the_iothread_filter_is_the_narrowest():
    assert_killed(run_filtered("IO", "os.getcwd()"), 79, "getcwd", "iothread")


def test_the_report_goes_to_the_log_file(tmp_path):
    log = tmp_path / "monitor.log"
    result = run_filtered("MAIN", "socket.socket()", log_path=log)
    assert result.returncode == SIGSYS_STATUS
    # AF_INET, SOCK_STREAM | SOCK_CLOEXEC
    assert "bad system call 41 (socket: 0x2, 0x80001, 0x0, " in log.read_text()
    assert "seccomp" not in result.stderr


def test_log_mode_lets_calls_through():
    result = run_filtered("MAIN", "socket.socket().close()", mode="LOG")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "entered\nsurvived\n"


def test_off_loads_no_filter():
    result = run_filtered("MAIN VCPU", "print(open('/proc/self/status').read().count("
                                       "'Seccomp:\\t0'))", mode="OFF")
    assert result.stdout == "entered\n1\nsurvived\n", result.stderr


def test_mode_comes_from_the_option_and_the_environment(monkeypatch):
    monkeypatch.delenv("STRATOVIRT_SECCOMP", raising=False)
    assert sandbox.mode_for(False) is SandboxMode.OFF
    assert sandbox.mode_for(True) is SandboxMode.ENFORCE
    monkeypatch.setenv("STRATOVIRT_SECCOMP", "log")
    assert sandbox.mode_for(True) is SandboxMode.LOG
    assert sandbox.mode_for(False) is SandboxMode.OFF
    monkeypatch.setenv("STRATOVIRT_SECCOMP", "maybe")
    with pytest.raises(SandboxError, match="invalid STRATOVIRT_SECCOMP 'maybe'"):
        sandbox.mode_for(True)


def test_every_rule_names_a_call_and_why():
    rules = sandbox.rules()
    assert len(rules) > 40
    seen = set()
    for name, kinds, _condition, why in rules:
        assert kinds and why, name
        for kind in kinds:
            assert (name, kind) not in seen, f"{name} listed twice for {kind.name}"
            seen.add((name, kind))
    # Each kind can end its thread and the process, and the reporter's calls are everywhere.
    for kind in ThreadKind:
        for name in ("exit", "exit_group", "write", "getpid", "gettid", "tgkill"):
            assert (name, kind) in seen, (name, kind)


def test_the_readme_lists_the_allow_list_as_built():
    readme = (REPO / "README.md").read_text()
    assert sandbox.markdown_table() in readme, \
        "README's seccomp table is stale: paste `.venv/bin/python -m stratovirt_py.sandbox`"
