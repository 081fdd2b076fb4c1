"""The two ways edgekit stops on purpose: a user mistake (exit 2) and a failed safety gate (exit 3)."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to one line (the class name if it has none), for one-line error reports."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class UserError(Exception):
    """Bad input from the user: printed as one line on stderr, exit code 2, nothing written."""

    exit_code = 2


class GateFailure(Exception):
    """A safety gate did not pass: names the metric, its value and the threshold; exit code 3."""

    exit_code = 3
