"""The one exception type for bad input: the CLI turns it into a one-line message and exit code 2."""


class InputError(ValueError):
    """Input that ensir-flow refuses: the message names the file or store and the problem."""
