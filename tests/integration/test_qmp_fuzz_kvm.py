"""QMP fuzzing in CI: fuzz/qmp's campaign, fixed seed, a small budget, against a real monitor.

The monitor runs with the idling freestanding guest inside a network namespace
of its own (netdev_add opens taps there).  Every input must be answered with
valid QMP output (or a dropped connection), the monitor must live and keep the
guest running, drop a client that never reads, and its RSS and open files must not
run away.
"""

from __future__ import annotations

import re

import pytest

from fuzz.qmp.fuzzer import Campaign, real_monitor
from fuzz.qmp.generators import InputGenerator
from tests.netns import netns_unavailable

pytestmark = pytest.mark.kvm

INPUTS = 30_000
SEED = 20261203


def test_thirty_thousand_fuzzed_inputs_get_valid_replies(tmp_path):
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"the fuzzed monitor runs in a network namespace: {reason}")
    with real_monitor(tmp_path / "monitor.stderr") as (monitor, env, _workdir):
        campaign = Campaign(monitor, InputGenerator(SEED, env), tmp_path / "findings",
                            log=lambda _line: None)
        try:
            # A health check every 6000 inputs; the fourth one is preceded by side clients
            # (one leaves with fds and half a value, one floods without reading).
            stats = campaign.run(INPUTS, seconds=300, max_findings=5, check_every=6_000)
        finally:
            campaign.close()
    details = "\n".join(f"{f.kind}: {f.message} {f.details}" for f in stats.findings)
    assert not stats.findings, details
    assert stats.inputs == INPUTS
    # Most inputs are whole commands: each got its reply (structural garbage may merge values).
    assert stats.replies > INPUTS
    assert stats.health_checks >= 6 and stats.restarts == 0
    assert stats.dropped == 1  # the flooding client, and only it
    assert {"schema", "raw", "truncate", "flip", "split", "nest", "huge"} <= set(stats.kinds)
    assert stats.rss_end < stats.rss_start + 32 * 1024, (stats.rss_start, stats.rss_end)
    assert stats.fds_end < stats.fds_start + 16, (stats.fds_start, stats.fds_end)
    # All of it under the seccomp allow-list, on every thread.
    assert re.fullmatch(r"seccomp filter on (\d+) of \1 threads", stats.sandbox), stats.sandbox
