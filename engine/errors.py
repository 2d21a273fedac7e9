"""The one exception type for a user's mistake."""


class InputError(Exception):
    """Bad input from the user: the message says what is wrong and what to do about it.

    The command line turns it into one line on stderr and exit code 2; anything else that
    escapes is a bug and keeps its traceback.
    """
