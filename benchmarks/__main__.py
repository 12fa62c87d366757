"""Command line of the benchmark: `python3 -m benchmarks` (what `scripts/bench` runs)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from benchmarks import balloon, cpu, harness, report
from benchmarks.metrics import (
    BLOCK_WORKLOADS,
    FRAME_WORKLOADS,
    GROUPS,
    MANY_VMS,
    METRICS,
    MiB,
)
from tests.netns import netns_unavailable

DEFAULTS = {
    # guest: (reps, warm-up pairs, settle seconds, per-run timeout seconds)
    "svtest": (10, 1, 1.0, 30.0),
    # Linux boots take 40-60 s on an emulating (kvm_pvm) host: few reps, and no
    # warm-up pair, whose two boots would cost as much as a measured pair.
    "linux": (3, 0, 10.0, 300.0),
}
# The block metric boots once per workload, cache mode and monitor (24 runs a pair):
# fewer pairs keep it to a few minutes.  --reps sets every metric's pairs.
BLOCK_REPS = 5
BLOCK_IMAGE_BYTES = 256 * MiB
# Metrics a guest can take (blk-bench is an svtest action).
GUEST_GROUPS = {"svtest": GROUPS, "linux": tuple(g for g in GROUPS if g != "block")}


BALLOON_PLANS = {"svtest": balloon.SVTEST_PLAN, "linux": balloon.LINUX_PLAN}


def _plan_text(plan: balloon.BalloonPlan) -> str:
    return f"{plan.mem_mib},{plan.target_mib},{plan.touch_mib}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmarks stratovirt-py against QEMU microvm in alternating pairs.")
    parser.add_argument("--guest", choices=sorted(DEFAULTS), default="svtest")
    parser.add_argument("--reps", type=int,
                        help=f"measured pairs (svtest 10 and block {BLOCK_REPS}, linux 3)")
    parser.add_argument("--warmup", type=int, help="warm-up pairs, discarded (svtest 1, linux 0)")
    parser.add_argument("--metrics",
                        help=f"comma-separated subset of {','.join(GROUPS)} (all that the "
                             "guest and host can take: block is svtest only, net needs root "
                             "for its network namespaces; balloon boots with its own -m, "
                             "see --balloon-plan; many starts ten VMs at once)")
    parser.add_argument("--monitors", default="ours,qemu", help="comma-separated: ours,qemu")
    parser.add_argument("--output", type=Path,
                        help="JSON results (default bench-results/<date>-<guest>.json)")
    parser.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (256)")
    parser.add_argument("--qmp-requests", type=int, default=2000,
                        help="query-status commands per QMP probe (2000)")
    parser.add_argument("--settle", type=float,
                        help="seconds the guest idles before the memory sample "
                             "(svtest 1 after 'svtest: done', linux 10 after 'Run /init')")
    parser.add_argument("--timeout", type=float,
                        help="seconds a run may take to boot or exit (svtest 30, linux 300)")
    parser.add_argument("--kernel", type=Path, help="Linux guest kernel (build/guest/vmlinux)")
    parser.add_argument("--initrd", type=Path,
                        help="Linux guest initramfs (build/guest/initramfs.cpio)")
    parser.add_argument("--append", default="",
                        help="extra guest command-line arguments, given to both monitors")
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    parser.add_argument("--balloon-plan", metavar="MEM,TARGET,TOUCH",
                        help="the balloon metric's guest RAM, balloon target and memory the "
                             "guest fills first, MiB (svtest "
                             f"{_plan_text(balloon.SVTEST_PLAN)}, linux "
                             f"{_plan_text(balloon.LINUX_PLAN)})")
    args = parser.parse_args(argv)
    reps, warmup, settle, timeout = DEFAULTS[args.guest]
    args.block_reps = BLOCK_REPS if args.reps is None else args.reps
    args.reps = reps if args.reps is None else args.reps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.settle = settle if args.settle is None else args.settle
    args.timeout = timeout if args.timeout is None else args.timeout
    if args.balloon_plan is None:
        args.balloon_plan = BALLOON_PLANS[args.guest]
    else:
        try:
            args.balloon_plan = balloon.parse_plan(args.balloon_plan)
        except ValueError as error:
            parser.error(f"--balloon-plan: {error}")
    if args.reps < 1 or args.warmup < 0 or args.qmp_requests < 1 or args.mem < 1:
        parser.error("--reps, --qmp-requests and --mem must be positive, --warmup >= 0")
    allowed = GUEST_GROUPS[args.guest]
    if args.metrics is None:
        # net only where it can run: it makes network namespaces and taps.
        args.metrics = ",".join(g for g in allowed if g != "net" or netns_unavailable() is None)
    args.groups = frozenset(g.strip() for g in args.metrics.split(",") if g.strip())
    if not args.groups or not args.groups <= set(allowed):
        parser.error(f"--metrics must be a subset of {','.join(allowed)} for the "
                     f"{args.guest} guest")
    args.monitor_names = [m.strip() for m in args.monitors.split(",") if m.strip()]
    if not args.monitor_names or not set(args.monitor_names) <= set(harness.MONITORS) or len(
            set(args.monitor_names)) != len(args.monitor_names):
        parser.error("--monitors must list ours and/or qemu, once each")
    return args


def build_svtest() -> Path:
    """The freestanding guest, rebuilt by its own builder only when a source changed."""
    spec = importlib.util.spec_from_file_location("svtest_build",
                                                  harness.REPO / "tests/guest/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_guest(harness.REPO / "build" / "svtest")


def make_guest(args: argparse.Namespace) -> harness.Guest:
    if args.guest == "svtest":
        guest = harness.svtest_guest(build_svtest(), args.settle, args.timeout)
    else:
        kernel = args.kernel or harness.REPO / "build/guest/vmlinux"
        initrd = args.initrd or harness.REPO / "build/guest/initramfs.cpio"
        guest = harness.linux_guest(kernel, initrd, args.settle, args.timeout)
    return harness.with_extra_cmdline(guest, args.append)


def print_progress(record: harness.RunRecord, reps: int) -> None:
    label = "warm-up" if record.warmup else f"pair {record.pair + 1}/{reps}"
    if record.error:
        text = f"FAILED: {record.error}"
    else:
        # As the table prints them: 11701 ms, not 1.17e+04 ms.
        text = ", ".join(f"{name.partition('.')[2]} {report.number(value)} {METRICS[name].unit}"
                         for name, value in record.values.items())
    print(f"bench: {label} {record.kind} {record.monitor}: {text}", file=sys.stderr, flush=True)


def _terminated(signum: int, frame: object) -> None:
    # A SIGTERM ends the benchmark as Ctrl-C does: the runs' finally blocks kill
    # the monitors and remove the network namespaces.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminated)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench: /dev/kvm is missing or not accessible", file=sys.stderr)
        return 2
    if "qemu" in args.monitor_names and shutil.which(args.qemu) is None:
        print(f"bench: {args.qemu} not found (apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    try:
        guest = make_guest(args)
    except harness.GuestUnavailable as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    block = "block" in args.groups
    if "net" in args.groups and (reason := netns_unavailable()):
        print(f"bench: the net metric cannot run here: {reason}", file=sys.stderr)
        return 2
    settings = harness.Settings(mem_mib=args.mem, smp=1, qmp_requests=args.qmp_requests,
                                groups=args.groups, python=sys.executable, qemu=args.qemu,
                                block_reps=args.block_reps if block else None,
                                balloon_plan=args.balloon_plan)
    monitors = [harness.MONITORS[name] for name in args.monitor_names]
    started = dt.datetime.now()
    output = args.output or (harness.REPO / "bench-results" /
                             f"{started:%Y-%m-%d-%H%M%S}-{guest.name}.json")
    names = harness.expected_metrics(guest, args.groups)
    block_text = f" (block {args.block_reps})" if block and args.block_reps != args.reps else ""
    print(f"bench: {guest.name} guest, {args.reps} pairs{block_text} + {args.warmup} warm-up, "
          f"metrics {','.join(sorted(args.groups))}, monitors {','.join(args.monitor_names)}",
          file=sys.stderr, flush=True)
    interrupted = False
    records: list[harness.RunRecord] = []
    with tempfile.TemporaryDirectory(prefix="svpy-bench-") as workdir:
        if block:
            image = Path(workdir) / "disk.img"
            try:
                harness.make_disk_image(image, BLOCK_IMAGE_BYTES)
            except harness.DiskImageError as error:
                print(f"bench: {error}", file=sys.stderr)
                return 2
            settings = dataclasses.replace(settings, block_image=image)
        try:
            records = harness.run_pairs(monitors, guest, settings, args.reps, args.warmup,
                                        Path(workdir), print_progress)
        except KeyboardInterrupt:
            # The runs' own finally blocks have killed the monitors by now.
            interrupted = True
    rows = report.metric_rows(records, names, args.monitor_names, args.reps,
                              harness.metric_reps(names, settings, args.reps))
    document = {
        "host": report.host_facts(args.qemu if "qemu" in args.monitor_names else None),
        "config": {
            "guest": guest.name, "kernel": str(guest.kernel),
            "initrd": str(guest.initrd) if guest.initrd else None,
            "session_cmdline": guest.session_cmdline, "boot_cmdline": guest.boot_cmdline,
            "reps": args.reps, "warmup": args.warmup, "metrics": sorted(args.groups),
            "monitors": args.monitor_names, "mem_mib": args.mem, "smp": 1,
            "qmp_requests": args.qmp_requests, "settle_s": args.settle,
            "timeout_s": args.timeout, "interrupted": interrupted,
            "block": {
                "reps": args.block_reps, "image_bytes": BLOCK_IMAGE_BYTES,
                "workloads": [dataclasses.asdict(w) for w in BLOCK_WORKLOADS],
                "cmdlines": {case.metric: guest.block_cmdline(case)
                             for case in harness.block_cases(guest, args.groups)},
                "cpu_clock_ticks_per_s": cpu.CLOCK_TICKS,
            } if block else None,
            "many": {"vms": MANY_VMS, "cmdline": guest.session_cmdline}
            if "many" in args.groups else None,
            "net": {
                "linux_plan": dataclasses.asdict(settings.net_plan),
                "frame_workloads": [dataclasses.asdict(w) for w in FRAME_WORKLOADS],
                "frame_cmdlines": {w.metric: guest.net_cmdline(w)
                                   for w in harness.frame_workloads(guest, args.groups)},
            } if "net" in args.groups else None,
            "balloon": {
                "plan": dataclasses.asdict(args.balloon_plan),
                "cmdline": guest.balloon_cmdline(args.balloon_plan),
                "linux_touch": (balloon.linux_touch_command(args.balloon_plan)
                                if guest.name == "linux" else None),
            } if "balloon" in args.groups else None,
        },
        "metrics": rows,
        "runs": [r.as_dict() for r in records],
    }
    report.write_json(output, document)
    print(report.format_table(rows, args.monitor_names, args.reps))
    failed = report.failures(records)
    if failed:
        print(f"\n{len(failed)} failed run(s):")
        for line in failed:
            print(f"  {line}")
    print(f"\nresults: {output}")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
