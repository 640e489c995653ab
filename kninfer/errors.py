"""The one error type the CLI turns into a one-line message and exit code 2."""


class KninferError(Exception):
    """Bad user input: a missing or corrupt file, an unknown name, shapes that do not fit."""
