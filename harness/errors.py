"""User-facing errors: one line naming the field and the fix, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The CLI prints ``str(err)`` on one line and exits with code 2."""

    exit_code = 2

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field, self.problem, self.fix = field, problem, fix
        message = f"{field}: {problem}" if field else problem
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf. Training stops; the last good checkpoint is kept."""


class DataError(UserError):
    """A data file the loader cannot read (one line naming the file).

    Raised in a loader worker, it reaches the main process through torch's ExceptionWrapper, which
    rebuilds it from a single string holding the worker's whole traceback: keep only its last line.
    """

    def __init__(self, field: str, problem: str = "", fix: str = "") -> None:
        if not problem and "\n" in field:
            last = field.rstrip().splitlines()[-1]
            field, problem = "", last.split(": ", 1)[-1] if last.startswith(("harness.", "DataError")) else last
        super().__init__(field, problem, fix)
