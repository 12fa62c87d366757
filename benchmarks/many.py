"""Ten VMs started at once (`many.*`): the per-VM probe and the arithmetic.

The run itself (`harness.run_many`) execs the monitors one after the other as
fast as it can and starts each VM's probe on a thread of its own right after
that VM's exec, so no VM waits for another's probe:
    connect as soon as the socket accepts -> greeting -> qmp_capabilities ->
    query-status until running (`metrics.wait_running`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import metrics
from benchmarks.metrics import NS_PER_MS, ProbeError


@dataclass
class VmStart:
    """One VM's way to running, and its QMP connection (kept for `quit`)."""

    greeted_ns: int
    running_ns: int
    queries: int
    client: metrics.QmpClient


def probe_running(path: Path, deadline_ns: int, alive: Callable[[], bool]) -> VmStart:
    greeted, client = metrics.connect_qmp(path, deadline_ns, alive)
    try:
        client.execute("qmp_capabilities")
        running, queries = metrics.wait_running(client, deadline_ns, alive)
    except BaseException:
        client.close()
        raise
    return VmStart(greeted, running, queries, client)


def all_running_ms(exec_ns: Sequence[int], running_ns: Sequence[int]) -> float:
    """The first exec -> the last VM's `running` reply, in ms."""
    if not exec_ns or len(exec_ns) != len(running_ns):
        raise ValueError(f"{len(exec_ns)} execs against {len(running_ns)} running times")
    for index, (started, running) in enumerate(zip(exec_ns, running_ns, strict=True)):
        if running < started:
            raise ValueError(f"VM {index} answered running before its exec")
    return (max(running_ns) - min(exec_ns)) / NS_PER_MS


def total_overhead_mib(overheads: Sequence[int]) -> float:
    """The sum of the VMs' non-guest RSS (bytes each), in MiB."""
    if any(value < 0 for value in overheads):
        raise ProbeError(f"a negative overhead RSS: {list(overheads)}")
    return sum(overheads) / (1 << 20)
