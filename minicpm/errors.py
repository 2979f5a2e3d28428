"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MiniCPMError(Exception):
    """A user-facing error: the message is one line naming the file, key or value at fault."""
