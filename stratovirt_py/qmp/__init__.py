"""QMP: the management protocol on unix sockets."""

# Importing the command modules registers their commands.
from stratovirt_py.qmp import commands, device_commands  # noqa: F401
