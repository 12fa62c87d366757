"""Listening unix sockets at paths that must not exist yet, and their removal at exit.

The socket listens before its name appears: it is bound under a temporary
name and then hard-linked to the real one, so a client that polls for the
file never finds it refusing connections.  link() fails if the name exists,
so a monitor never takes over a socket another one created meanwhile; and at
exit a monitor removes a name only while it still leads to its own socket.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket

from stratovirt_py.errors import ConfigError

# An O_PATH descriptor of each socket file this process created, by path:
# holding it keeps the inode alive, so no later file can get its number.
_created: dict[str, int] = {}
_temporary_names = itertools.count()


def create_unix_listener(path: str, what: str) -> socket.socket:
    """Binds and listens on a unix socket at `path` (which must not exist), mode 0600."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{next(_temporary_names)}~")
    held = -1
    old_umask = os.umask(0o177)
    try:
        try:
            listener.bind(temporary)
        except OSError:
            # E.g. the longer name exceeds AF_UNIX's limit: bind() refuses an
            # existing name too, so binding the real name is just as safe.
            temporary = path
            listener.bind(path)
        # Held from the name we just bound, so it is our socket's inode for sure.
        held = os.open(temporary, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        listener.listen(8)
        if temporary != path:
            os.link(temporary, path)
    except OSError as exc:
        listener.close()
        if held >= 0:
            os.close(held)
            if temporary == path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if exc.errno in (errno.EEXIST, errno.EADDRINUSE):
            raise ConfigError(f"{what} '{path}' already exists: remove it or choose another "
                              "path") from None
        raise ConfigError(f"cannot create {what} '{path}': {exc.strerror}") from None
    finally:
        os.umask(old_umask)
        if temporary != path:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    _created[path] = held
    return listener


def remove_socket_file(path: str) -> None:
    """Removes `path` if it is still the socket this process created there."""
    held = _created.pop(path, None)
    if held is None:
        return
    with contextlib.suppress(OSError):
        ours, there = os.fstat(held), os.lstat(path)
        if (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino):
            os.unlink(path)
    os.close(held)
