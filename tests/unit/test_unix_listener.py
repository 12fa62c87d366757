"""QMP and serial socket files: created atomically, never taken over, removed only if ours."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from stratovirt_py.errors import ConfigError
from stratovirt_py.unix_listener import create_unix_listener, remove_socket_file

REAL_SOCKET = socket.socket


def bound_socket(path) -> socket.socket:
    sock = REAL_SOCKET(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def test_listens_with_mode_0600_and_leaves_no_temporary_name(tmp_path):
    path = tmp_path / "qmp.sock"
    listener = create_unix_listener(str(path), "QMP socket")
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert os.listdir(tmp_path) == ["qmp.sock"]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.close()
    finally:
        listener.close()
        remove_socket_file(str(path))
    assert not path.exists()


@pytest.mark.parametrize("existing", ["file", "socket"])
def test_an_existing_name_is_refused_and_left_alone(tmp_path, existing):
    path = tmp_path / "qmp.sock"
    other = None
    if existing == "file":
        path.write_text("someone's file")
    else:
        other = bound_socket(path)
    identity = os.lstat(path).st_ino
    with pytest.raises(ConfigError, match="already exists"):
        create_unix_listener(str(path), "QMP socket")
    assert os.lstat(path).st_ino == identity
    assert os.listdir(tmp_path) == ["qmp.sock"]
    if other is not None:
        other.close()


def test_a_socket_created_by_another_monitor_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    """Another monitor binds the same path while this one is setting up its socket."""
    path = tmp_path / "qmp.sock"
    rival: list[socket.socket] = []

    class RacingSocket(REAL_SOCKET):
        def listen(self, *args) -> None:
            super().listen(*args)
            if not rival:
                rival.append(bound_socket(path))

    monkeypatch.setattr(socket, "socket", RacingSocket)
    with pytest.raises(ConfigError, match="already exists"):
        create_unix_listener(str(path), "QMP socket")
    monkeypatch.undo()
    # The rival's socket is still the one at the path, and it still answers.
    client = REAL_SOCKET(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    accepted, _ = rival[0].accept()
    accepted.close()
    client.close()
    rival[0].close()


def test_removal_spares_a_socket_that_replaced_ours(tmp_path):
    path = tmp_path / "qmp.sock"
    listener = create_unix_listener(str(path), "QMP socket")
    listener.close()
    os.unlink(path)
    replacement = bound_socket(path)
    remove_socket_file(str(path))
    assert path.exists()
    replacement.close()
