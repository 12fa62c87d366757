"""Build the svtest guest ELF for the test suite.

``build_guest(out_dir)`` compiles ``tests/guest/*.c`` and ``*.S`` with gcc into
``out_dir/svtest-guest.elf`` and returns its path.  It rebuilds only when a source,
header, the linker script, the flags or the compiler changed (a SHA-256 fingerprint
is kept next to the ELF), builds in a temporary directory and renames the result
into place under a lock, so parallel test workers can share one ``out_dir``.

The Makefile takes its flags from here (``python3 build.py --print-cflags``), so
``make`` and the test suite build the same guest.

Run as a script: ``python3 tests/guest/build.py [OUT_DIR]`` prints the ELF path.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import pathlib
import struct
import subprocess
import sys
import tempfile

GUEST_DIR = pathlib.Path(__file__).resolve().parent
ELF_NAME = "svtest-guest.elf"
LINKER_SCRIPT = "guest.ld"
LOAD_ADDRESS = 0x200000
CC = "gcc"

CFLAGS: tuple[str, ...] = (
    "-std=gnu11",
    "-m64",
    "-march=x86-64",
    "-ffreestanding",
    "-nostdlib",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fcf-protection=none",  # no ENDBR64: the emulating host may not decode it
    "-fno-asynchronous-unwind-tables",
    "-fno-delete-null-pointer-checks",  # the guest reads low physical addresses
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
)
LDFLAGS: tuple[str, ...] = (
    "-static",
    "-no-pie",
    f"-Wl,-T,{LINKER_SCRIPT}",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,-z,noexecstack",
)

PT_LOAD = 1
PT_NOTE = 4


class GuestBuildError(RuntimeError):
    """The guest could not be built; the message carries the compiler's output."""


def guest_sources() -> list[pathlib.Path]:
    """The files compiled into the guest (.S first, so the entry code leads .text)."""
    return sorted(GUEST_DIR.glob("*.S")) + sorted(GUEST_DIR.glob("*.c"))


def _fingerprint_inputs() -> list[pathlib.Path]:
    return guest_sources() + sorted(GUEST_DIR.glob("*.h")) + [GUEST_DIR / LINKER_SCRIPT]


def _compiler_version() -> str:
    try:
        result = subprocess.run([CC, "--version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestBuildError(
            f"{CC} not found: the test guest needs gcc (apt-get install gcc)"
        ) from None
    return result.stdout


def _fingerprint() -> str:
    digest = hashlib.sha256()
    digest.update(_compiler_version().encode())
    digest.update("\0".join(CFLAGS + LDFLAGS).encode())
    for path in _fingerprint_inputs():
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _check_elf(path: pathlib.Path) -> None:
    """Fails unless the file is an x86-64 ELF with PT_LOADs at 2 MiB+ and a PT_NOTE."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or struct.unpack_from("<H", data, 18)[0] != 62:
        raise GuestBuildError(f"{path}: not an ELF64 x86-64 executable")
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    loads: list[tuple[int, int]] = []
    has_note = False
    for i in range(phnum):
        p_type, _flags, _offset, vaddr, paddr = struct.unpack_from(
            "<IIQQQ", data, phoff + i * phentsize
        )
        if p_type == PT_LOAD:
            loads.append((vaddr, paddr))
        has_note |= p_type == PT_NOTE
    if not loads or any(v != p or p < LOAD_ADDRESS for v, p in loads):
        raise GuestBuildError(f"{path}: PT_LOAD segments not at paddr == vaddr >= 2 MiB: {loads}")
    if not has_note:
        raise GuestBuildError(f"{path}: no PT_NOTE (PVH entry note) segment")


def _compile(output: pathlib.Path) -> None:
    command = [CC, *CFLAGS, *LDFLAGS, "-o", str(output)]
    command += [path.name for path in guest_sources()]
    result = subprocess.run(command, cwd=GUEST_DIR, capture_output=True, text=True, check=False)
    if result.returncode != 0 or result.stderr.strip():
        raise GuestBuildError(
            f"building the test guest failed (exit status {result.returncode}):\n"
            f"  cd {GUEST_DIR} && {' '.join(command)}\n{result.stderr.rstrip()}"
        )


def build_guest(out_dir: pathlib.Path) -> pathlib.Path:
    """Build (if needed) and return ``out_dir/svtest-guest.elf``.

    Raises GuestBuildError with gcc's stderr when compiling or linking fails.
    """
    # gcc runs in the guest source directory, so the output path must be absolute.
    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    elf = out_dir / ELF_NAME
    stamp = out_dir / f"{ELF_NAME}.sha256"
    with open(out_dir / f".{ELF_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fingerprint = _fingerprint()
        if elf.is_file() and stamp.is_file() and stamp.read_text().strip() == fingerprint:
            return elf
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
            built = pathlib.Path(tmp) / ELF_NAME
            _compile(built)
            _check_elf(built)
            os.replace(built, elf)
            (pathlib.Path(tmp) / "stamp").write_text(fingerprint + "\n")
            os.replace(pathlib.Path(tmp) / "stamp", stamp)
    return elf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=pathlib.Path, default=GUEST_DIR / "build")
    parser.add_argument("--print-cflags", action="store_true", help="print CFLAGS and exit")
    parser.add_argument("--print-ldflags", action="store_true", help="print LDFLAGS and exit")
    args = parser.parse_args(argv)
    if args.print_cflags:
        print(" ".join(CFLAGS))
        return 0
    if args.print_ldflags:
        print(" ".join(LDFLAGS))
        return 0
    try:
        print(build_guest(args.out_dir))
    except GuestBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
