"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MiniCPMError(Exception):
    """A user-facing error: the message is one line naming the file, key or value at fault. A line break inside a
    named value (a file name may hold one) is shown escaped, so the message stays one line whatever it quotes."""

    def __init__(self, message: str = "", *args):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"), *args)
