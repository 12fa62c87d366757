"""The results table and the JSON results file, with the facts about the host."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, RunRecord, samples_by_pair
from benchmarks.metrics import CPU_UNIT, METRICS
from benchmarks.stats import Summary, ratio_summary, summarize

KVM_MODULES = ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm")


def _command_output(argv: list[str]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def git_revision() -> str | None:
    revision = _command_output(["git", "rev-parse", "--short", "HEAD"])
    if revision is None:
        return None
    # Untracked files count too: a new, uncommitted module changes what runs.
    status = _command_output(["git", "status", "--porcelain"])
    return revision + ("-dirty" if status else "")


def host_facts(qemu: str | None) -> dict[str, Any]:
    qemu_version = _command_output([qemu, "--version"]) if qemu else None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kvm_modules": [m for m in KVM_MODULES if os.path.isdir(f"/sys/module/{m}")],
        "qemu_version": qemu_version.splitlines()[0] if qemu_version else None,
        "python": platform.python_version(),
        "git_revision": git_revision(),
    }


def metric_rows(records: list[RunRecord], names: list[str], monitors: list[str], reps: int,
                metric_reps: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Per metric: samples by pair, summaries per monitor and of the paired ratios.

    `metric_reps` gives the metrics measured in fewer pairs than `reps` their count.
    """
    rows = []
    for name in names:
        info = METRICS[name]
        pairs = (metric_reps or {}).get(name, reps)
        samples = {m: samples_by_pair(records, name, m, pairs) for m in monitors}
        row: dict[str, Any] = {
            "metric": name, "unit": info.unit, "better": info.better, "label": info.label,
            "reps": pairs, "samples": samples,
        }
        for monitor in monitors:
            summary = summarize([v for v in samples[monitor] if v is not None])
            row[monitor] = summary.as_dict() if summary else None
        if "ours" in samples and "qemu" in samples:
            ratio = ratio_summary(samples["ours"], samples["qemu"])
            row["ratio_ours_over_qemu"] = ratio.as_dict() if ratio else None
        rows.append(row)
    return rows


def number(value: float) -> str:
    """Four significant digits, without an exponent for the usual magnitudes."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(summary: dict[str, float] | None, reps: int) -> str:
    if summary is None:
        return f"- (0/{reps})"
    s = Summary(**summary)
    count = "" if s.n == reps else f" ({s.n}/{reps})"
    return f"{number(s.median)} [{number(s.min)}-{number(s.max)}]{count}"


def format_table(rows: list[dict[str, Any]], monitors: list[str], reps: int) -> str:
    header = ["metric", "unit", "better"]
    header += [f"{m} median [min-max]" for m in monitors]
    paired = "ours" in monitors and "qemu" in monitors
    if paired:
        header.append("ours/qemu (median of pair ratios)")
    lines = [header]
    for row in rows:
        cells = [row["metric"], row["unit"], row["better"]]
        cells += [_cell(row[m], row.get("reps", reps)) for m in monitors]
        if paired:
            ratio = row.get("ratio_ours_over_qemu")
            cells.append(f"{ratio['median']:.3f} (n={ratio['n']})" if ratio else "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            .rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    if paired:
        text.append("")
        text.append("ratio = median over pairs i of ours_i / qemu_i. For times (ms, us) and "
                    "memory (MiB), < 1 means ours is faster/smaller;")
        higher = sorted({row["unit"] for row in rows if row["better"] == "higher"
                         and row["unit"] != "MiB"})
        if higher:
            text.append(f"for rates ({', '.join(higher)}, higher is better), > 1 means ours "
                        "does more per second.")
        if any(row["unit"] == CPU_UNIT for row in rows):
            text.append(f"for the monitor's CPU time per 1000 requests ({CPU_UNIT}), < 1 means "
                        "ours used less CPU.")
        if any(row["better"] == "higher" and row["unit"] == "MiB" for row in rows):
            # balloon.rss-drop: memory given back, where more is better.
            text.append("for memory given back (MiB, higher is better), > 1 means ours "
                        "gave back more.")
    return "\n".join(text)


def failures(records: list[RunRecord]) -> list[str]:
    return [f"pair {r.pair}{' (warm-up)' if r.warmup else ''} {r.kind} {r.monitor}: {r.error}"
            for r in records if r.error]


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    temporary.replace(path)
