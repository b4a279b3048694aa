"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class CtcspecError(Exception):
    """A problem with the user's input or environment, described in plain words."""
