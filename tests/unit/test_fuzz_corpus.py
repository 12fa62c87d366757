"""The data plane's checked-in fuzz corpus, replayed under ASan and UBSan.

scripts/fuzz builds the libFuzzer targets (clang-15, cached in build/fuzz by a
hash of the sources and flags) and runs every file of fuzz/corpus/<target>
once: no sanitizer report, no harness invariant broken, every file executed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FUZZ = REPO / "scripts" / "fuzz"
REQUIRED = {"virtqueue", "blk", "net", "balloon", "console"}


def c_targets() -> list[str]:
    listed = subprocess.run([sys.executable, str(FUZZ), "--list"], capture_output=True,
                            text=True, check=True)
    return [name for name in listed.stdout.split() if name != "qmp"]


def test_every_data_plane_part_has_a_target_and_seeds() -> None:
    targets = c_targets()
    assert set(targets) >= REQUIRED
    for target in targets:
        assert (REPO / "fuzz" / "dataplane" / f"fuzz_{target}.c").is_file()
        seeds = list((REPO / "fuzz" / "corpus" / target).glob("seed-*"))
        assert len(seeds) >= 3, target
        assert all(0 < seed.stat().st_size <= 4096 for seed in seeds)


def test_corpus_replays_clean() -> None:
    proc = subprocess.run([sys.executable, str(FUZZ), "--replay"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    for target in c_targets():
        files = [p for p in (REPO / "fuzz" / "corpus" / target).iterdir() if p.is_file()]
        match = re.search(rf"^replay {target}: (\d+)/(\d+) files executed, ok$", proc.stdout,
                          re.M)
        assert match, proc.stdout
        assert int(match[1]) == int(match[2]) == len(files) > 0
