"""Errors that end the monitor with one clear line on stderr and exit status 1."""


class MonitorError(Exception):
    """A user-facing failure: bad configuration, unusable file, host problem."""


class ConfigError(MonitorError):
    """The command line or -config file is invalid."""


class BootError(MonitorError):
    """The guest cannot be set up: kernel, initrd or memory problems."""
