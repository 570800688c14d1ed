"""Errors that the command line turns into exit codes and one-paragraph messages."""


class GluonFTError(Exception):
    """Base class: an error the user can act on. The message is shown without a traceback."""

    exit_code = 1


class UsageError(GluonFTError):
    """Bad usage or bad input: missing data, unknown model, mismatched classes (exit 2)."""

    exit_code = 2


class DivergedError(GluonFTError):
    """The training loss became NaN or infinite (exit 3)."""

    exit_code = 3


class Interrupted(GluonFTError):
    """Ctrl-C or SIGTERM; a checkpoint was saved first (exit 130)."""

    exit_code = 130
