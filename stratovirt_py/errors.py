"""Errors that end the monitor with one clear line on stderr and exit status 1."""


class MonitorError(Exception):
    """A user-facing failure: bad configuration, unusable file, host problem."""


class ConfigError(MonitorError):
    """The command line or -config file is invalid."""


class BootError(MonitorError):
    """The guest cannot be set up: kernel, initrd or memory problems."""


def error_line(message: object) -> str:
    """`stratovirt-py: error: <message>` as one printable line, whatever the message holds.

    Messages quote user input, which may carry newlines, control characters or
    bytes that are not UTF-8 (surrogate escapes from argv): they are escaped.
    """
    text = str(message).encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return f"stratovirt-py: error: {text}\n"


def shorten(text: str, limit: int = 40) -> str:
    """User input quoted in an error message, cut to a readable length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
