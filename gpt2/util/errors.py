"""The one exception type for problems a user can fix (bad files, bad options)."""


class UserError(ValueError):
    """A problem with the user's input; its message is one line naming the problem and the fix.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """
