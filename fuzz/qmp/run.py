"""Fuzzes a real monitor's QMP socket: `.venv/bin/python fuzz/qmp/run.py [--inputs N]
[--time SECONDS] [--seed S] [--out DIR] [--replay DIR/batch.json]`.

Stops at whichever limit comes first; exits 0 iff there was no finding.  Needs
root (a network namespace with taps) and /dev/kvm.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.qmp.fuzzer import BATCH, CHECK_EVERY, TIMEOUT, Campaign, Stats, real_monitor, replay
from fuzz.qmp.generators import FUZZED_COMMANDS, VM_ENDING_COMMANDS, InputGenerator
from stratovirt_py.qmp.registry import COMMANDS
from tests.netns import netns_unavailable


def report(stats: Stats) -> None:
    print(stats.summary())
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(stats.kinds.items()))
    print(f"qmp: inputs by generator: {kinds}")
    print(f"qmp: {len(FUZZED_COMMANDS)} commands fuzzed; left out (they end the VM): "
          f"{', '.join(VM_ENDING_COMMANDS)}")
    print(f"qmp: {stats.events} events, {stats.health_checks} health checks, "
          f"{stats.restarts} monitor restarts, {stats.elapsed:.1f} s")
    print(f"qmp: monitor RSS {stats.rss_start} KiB at start, {stats.rss_end} KiB at end; "
          f"open fds {stats.fds_start} -> {stats.fds_end}; {stats.sandbox} (at start)")
    # Only the commands the monitor knows (fuzzed names are any string at all).
    commands = sorted({command for command, _ in stats.outcomes} & set(COMMANDS))
    print("qmp: replies by command (return/error): " + ", ".join(
        f"{c} {stats.outcomes.get((c, 'return'), 0)}/{stats.outcomes.get((c, 'error'), 0)}"
        for c in commands))
    for signature, count in stats.distinct().items():
        print(f"qmp: distinct finding, {count} time(s): {signature}")
    for number, finding in enumerate(stats.findings, 1):
        print(f"qmp: finding {number}: {finding.kind}: {finding.message}")
        for key, value in finding.details.items():
            print(f"    {key}: {str(value)[:2000]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--time", type=float, default=3600.0, help="seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--check-every", type=int, default=CHECK_EVERY)
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help="seconds of silence, while replies are owed, that make a hang")
    parser.add_argument("--out", type=Path, default=None,
                        help="where findings are saved (default: a new temporary directory)")
    parser.add_argument("--replay", type=Path, default=None,
                        help="send a saved batch.json to a fresh monitor instead of fuzzing")
    args = parser.parse_args(argv)
    reason = netns_unavailable()
    if reason:
        print(f"qmp: cannot fuzz here: the monitor runs in a network namespace: {reason}")
        return 2
    # SIGTERM (a timeout, scripts/fuzz) unwinds like ^C: the monitor is killed, the
    # namespace and its taps removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = args.out or Path(tempfile.mkdtemp(prefix="qmpfuzz-findings-"))
    with real_monitor(out / "monitor.stderr") as (monitor, env, _workdir):
        generator = InputGenerator(args.seed, env)
        campaign = Campaign(monitor, generator, out, timeout=args.timeout)
        try:
            if args.replay is not None:
                finding = replay(campaign, args.replay)
                verdict = "no finding" if finding is None else \
                    f"{finding.kind}: {finding.message}"
                print(f"qmp: replay of {args.replay}: {verdict}")
                if finding is not None:
                    for key, value in finding.details.items():
                        print(f"    {key}: {str(value)[:2000]}")
                return 0 if finding is None else 1
            print(f"qmp: seed {args.seed}, findings go to {out}")
            stats = campaign.run(args.inputs, args.time, check_every=args.check_every,
                                 batch=args.batch)
        finally:
            campaign.close()
    report(stats)
    return 0 if not stats.findings else 1


if __name__ == "__main__":
    sys.exit(main())
