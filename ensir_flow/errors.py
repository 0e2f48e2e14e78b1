"""The exceptions ensir-flow raises on purpose; the CLI turns each into one line and an exit code.

- `InputError`: bad input or bad data (a missing file, an inconsistent store, a LUT of other
  models). Retrying will not help: exit 1.
- `TransientError`: a failure worth retrying as it is (a lock held by another live run, a scheduler
  that cannot be reached, workers lost): exit 75 (EX_TEMPFAIL), so schedulers can retry.
"""


class InputError(ValueError):
    """Input that ensir-flow refuses: the message names the file or store and the problem."""


class TransientError(RuntimeError):
    """A failure that a later retry of the same command may not meet: the message says what."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line error quotes of a library's failure."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
