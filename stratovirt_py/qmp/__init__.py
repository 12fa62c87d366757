"""QMP: the management protocol on unix sockets."""

# Importing the command modules registers their commands.
from stratovirt_py.qmp import balloon_commands, commands, device_commands  # noqa: F401
