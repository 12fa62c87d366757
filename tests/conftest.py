"""Shared fixtures: the freestanding test guest, KVM availability, serial-log artifacts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.helpers import REPO

ARTIFACTS = REPO / "test-artifacts"


def kvm_usable() -> str | None:
    """None if /dev/kvm can be used, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no read/write permission on /dev/kvm"
    return None


def pytest_collection_modifyitems(config, items):
    reason = kvm_usable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        # CI machines have KVM: a missing /dev/kvm there is a broken machine, not a skip.
        raise pytest.UsageError(f"CI=true but {reason}")
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if "kvm" in item.keywords or "linux" in item.keywords:
            item.add_marker(skip)


def _load_guest_builder():
    spec = importlib.util.spec_from_file_location("svtest_build", REPO / "tests/guest/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def svtest_guest() -> Path:
    """The freestanding test guest ELF, built with gcc by the test suite."""
    return _load_guest_builder().build_guest(REPO / "build" / "svtest")


@pytest.fixture
def artifact_dir(request) -> Path:
    """A per-test directory under test-artifacts/ for serial logs kept after the run."""
    path = ARTIFACTS / request.node.name.replace("/", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path
