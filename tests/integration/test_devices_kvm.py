"""Device ids on real KVM: the id a disk was given on the command line is the one QMP knows."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import Qmp, running_monitor, wait_for_socket

pytestmark = pytest.mark.kvm


def test_command_line_device_id_names_the_disk_for_device_del(svtest_guest, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    qmp_path = str(tmp_path / "qmp.sock")
    with running_monitor(["-kernel", str(svtest_guest), "-qmp", f"unix:{qmp_path},server,nowait",
                          "-drive", f"id=drive0,file={image}",
                          "-device", "virtio-blk-device,drive=drive0,id=dev0",
                          "-append", "svtest.action=spin"], stdout=subprocess.DEVNULL) as process:
        wait_for_socket(process, qmp_path)
        qmp = Qmp(qmp_path)
        assert qmp.execute("device_del", id="drive0") == {"error": {
            "class": "DeviceNotFound", "desc": "Device 'drive0' not found"}}
        assert qmp.execute("device_del", id="dev0") == {"return": {}}
        assert [(e["event"], e["data"]) for e in qmp.events] == [
            ("DEVICE_DELETED", {"device": "dev0", "path": "dev0"})]
        assert qmp.execute("quit") == {"return": {}}
        assert process.wait(timeout=10) == 0
