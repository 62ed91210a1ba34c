"""The one exception type for problems a user can fix (bad files, bad options), and ``bounded``, what
its messages quote of an input."""


class UserError(ValueError):
    """A problem with the user's input; its message is one line naming the problem and the fix.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """


def bounded(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: what a message or a log line
    quotes of an input (which may be megabytes) stays short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
